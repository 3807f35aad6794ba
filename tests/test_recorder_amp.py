"""Mixed precision (autocast, GradScaler, skipped steps) and class-weighted losses, against independent references."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import amp_loop, classification_data, slow_batch_gradient
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError

N_STEPS = 8


def _model(dtype=torch.float32):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)).to(dtype)


def _data(dtype=torch.float32):
    return classification_data(n=64, d=6, classes=3, dtype=dtype, seed=2)


def _idx(s):
    return torch.randperm(64, generator=torch.Generator().manual_seed(s))[:8]


def _amp_loop(model, opt, scaler, X, y, rec=None, dtype=torch.float16, n_steps=N_STEPS):
    """fp16/bf16 autocast + GradScaler recipe; returns the batches of the steps the optimizer took."""
    return amp_loop(model, opt, scaler, X, y, [_idx(s) for s in range(n_steps)], rec, dtype)


def _shares(traj):
    x_test = torch.randn(5, 6, generator=torch.Generator().manual_seed(7), dtype=traj.dtype)
    att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(x_test)
    change = float((att.final - att.initial).abs().max())
    return att.completeness_error(), float(att._flat(att.residual).abs().max()) / change


def test_fp16_autocast_with_grad_scaler_records_the_unscaled_gradient():
    X, y = _data()
    reference = _model()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    _amp_loop(reference, ref_opt, torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3), X, y)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), grad_scaler=scaler)
    with rec:
        _amp_loop(model, opt, scaler, X, y, rec)
    traj = rec.trajectory
    assert traj.n_steps == N_STEPS
    for name, p in reference.named_parameters():  # recording does not perturb the fp32 masters
        assert torch.equal(traj.params(N_STEPS)[name], p.detach())
    steps = traj.manifest.steps
    assert [r.amp_scale for r in steps] == [1024.0] * 3 + [2048.0] * 3 + [4096.0] * 2
    assert {r.autocast for r in steps} == {"float16"}
    for s in range(N_STEPS):
        assert traj.grad_scale(s) == 1.0
        # independent: the update the optimizer made against the slow per-sample fp32 gradient
        idx, w = traj.batch(s)
        g = slow_batch_gradient(_model(), traj.params(s), F.cross_entropy, X, y, idx, w)
        d = traj.delta(s)
        num = sum(float((d[n].double() * -0.1 * g[n].double()).sum()) for n in g)
        den = sum(float(((0.1 * g[n].double()) ** 2).sum()) for n in g)
        assert num / den == pytest.approx(1.0, abs=5e-3)
    checked = traj.gradient_check()
    assert (checked[[0, 1, 4]] < 3e-2).all() and torch.isnan(torch.as_tensor(checked[[2, 3, 5, 6, 7]])).all()
    completeness, residual_share = _shares(traj)
    assert completeness <= 1e-10
    assert residual_share <= 5e-3  # autocast rounding of the gradients; measured 7.5e-4


def test_skipped_grad_scaler_steps_record_nothing_and_lose_nothing():
    X, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1e6, growth_interval=2)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), grad_scaler=scaler)
    with rec:
        taken = _amp_loop(model, opt, scaler, X, y, rec, n_steps=14)
    traj = rec.trajectory
    assert 0 < len(taken) < 14 and rec.skipped_batches == 14 - len(taken)
    assert traj.n_steps == len(taken)
    for s, idx in enumerate(taken):
        assert torch.equal(traj.batch(s)[0], idx)
        assert traj.grad_scale(s) == pytest.approx(1.0, abs=1e-6)  # 1/S rounded to float32 (S not a power of 2)
    assert traj.audit().max() < 1e-5
    completeness, residual_share = _shares(traj)
    assert completeness <= 1e-10 and residual_share <= 5e-3


def test_grad_scaler_without_grad_scaler_argument_is_refused():
    X, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with pytest.raises(TrajectoryError, match=r"Step 0: optimizer.step\(\) is called by torch.amp.GradScaler.step.*"
                                              r"Fix: TrajectoryRecorder\(\.\.\., grad_scaler=scaler\)"):
        with rec:
            _amp_loop(model, opt, scaler, X, y, rec)
    with pytest.raises(explaind.exceptions.ConfigError, match="grad_scaler must be a torch.amp.GradScaler"):
        explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", grad_scaler=1024.0)


def _manual_unscale_loop(model, opt, X, y, rec, scale=1024.0):
    """fp64, a manual loss scale undone by GradScaler.unscale_ (in place, no version bump), then optimizer.step()."""
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    for s in range(4):
        idx = _idx(s)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(X[idx]), y[idx])).backward()
        scaler.unscale_(opt)
        rec.log_batch(idx)
        opt.step()
        scaler._per_optimizer_states.clear()


def test_unscaled_gradient_is_measured_by_value_in_float64():
    X, y = _data(torch.float64)
    model = _model(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=[0])
    with rec:
        _manual_unscale_loop(model, opt, X, y, rec)
    traj = rec.trajectory
    for s in range(4):
        idx, w = traj.batch(s)
        g = slow_batch_gradient(_model(torch.float64), traj.params(s), F.cross_entropy, X, y, idx, w)
        for n, d in traj.delta(s).items():
            torch.testing.assert_close(d, -0.1 * traj.grad_scale(s) * g[n], rtol=1e-10, atol=1e-13)
        assert traj.grad_scale(s) == pytest.approx(1.0, abs=1e-12)


def test_unscaled_gradient_without_data_or_scaler_is_refused():
    X, y = _data(torch.float64)
    model = _model(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy")
    with pytest.raises(TrajectoryError, match=r"Step 0: .*divided by exactly 1024, the signature of "
                                              r"torch.amp.GradScaler.unscale_.*grad_scaler=scaler"):
        with rec:
            _manual_unscale_loop(model, opt, X, y, rec)


def test_bf16_autocast_is_recorded_and_a_wrong_loss_names_autocast():
    X, y = _data()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s in range(6):
            idx = _idx(s)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    traj = rec.trajectory
    assert {r.autocast for r in traj.manifest.steps} == {"bfloat16"}
    assert all(traj.grad_scale(s) == 1.0 for s in range(6))
    completeness, residual_share = _shares(traj)
    assert completeness <= 1e-10 and residual_share <= 5e-2  # bf16 rounding of the gradients
    model, rec_loss = _model(), explaind.TrajectoryRecorder
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = rec_loss(model, opt, loss="mse", train_data=(X, F.one_hot(y, 3).float()))
    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match.*under loss "
                                              r"'mse'.*torch.autocast\(dtype=torch.bfloat16\).*gradient_tolerance="):
        with rec:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                F.cross_entropy(model(X[:8]), y[:8]).backward()
            rec.log_batch(torch.arange(8))
            opt.step()


CLASS_WEIGHTS = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)


def _weighted_ce(out, target):
    return F.cross_entropy(out, target, weight=CLASS_WEIGHTS)


def _weighted_run(loss, check, weights_for=None):
    X, y = _data(torch.float64)
    model = _model(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), check_gradients=check)
    with rec:
        for s in range(4):
            idx = _idx(s)
            opt.zero_grad()
            _weighted_ce(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx, None if weights_for is None else weights_for(y[idx]))
            opt.step()
    return rec


def test_class_weighted_loss_callable_is_caught_by_the_check():
    with pytest.raises(TrajectoryError, match=r"Step 0: Loss 'custom:_weighted_ce'.*class-weighted cross entropy.*"
                                              r"weights = w\[y\] / w\[y\]\.sum\(\)"):
        _weighted_run(_weighted_ce, "auto")


def test_class_weighted_loss_callable_with_the_check_off_warns():
    with pytest.warns(ExplaindWarning, match=r"Loss 'custom:_weighted_ce'.*Fix: pass per-sample weights"):
        rec = _weighted_run(_weighted_ce, False)
    assert torch.isnan(torch.as_tensor(rec.trajectory.gradient_check())).all()  # nothing was verified


def test_weighted_loop_logged_as_plain_mean_is_caught_by_the_gradient_check():
    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match the gradient "
                                              r"of the logged batch under loss 'cross_entropy'.*class-weighted"):
        _weighted_run("cross_entropy", "auto")


def test_class_weights_as_sample_weights_are_exact():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        rec = _weighted_run("cross_entropy", True, lambda t: CLASS_WEIGHTS[t] / CLASS_WEIGHTS[t].sum())
    traj = rec.trajectory
    assert float(torch.as_tensor(traj.gradient_check()).max()) <= 1e-12
    completeness, residual_share = _shares(traj)
    assert completeness <= 1e-10 and residual_share <= 1e-9


def test_store_keeps_the_check_mismatch_scale_and_autocast(tmp_path):
    X, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), grad_scaler=scaler,
                                      store=tmp_path / "run", check_gradients=2)
    with rec:
        _amp_loop(model, opt, scaler, X, y, rec, n_steps=4)
    loaded = explaind.Trajectory.load(tmp_path / "run", model=_model())
    checked = loaded.gradient_check()
    assert checked.shape == (4,) and (checked[[0, 2]] < 3e-2).all()
    assert torch.isnan(torch.as_tensor(checked[[1, 3]])).all()
    assert [r.amp_scale for r in loaded.manifest.steps] == [256.0] * 4
    assert {r.autocast for r in loaded.manifest.steps} == {"float16"}
    plain = explaind.trajectory.InMemoryTrajectory.from_steps(
        _model(), loss="mse", params=[loaded.params(0), loaded.params(1)], updates=[loaded.updates(0)],
        batches=[loaded.batch(0)])
    assert torch.isnan(torch.as_tensor(plain.gradient_check())).all()


def test_class_weighted_loss_callable_with_the_check_off_is_loud_in_the_residual_share():
    """Recorded anyway (the warning ignored): the explanation's residual share is large and names the loss."""
    with pytest.warns(ExplaindWarning, match="custom:_weighted_ce"):
        traj = _weighted_run(_weighted_ce, False).trajectory
    x_test = torch.randn(5, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with pytest.warns(ExplaindWarning, match=r"residual share .* > residual_tol=1e-07 \(auto: for a float64 run\)"
                                             r".*class-weighted loss.*no "
                                             r"gradient check ran.*check_gradients=True"):
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(x_test)
    assert att.meta["residual_share"] > 0.05
    with pytest.raises(TrajectoryError, match="residual share"):
        explaind.InfluenceEstimator(keep=("train",), device="cpu", strict=True).fit(traj).transform(x_test)
