"""Dropout and train-mode batch norm decompose exactly: random states captured per micro-batch and replayed.

The slow references (tests/replay_reference.py) replay the recorded generator state of every micro-batch in a
plain loop and take each sample's own loss gradient through the batched training forward.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_compare import as_numpy, reference_terms
from reference import rel_err
from replay_reference import BufferReference, ReplayReference
from torch import nn

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.trajectory._random import RandomState, replayed

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def _data(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)


def _record(model: nn.Module, optimizer: torch.optim.Optimizer, X, y, *, steps: int, batch: int, micro: int = 1,
            train: bool = True, **kw):
    """Train with the plain loop (``micro`` micro-batches per step, loss divided by their number)."""
    rec = explaind.TrajectoryRecorder(model, optimizer, loss="cross_entropy", train_data=(X, y), **kw)
    gen = torch.Generator().manual_seed(0)
    model.train(train)
    with rec:
        for _ in range(steps):
            optimizer.zero_grad()
            for _ in range(micro):
                idx = torch.randperm(X.shape[0], generator=gen)[:batch]
                (F.cross_entropy(model(X[idx]), y[idx]) / micro).backward()
                rec.log_batch(idx, torch.full((batch,), 1.0 / (batch * micro), dtype=DT))
            optimizer.step()
    return rec


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 3)).to(DT)


def _cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Dropout2d(0.25), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear(3 * 3 * 3, 3)).to(DT)


def _check_exact(traj, model: nn.Module, X_test, *, quadrature: dict) -> None:
    """Train scores against the replaying reference, residual share, replica against the trained model."""
    est = explaind.InfluenceEstimator(keep=("train",), device="cpu", **quadrature)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)  # no residual or quadrature warning
        att = est.fit(traj).transform(X_test)
    model.eval()
    ref = ReplayReference(traj, X_test)
    want = reference_terms(ref, att)
    assert rel_err(as_numpy(att.values), want["values"]) <= 1e-9
    assert att.meta["residual_share"] <= 1e-9
    assert np.abs(as_numpy(att.residual)).max() <= 1e-9 * np.abs(want["values"]).sum(1).max()
    with torch.no_grad():
        trained = model(X_test)
    assert rel_err(as_numpy(att.total()), as_numpy(trained)) <= 1e-6
    assert rel_err(as_numpy(explaind.KernelReplica(device="cpu", **quadrature).fit(traj).predict(X_test)),
                   as_numpy(trained)) <= 1e-6


def test_dropout_mlp_sgd_decomposes_exactly():
    X, y = _data(24, (5,), 0)
    model = _mlp()
    rec = _record(model, torch.optim.SGD(model.parameters(), lr=0.3), X[:20], y[:20], steps=4, batch=6)
    traj = rec.trajectory
    assert np.isfinite(traj.gradient_check()[:2]).all()  # "auto" checked its first steps through the replays
    assert float(np.nanmax(traj.gradient_check())) <= 1e-12
    _check_exact(traj, model, X[20:], quadrature={"quadrature": "gauss-legendre", "nodes": 8})


def test_dropout_relu_cnn_adam_decomposes_exactly():
    X, y = _data(16, (1, 5, 5), 3)
    model = _cnn()
    rec = _record(model, torch.optim.Adam(model.parameters(), lr=0.05), X[:13], y[:13], steps=3, batch=5)
    _check_exact(rec.trajectory, model, X[13:], quadrature={"quadrature": "adaptive", "tol": 1e-11})


def test_gradient_accumulation_replays_each_micro_batch():
    X, y = _data(24, (5,), 4)
    model = _mlp()
    rec = _record(model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9), X[:20], y[:20], steps=3,
                  batch=4, micro=2)
    traj = rec.trajectory
    micro = traj.micro_batches(1)
    assert [m.forwards for m in micro] == [1, 1] and not torch.equal(micro[0].state.cpu, micro[1].state.cpu)
    assert torch.equal(torch.cat([m.indices for m in micro]), traj.batch(1)[0])
    _check_exact(traj, model, X[20:], quadrature={"quadrature": "gauss-legendre", "nodes": 8})


def test_store_round_trip_keeps_the_random_states(tmp_path):
    X, y = _data(24, (5,), 5)
    model = _mlp()
    rec = _record(model, torch.optim.SGD(model.parameters(), lr=0.3), X[:20], y[:20], steps=3, batch=6,
                  store=tmp_path / "run")
    disk = explaind.Trajectory.load(tmp_path / "run", model=_mlp().eval())  # the reference runs it as given
    for s in range(disk.n_steps):
        (m,) = disk.micro_batches(s)
        assert m.forwards == 1 and m.state.device == "cpu" and m.state.cpu.dtype == torch.uint8
        assert m.state.cpu.numel() == 5056  # the CPU generator state docs/recording.md quotes
    assert disk.manifest.random_capture and disk.manifest.coupled == ["2"]
    disk.verify()  # the states are in the checksummed step files
    _check_exact(disk, model, X[20:], quadrature={"quadrature": "gauss-legendre", "nodes": 8})
    _ = rec


def test_without_capture_the_split_is_inexact_and_loud():
    """The behaviour before capturing: the residual carries about half of the change, and the warning says why."""
    X, y = _data(24, (5,), 0)
    model = _mlp()
    traj = _record(model, torch.optim.SGD(model.parameters(), lr=0.3), X[:20], y[:20], steps=4, batch=6,
                   capture_random=False).trajectory
    assert np.isnan(traj.gradient_check()).all()  # "auto" cannot check an uncaptured dropout run
    with pytest.warns(ExplaindWarning, match=r"residual share.*did not capture.*capture_random='auto'"):
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X[20:])
    assert att.meta["residual_share"] > 0.05


def test_recording_leaves_the_loops_random_stream_alone():
    """The recorder's own forwards (loss and gradient checks) run under a forked generator."""
    X, y = _data(24, (5,), 6)
    plain, recorded = _mlp(), _mlp()
    torch.manual_seed(7)
    opt = torch.optim.SGD(plain.parameters(), lr=0.3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        idx = torch.randperm(20, generator=gen)[:6]
        opt.zero_grad()
        F.cross_entropy(plain(X[idx]), y[idx]).backward()
        opt.step()
    torch.manual_seed(7)
    _record(recorded, torch.optim.SGD(recorded.parameters(), lr=0.3), X[:20], y[:20], steps=3, batch=6,
            check_gradients=True)
    for a, b in zip(plain.parameters(), recorded.parameters()):
        assert torch.equal(a, b)


def _two_forwards(**kw):
    X, y = _data(24, (5,), 8)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), **kw)
    with rec:
        for s in range(2):
            opt.zero_grad()
            idx = torch.arange(6 * s, 6 * s + 6)
            F.cross_entropy(model(X[idx[:3]]), y[idx[:3]], reduction="sum").div(6).backward()
            F.cross_entropy(model(X[idx[3:]]), y[idx[3:]], reduction="sum").div(6).backward()
            rec.log_batch(idx)
            opt.step()
    return X, rec.trajectory


def test_several_forwards_per_log_batch_are_refused_loudly():
    """Refused at log_batch of the step it happens, naming the fix for parts of a batch too; recorded with
    check_gradients=False a warning, and then the train axis refuses while the replica stays available."""
    with pytest.raises(TrajectoryError, match=r"Step 0: the micro-batch logged now saw 2 training forwards.*if the "
                                              r"forwards were parts of the batch, call rec.log_batch\(part\)"):
        _two_forwards()
    with pytest.warns(explaind.exceptions.ExplaindWarning, match=r"Step \d: the micro-batch logged now saw 2"):
        X, traj = _two_forwards(check_gradients=False)
    assert traj.micro_batches(0)[0].forwards == 2 and traj.micro_batches(0)[0].state is None
    assert np.isnan(traj.gradient_check()).all()
    with pytest.raises(TrajectoryError, match=r"Step [01]: micro-batch 0 saw 2 training forward\(s\).*one training "
                                              r"forward of exactly the logged samples per rec.log_batch"):
        explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X[20:])
    # the replica needs no per-sample split and stays available
    assert explaind.KernelReplica(device="cpu").fit(traj).predict(X[20:]).shape == (4, 3)


def test_a_state_from_another_device_is_refused():
    state = RandomState(torch.get_rng_state(), (), "cuda")
    with pytest.raises(TrajectoryError, match=r"ran on 'cuda'.*engine computes on 'cpu'.*device='cuda'"):
        with replayed(state, torch.device("cpu"), "Step 3"):
            pass


def test_capture_random_is_validated_and_can_be_forced():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"capture_random='yes' is not allowed.*'auto'.*True, False"):
        explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", capture_random="yes")
    X, y = _data(12, (3,), 9)
    for capture, captured in (("auto", False), (True, True)):
        plain = nn.Linear(3, 3).to(DT)
        traj = _record(plain, torch.optim.SGD(plain.parameters(), lr=0.1), X, y, steps=2, batch=4,
                       capture_random=capture).trajectory
        # forced capture replays every training forward of a model whose modules show no random layer
        assert traj.manifest.random_capture is captured
        assert traj.manifest.coupled == (["Linear.forward"] if captured else [])
        (m,) = traj.micro_batches(1)
        assert (m.state is not None) is captured and m.forwards == (1 if captured else -1)


def _bn_cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)).to(DT)


def test_batchnorm_cnn_sgd_momentum_decomposes_exactly(tmp_path):
    X, y = _data(18, (1, 5, 5), 10)
    model = _bn_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:15], y[:15]),
                                      store=tmp_path / "bn")
    gen = torch.Generator().manual_seed(0)
    seen = []
    with rec:
        for _ in range(4):
            idx = torch.randperm(15, generator=gen)[:5]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
            seen.append({k: v.clone() for k, v in model.named_buffers()})
    traj = explaind.Trajectory.load(tmp_path / "bn", model=_bn_cnn().eval())
    assert traj.buffer_names == ("1.running_mean", "1.running_var", "1.num_batches_tracked")
    for s, beta in enumerate(seen):  # beta_{s+1}, as the loop left them
        assert all(torch.equal(traj.buffers(s + 1)[k], beta[k]) for k in traj.buffer_names)
    assert float(traj.buffers(0)["1.running_var"].min()) == 1.0  # the initial statistics
    assert float(np.nanmax(traj.gradient_check())) <= 1e-12  # checked through the batched training forward
    quad = {"quadrature": "adaptive", "tol": 1e-11}
    X_test = X[15:]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu", **quad).fit(traj).transform(X_test)
        by_step = explaind.InfluenceEstimator(keep=("step",), device="cpu", **quad).fit(traj).transform(X_test)
    ref = BufferReference(traj, X_test)
    want = ref.buffer_terms()
    assert float(want.abs().max()) > 1e-3  # the running statistics moved the outputs
    # the reference's path integrals are exact, so its endpoint differences miss exactly the buffers terms
    assert float((ref.quad_error - want).abs().max()) <= 1e-12
    assert rel_err(as_numpy(att.values), reference_terms(ref, att)["values"]) <= 1e-9
    assert att.meta["residual_share"] <= 1e-9 and by_step.meta["residual_share"] <= 1e-9
    assert rel_err(as_numpy(by_step.buffers), as_numpy(want.permute(1, 0, 2))) <= 1e-12
    assert rel_err(as_numpy(att.buffers), as_numpy(want.sum(0))) <= 1e-12
    model.eval()
    with torch.no_grad():
        trained = model(X_test)
    for result in (att, by_step):
        assert rel_err(as_numpy(result.total()), as_numpy(trained)) <= 1e-6
        assert result.completeness_error() <= 1e-12
    replica = explaind.KernelReplica(device="cpu", **quad).fit(traj).predict(X_test)
    assert rel_err(replica, as_numpy(trained)) <= 1e-6


def test_without_buffer_terms_the_replica_misses_the_running_statistics():
    """What the buffers term fixes: with the buffers of the start, the replica is not the trained model."""
    X, y = _data(18, (1, 5, 5), 11)
    model = _bn_cnn()
    traj = _record(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), X[:15], y[:15], steps=3,
                   batch=5).trajectory
    att = explaind.InfluenceEstimator(keep=("step",), device="cpu").fit(traj).transform(X[15:])
    model.eval()
    with torch.no_grad():
        trained = model(X[15:])
    without = att.total() - att.buffers.sum(1)
    assert rel_err(as_numpy(without), as_numpy(trained)) > 1e-3
    assert rel_err(as_numpy(att.total()), as_numpy(trained)) <= 1e-6


def test_the_reference_catches_the_evaluation_mode_split(monkeypatch):
    """The inexact split of before (gradients in evaluation mode, no replay) fails the comparisons above."""
    import explaind.kernel.split as split

    X, y = _data(24, (5,), 0)
    model = _mlp()
    traj = _record(model, torch.optim.SGD(model.parameters(), lr=0.3), X[:20], y[:20], steps=4, batch=6).trajectory
    monkeypatch.setattr(split, "step_replay", lambda traj, s: None)
    att = explaind.InfluenceEstimator(keep=("train",), device="cpu", residual_tol=10.0).fit(traj).transform(X[20:])
    model.eval()
    assert rel_err(as_numpy(att.values), reference_terms(ReplayReference(traj, X[20:]), att)["values"]) > 1e-2
    assert att.meta["residual_share"] > 1e-2


def test_resume_restores_the_running_statistics(tmp_path):
    X, y = _data(15, (1, 5, 5), 12)
    batches = [torch.arange(5 * (s % 3), 5 * (s % 3) + 5) for s in range(4)]

    def run(store, steps, resume=False):
        model = _bn_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store,
                                          resume=resume)
        start = rec.restore() if resume else 0
        with rec:
            for idx in batches[start:steps]:
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                rec.log_batch(idx)
                opt.step()
        return model

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "parts", 2)
    resumed = run(tmp_path / "parts", 4, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    one, two = (explaind.Trajectory.load(tmp_path / p, model=_bn_cnn()) for p in ("whole", "parts"))
    for s in range(5):
        assert all(torch.equal(one.buffers(s)[k], two.buffers(s)[k]) for k in one.buffer_names)


def test_a_loop_in_evaluation_mode_needs_no_replay():
    """Dropout switched off by model.eval() in the loop: the evaluation-mode split is exact and used."""
    X, y = _data(24, (5,), 13)
    model = _mlp()
    rec = _record(model, torch.optim.SGD(model.parameters(), lr=0.3), X[:20], y[:20], steps=3, batch=6, train=False)
    traj = rec.trajectory
    (m,) = traj.micro_batches(0)
    assert (m.forwards, m.eval_forwards, m.state) == (0, 1, None)
    assert float(np.nanmax(traj.gradient_check())) <= 1e-12
    _check_exact(traj, model, X[20:], quadrature={"quadrature": "gauss-legendre", "nodes": 8})


def test_float32_training_is_replayed_in_float64():
    """CPU dropout masks do not depend on the dtype: a float32 run is replayed with its own masks in float64."""
    state = torch.get_rng_state()
    masks = []
    for dtype in (torch.float32, torch.float64):
        torch.set_rng_state(state)
        masks.append(F.dropout(torch.ones(4096, dtype=dtype), 0.3) != 0)
    assert torch.equal(masks[0], masks[1]) and 0 < int(masks[0].sum()) < 4096
    X, y = _data(24, (5,), 14)
    shares = []
    for capture in (True, False):
        model = _mlp().float()
        traj = _record(model, torch.optim.SGD(model.parameters(), lr=0.3), X[:20].float(), y[:20], steps=3, batch=6,
                       capture_random=capture).trajectory
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu", residual_tol=10.0).fit(traj).transform(X[20:])
        shares.append(att.meta["residual_share"])
    assert shares[0] <= 1e-5 < 1e-2 < shares[1]  # float32 rounding of the recorded updates, against wrong masks


@pytest.mark.parametrize("check", [True, False])
def test_log_batch_before_the_forward_is_refused_at_once_naming_the_order(check):
    """``log_batch`` called before its micro-batch's forward pairs the samples with another forward's masks:
    refused at the first call (before: a gradient mismatch at step 1, or with the check off a failure only when
    explaining), naming the documented order; the documented order records the same loop."""
    torch.manual_seed(3)
    X, y = _data(24, (6,), seed=3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=check)
    idx = torch.arange(8)
    with pytest.raises(TrajectoryError, match=r"(?s)no forward of the model since the previous call.*'2'.*"
                                              r"after that micro-batch's forward and backward\(\)"):
        with rec:
            rec.log_batch(idx)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=check)
    with rec:
        for s in range(3):
            idx = torch.arange(8 * s, 8 * s + 8)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    assert rec.trajectory.n_steps == 3
