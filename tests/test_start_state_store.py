"""The start state in a store: written with the start files, read back, verified, and kept by a resumed recording.

A store recorded from an optimizer that holds state keeps its momentum buffers in ``initial_state.safetensors``
(listed in the manifest, checksummed); a corrupted copy is named by ``verify()`` and by reading it; ``resume=True``
and ``restore()`` continue such a run with the stored start, so the resumed store decomposes as the uninterrupted run,
also when the optimizer given to the resumed recorder already holds exactly the state the store saved (a framework
resume), while other held state is refused (docs/recording.md, "Starting from optimizer state").
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _start_state_kit import BEFORE, OPTIMIZERS, batches, data, mlp, step, train
from reference import Reference, rel_err
from safetensors.torch import load_file, save_file

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.kernel.attribution import Attribution
from explaind.trajectory import Trajectory
from explaind.trajectory._checksum import checksum

pytestmark = pytest.mark.usefixtures("one_thread")


def _decompose(traj):
    _, _, Xt = data()
    return explaind.InfluenceEstimator(keep=("step",), tol=1e-11, device="cpu").fit(traj).transform(Xt)


def test_the_start_state_round_trips_through_the_store(tmp_path):
    _, memory, _, _ = train("adamw")
    _, stored, _, _ = train("adamw", store=tmp_path / "run")
    record = stored.manifest.initial_state_file
    assert record is not None and record.path == "initial_state.safetensors" and record.checksum
    loaded = Trajectory.load(tmp_path / "run", model=mlp())
    loaded.verify()
    assert loaded.initial_state().keys() == memory.initial_state().keys()
    assert all(torch.equal(loaded.initial_state()[n], memory.initial_state()[n]) for n in memory.initial_state())
    a, b = _decompose(memory), _decompose(loaded)
    assert rel_err(b.initial_state, a.initial_state) <= 1e-12 and b.meta["residual_share"] <= 1e-9
    saved = Attribution.load(b.save(tmp_path / "att"))  # the term travels with a saved attribution
    assert torch.equal(saved.initial_state, b.initial_state) and torch.equal(saved.total(), b.total())


def test_a_fresh_optimizer_writes_no_start_state_file(tmp_path):
    X, y, _ = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "run")
    with rec:
        step(model, opt, X, y, torch.arange(8), rec)
    assert rec.trajectory.manifest.initial_state_file is None
    assert not (tmp_path / "run/initial_state.safetensors").exists()
    assert Trajectory.load(tmp_path / "run", model=mlp()).initial_state() == {}


def _corrupt(path, how):
    data_ = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data_[: len(data_) // 2])
    else:  # a tensor byte near the end, the header stays parseable
        i = len(data_) - 5
        path.write_bytes(data_[:i] + bytes([data_[i] ^ 0x01]) + data_[i + 1:])


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_corrupted_start_state_file_is_named_by_verify_and_when_read(tmp_path, how):
    train("sgd", recorded=2, store=tmp_path / "run")
    _corrupt(tmp_path / "run/initial_state.safetensors", how)
    loaded = Trajectory.load(tmp_path / "run", model=mlp())
    with pytest.raises(TrajectoryError, match=r"Trajectory file .*initial_state\.safetensors.*(truncated|corrupted|"
                                              r"modified)"):
        loaded.verify()
    with pytest.raises(TrajectoryError, match=r"initial_state\.safetensors"):
        _decompose(loaded)


def test_a_start_state_file_with_foreign_tensors_is_refused(tmp_path):
    """A file that passes its checksum (rewritten with its manifest) but names no parameter is still refused."""
    train("sgd", recorded=1, store=tmp_path / "run")
    save_file({"m.nope": torch.zeros(3, dtype=torch.float64)}, str(tmp_path / "run/initial_state.safetensors"))
    manifest = tmp_path / "run/manifest.json"
    m = json.loads(manifest.read_text())
    raw = (tmp_path / "run/initial_state.safetensors").read_bytes()
    m["initial_state_file"].update(nbytes=len(raw), checksum=checksum(raw))
    manifest.write_text(json.dumps(m))
    with pytest.raises(TrajectoryError, match=r"initial_state\.safetensors.*does not hold start buffers.*'nope' is "
                                              r"not a trainable parameter.*re-record"):
        Trajectory.load(tmp_path / "run", model=mlp()).initial_state()


def test_an_optimizer_start_state_without_its_description_is_refused_naming_the_file(tmp_path):
    """A start file whose optimizer tensors pass the checksum but lack the metadata that names their parameters."""
    train("adam", recorded=1, store=tmp_path / "run")
    path = tmp_path / "run/initial_state.safetensors"
    save_file(load_file(str(path)), str(path))  # the tensors kept, the metadata dropped
    manifest = tmp_path / "run/manifest.json"
    m = json.loads(manifest.read_text())
    raw = path.read_bytes()
    m["initial_state_file"].update(nbytes=len(raw), checksum=checksum(raw))
    manifest.write_text(json.dumps(m))
    loaded = Trajectory.load(tmp_path / "run", model=mlp())
    with pytest.raises(TrajectoryError, match=r"recorded from start files other than those the manifest names "
                                              r"\(initial_state_file"):
        loaded.verify()  # the checksum matches, but the step files bind the one recorded (docs: round 7)
    with pytest.raises(TrajectoryError, match=r"initial_state\.safetensors.* holds the optimizer's start state "
                                              r"without its description.*re-record"):
        loaded.optimizer_start()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_resumed_store_keeps_its_start_state_and_decomposes_as_the_uninterrupted_run(tmp_path, kind):
    model_ref, memory, _, _ = train(kind)  # 4 recorded steps in one go
    X, y, _ = data()
    model = mlp()
    opt = OPTIMIZERS[kind](model.parameters())
    plan = batches(BEFORE + 4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s))
    for idx in plan[:BEFORE]:
        step(model, opt, X, y, idx)
        sched.step()
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "run")
    with rec:
        for idx in plan[BEFORE:BEFORE + 2]:
            step(model, opt, X, y, idx, rec)
            sched.step()
    model = mlp()  # a new process: fresh model and optimizer
    opt = OPTIMIZERS[kind](model.parameters())
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "run",
                                      resume=True)
    with pytest.warns(ExplaindWarning, match=r"restore\(\) loaded the optimizer state of step 2.*'lr'"):
        assert rec.restore() == 2  # the schedule's rate, recorded with the state
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s), last_epoch=BEFORE + 1)
    with rec:
        for idx in plan[BEFORE + 2:]:
            step(model, opt, X, y, idx, rec)
            sched.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_ref.parameters()))
    loaded = Trajectory.load(tmp_path / "run", model=mlp())
    loaded.verify()
    assert all(torch.equal(loaded.initial_state()[n], t) for n, t in memory.initial_state().items())
    assert max(loaded.audit()) <= 1e-13
    a, b = _decompose(memory), _decompose(loaded)
    assert b.meta["residual_share"] <= 1e-9 and rel_err(b.initial_state, a.initial_state) <= 1e-12


def _first_two_steps(kind, root, **recorder_kwargs):
    """``BEFORE`` unrecorded steps, then 2 recorded into ``root``; returns the model's and optimizer's state dicts."""
    X, y, _ = data()
    model = mlp()
    opt = OPTIMIZERS[kind](model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s))
    plan = batches(BEFORE + 4)
    for idx in plan[:BEFORE]:
        step(model, opt, X, y, idx)
        sched.step()
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=root,
                                      **recorder_kwargs)
    with rec:
        for idx in plan[BEFORE:BEFORE + 2]:
            step(model, opt, X, y, idx, rec)
            sched.step()
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _resumed(kind, root, model_state, opt_state):
    """A new process: the model and optimizer loaded from the checkpoint of step 2, a recorder resuming the store."""
    X, y, _ = data()
    model = mlp()
    model.load_state_dict(model_state)
    opt = OPTIMIZERS[kind](model.parameters())
    opt.load_state_dict(copy.deepcopy(opt_state))
    return model, opt, explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=root,
                                                   resume=True)


def _last_two_steps(kind, root, model_state, opt_state, *, restore):
    """:func:`_resumed`, then 2 more recorded steps."""
    X, y, _ = data()
    model, opt, rec = _resumed(kind, root, model_state, opt_state)
    if restore:  # the checkpoint was taken after the schedule's step, the store's state at the optimizer's
        with pytest.warns(ExplaindWarning, match=r"restore\(\) loaded the optimizer state of step 2.*'lr'"):
            assert rec.restore() == 2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s), last_epoch=BEFORE + 1)
    with rec:
        for idx in batches(BEFORE + 4)[BEFORE + 2:]:
            step(model, opt, X, y, idx, rec)
            sched.step()
    return model


@pytest.mark.parametrize("kind, restore", [("sgd", True), ("adam", False), ("adamw", True)])
def test_resume_on_an_optimizer_holding_the_stored_state_continues_the_run_exactly(tmp_path, kind, restore):
    """A framework resume: the model and optimizer restored from the loop's own checkpoint of the store's last step,
    with or without ``restore()`` (which then finds that state and leaves it)."""
    model_ref, memory, _, _ = train(kind)
    model = _last_two_steps(kind, tmp_path / "run", *_first_two_steps(kind, tmp_path / "run"), restore=restore)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_ref.parameters()))
    loaded = Trajectory.load(tmp_path / "run", model=mlp())
    assert loaded.n_steps == 4 and max(loaded.audit()) <= 1e-13
    _, _, Xt = data()
    with torch.no_grad():
        assert rel_err(explaind.KernelReplica(device="cpu").fit(loaded).predict(Xt), model_ref(Xt)) <= 1e-6
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(loaded).transform(Xt)
    assert att.meta["residual_share"] <= 1e-9 and rel_err(att.values, Reference(memory, Xt).kept(("train",))) <= 1e-9
    assert rel_err(_decompose(loaded).initial_state, _decompose(memory).initial_state) <= 1e-12


@pytest.mark.parametrize("restore", [True, False])
def test_resume_on_an_optimizer_holding_other_state_is_refused_naming_where(tmp_path, restore):
    model_state, opt_state = _first_two_steps("sgd", tmp_path / "run")
    opt_state["state"][1]["momentum_buffer"] += 1e-9  # a checkpoint of another step, or another run
    where = r"restore\(\) would replace it" if restore else r"`with rec:` without restore\(\) continues the store"
    with pytest.raises(ConfigError, match=r"resume=True: the optimizer holds state that differs from the state the "
                                          r"store at .* saved after step 1 \(at state\[1\]\['momentum_buffer'\]\), "
                                          r"and " + where + r".*Fix: open the recorder with resume=True on a fresh "
                                          r"optimizer and call its restore\(\)"):
        _, _, rec = _resumed("sgd", tmp_path / "run", model_state, opt_state)
        if restore:
            rec.restore()
        else:
            rec.__enter__()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_resume_from_step_0_restores_the_optimizer_state_the_recording_opened_on(tmp_path, kind):
    """``save_optimizer_state=False`` resumes at step 0: ``restore()`` loads theta_0 and the start state into a fresh
    optimizer (before, the optimizer stayed fresh while the store's m_-1 said otherwise)."""
    model_ref, memory, _, _ = train(kind)
    _first_two_steps(kind, tmp_path / "run", save_optimizer_state=False)
    X, y, _ = data()
    model = mlp()
    opt = OPTIMIZERS[kind](model.parameters())
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "run",
                                      resume=True, save_optimizer_state=False)
    with pytest.warns(ExplaindWarning, match=r"restore\(\) loaded the optimizer state of step 0.*'lr'"):
        assert rec.restore() == 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s), last_epoch=BEFORE - 1)
    with rec:
        for idx in batches(BEFORE + 4)[BEFORE:]:
            step(model, opt, X, y, idx, rec)
            sched.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_ref.parameters()))
    loaded = Trajectory.load(tmp_path / "run", model=mlp())
    assert loaded.n_steps == 4 and max(loaded.audit()) <= 1e-13
    a, b = _decompose(memory), _decompose(loaded)
    assert b.meta["residual_share"] <= 1e-9 and rel_err(b.initial_state, a.initial_state) <= 1e-12


def test_a_resume_from_step_0_without_restore_needs_the_start_state_in_the_optimizer(tmp_path):
    """theta_0 loaded by hand into a fresh optimizer's model: `with rec:` refuses, naming restore()."""
    _first_two_steps("adam", tmp_path / "run", save_optimizer_state=False)
    X, y, _ = data()
    model = mlp()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(Trajectory.load(tmp_path / "run", model=mlp()).params(0)[n])
    opt = OPTIMIZERS["adam"](model.parameters())
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "run",
                                      resume=True, save_optimizer_state=False)
    with pytest.raises(ConfigError, match=r"the optimizer holds no state, unlike the state the store at .* saved when "
                                          r"the recording opened \(at state\[0\]\['exp_avg'\] \(missing\).*`with rec:` "
                                          r"without restore\(\).*call its restore\(\)"), rec:
        pass
