"""The start state in a store: written with the start files, read back, verified, and kept by a resumed recording.

A store recorded from an optimizer that holds state keeps its momentum buffers in ``initial_state.safetensors``
(listed in the manifest, checksummed); a corrupted copy is named by ``verify()`` and by reading it; ``resume=True``
and ``restore()`` continue such a run with the stored start, so the resumed store decomposes as the uninterrupted run
(docs/recording.md, "Starting from optimizer state").
"""

from __future__ import annotations

import json

import pytest
import torch
from _start_state_kit import BEFORE, OPTIMIZERS, batches, data, mlp, step, train
from reference import rel_err
from safetensors.torch import save_file

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


def test_resume_on_an_optimizer_that_holds_state_is_refused_naming_restore(tmp_path):
    train("sgd", recorded=1, store=tmp_path / "run")
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    X, y, _ = data()
    step(model, opt, X, y, torch.arange(8))
    with pytest.raises(ConfigError, match=r"resume=True: the optimizer already holds state for 4 parameter\(s\).*"
                                          r"Fix: open the recorder with resume=True on a fresh optimizer and call its "
                                          r"restore\(\)"):
        explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "run",
                                    resume=True)
