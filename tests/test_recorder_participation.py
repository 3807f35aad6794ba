"""Which parameters a step moves: subsets, add_param_group, freezing and unfreezing, against float64 loop references.

Every case trains the same loop twice in float64: once plain (the reference) and once under the
recorder. The recorded final parameters must equal the reference's, and the kernel replica (the
decomposition without its residual) must reproduce the reference model's outputs: a parameter
that did not move at a step must be recorded as not moving, never as a data term.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import classification_data
from torch import nn

import explaind
from explaind.exceptions import TrajectoryError

N_STEPS = 6


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(s):
    return torch.randperm(24, generator=torch.Generator().manual_seed(100 + s))[:6]


def _loop(model, opt, X, y, before_step=None, rec=None, zero=None):
    """The user's loop; ``before_step(s, model, opt)`` changes what trains (before the step's backward)."""
    for s in range(N_STEPS):
        if before_step is not None:
            before_step(s, model, opt)
        (zero or opt.zero_grad)()
        idx = _batch(s)
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        if rec is not None:
            rec.log_batch(idx)
        opt.step()


def _run(make_opt, before_step=None, zero_model=False, **rec_kwargs):
    X, y = classification_data(n=24, d=4, classes=3, seed=5)
    reference = _model()
    ref_opt = make_opt(reference)
    _loop(reference, ref_opt, X, y, before_step, zero=reference.zero_grad if zero_model else None)
    model = _model()
    opt = make_opt(model)
    rec_kwargs.setdefault("check_gradients", True)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), **rec_kwargs)
    with rec:
        _loop(model, opt, X, y, before_step, rec, zero=model.zero_grad if zero_model else None)
    return rec.trajectory, reference


def _assert_exact(traj, reference):
    """Recorded theta_N is the reference's; replica (no residual) == reference outputs; completeness."""
    assert traj.n_steps == N_STEPS
    final = traj.params(N_STEPS)
    for name, p in reference.named_parameters():
        if name in final:
            assert torch.equal(final[name], p.detach()), name
        else:
            assert torch.equal(traj.constants()[name], p.detach()), name
    x_test = torch.randn(5, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(x_test)
    with torch.no_grad():
        expected = reference(x_test)
    flat = att._flat
    replica = att.initial + flat(att.values) + flat(att.regularization) + flat(att.quadrature_error)
    scale = float(expected.abs().max())
    assert float((replica - expected).abs().max()) / scale <= 1e-9
    assert att.completeness_error() <= 1e-10
    assert float(flat(att.residual).abs().max()) / float((att.final - att.initial).abs().max()) <= 1e-9
    assert traj.audit().max() <= 1e-12


def _still(u):
    """Whether a recorded update is the 'did not move' one (``P = 0``)."""
    return not isinstance(u.P, torch.Tensor) and u.P == 0.0


def _sgd(model, **kw):
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, **kw)


def test_optimizer_over_a_subset_of_the_trainable_parameters():
    # the loop zeroes only the optimizer's gradients: 2.* accumulate, are never stepped and must be ignored
    traj, reference = _run(lambda m: torch.optim.SGD(m[0].parameters(), lr=0.2, momentum=0.9))
    assert set(traj.param_names) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(_still(traj.updates(s)["2.weight"]) for s in range(N_STEPS))
    _assert_exact(traj, reference)


def _freeze_at_3(s, model, opt):
    if s == 3:
        model[0].weight.requires_grad_(False)


def test_parameter_frozen_mid_run():
    traj, reference = _run(lambda m: torch.optim.Adam(m.parameters(), lr=0.05), _freeze_at_3)
    assert [_still(traj.updates(s)["0.weight"]) for s in range(N_STEPS)] == [False] * 3 + [True] * 3
    _assert_exact(traj, reference)


def test_parameter_frozen_mid_run_with_zero_gradients_kept():
    # zero_grad(set_to_none=False): the frozen weight keeps a zero .grad, so SGD moves it by momentum alone
    def make(m):
        opt = _sgd(m)
        opt.zero_grad = lambda: torch.optim.SGD.zero_grad(opt, set_to_none=False)
        return opt

    traj, reference = _run(make, _freeze_at_3)
    u = traj.updates(4)["0.weight"]
    assert (u.a, u.b, u.n) == (pytest.approx(0.9), 0.0, 0.0) and u.P != 0.0
    _assert_exact(traj, reference)


def _add_group_at_2(s, model, opt):
    if s == 2:
        opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.05})


@pytest.mark.parametrize("zero_model", [False, True], ids=["optimizer-zero-grad", "model-zero-grad"])
def test_add_param_group_mid_run(zero_model):
    traj, reference = _run(lambda m: torch.optim.SGD(m[0].parameters(), lr=0.2, momentum=0.9), _add_group_at_2,
                           zero_model=zero_model)
    assert [traj.updates(s)["2.bias"].P for s in range(N_STEPS)] == [0.0, 0.0] + [pytest.approx(0.05)] * 4
    _assert_exact(traj, reference)


def test_add_param_group_with_an_accumulated_gradient_is_named():
    # the group joins after optimizer.zero_grad(), which never cleared 2.*: their .grad holds every backward
    X, y = classification_data(n=24, d=4, classes=3, seed=5)
    model = _model()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.2)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=True)
    with pytest.raises(TrajectoryError, match=r"Step 2: the gradient from backward\(\) does not match.*largest "
                                              r"differences: 2\.(weight|bias).*use model\.zero_grad\(\)"):
        with rec:
            for s in range(3):
                opt.zero_grad()
                _add_group_at_2(s, model, opt)
                idx = _batch(s)
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                rec.log_batch(idx)
                opt.step()
    assert rec.trajectory.n_steps == 2


def _unfreeze_at_2(s, model, opt):
    if s == 2:
        model[0].bias.requires_grad_(True)


def _frozen_bias_opt(m):
    m[0].bias.requires_grad_(False)
    return torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)


def test_unfreezing_a_parameter_frozen_at_the_start_is_refused_with_the_fix():
    X, y = classification_data(n=24, d=4, classes=3, seed=5)
    model = _model()
    opt = _frozen_bias_opt(model)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with pytest.raises(TrajectoryError, match=r"Step 2: optimizer.step\(\) would update 0\.bias, which had "
                                              r"requires_grad=False.*record_frozen=True"):
        with rec:
            _loop(model, opt, X, y, _unfreeze_at_2, rec)
    assert rec.trajectory.n_steps == 2
    assert torch.equal(model[0].bias, _model()[0].bias)  # the refused step did not run


def test_unfreezing_with_record_frozen_is_exact():
    traj, reference = _run(_frozen_bias_opt, _unfreeze_at_2, record_frozen=True)
    assert "0.bias" in traj.param_names and "0.bias" not in traj.constants()
    assert [_still(traj.updates(s)["0.bias"]) for s in range(N_STEPS)] == [True] * 2 + [False] * 4
    _assert_exact(traj, reference)


def test_leftover_gradient_on_a_parameter_no_backward_reached_is_refused():
    X, y = classification_data(n=24, d=4, classes=3, seed=5)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        idx = _batch(0)
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        opt.step()
        model[2].bias.grad = None
        model[0].weight.grad.fill_(0.5)  # a hand-set gradient; backward below does not reach 0.weight
        model[0].weight.requires_grad_(False)
        model[2].weight.grad = None
        with torch.no_grad():
            hidden = model[1](model[0](X[idx]))
        F.cross_entropy(model[2](hidden), y[idx]).backward()
        rec.log_batch(idx)
        with pytest.raises(TrajectoryError, match=r"Step 1: optimizer.step\(\) would update 0\.weight with a "
                                                  r"gradient that no backward\(\) of this step produced"):
            opt.step()
    assert rec.trajectory.n_steps == 1


def test_check_spreads_over_the_run_by_default():
    from explaind.trajectory._checks import AUTO_CHECK_EVERY, CheckSchedule

    auto = CheckSchedule("auto")
    due = [s for s in range(3000) if auto.due(s)]
    assert due == [0, 1, 4, 16, 64, 256, 1024, 2048] and AUTO_CHECK_EVERY == 1024
    resumed = CheckSchedule("auto", start=10)
    assert [s for s in range(10, 30) if resumed.due(s)] == [10, 11, 14, 26]
    assert [s for s in range(10) if CheckSchedule([1, 7]).due(s)] == [1, 7]
    assert [s for s in range(7) if CheckSchedule(3).due(s)] == [0, 3, 6]
    traj, _ = _run(_sgd, check_gradients="auto")
    checked = ~torch.isnan(torch.as_tensor(traj.gradient_check()))
    assert checked.tolist() == [True, True, False, False, True, False]
    assert float(torch.as_tensor(traj.gradient_check())[checked].max()) <= 1e-12
