"""Every bad input of the recorder fails with a message naming the value, what is allowed and the fix."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import batches, mlp, regression_data

import explaind
from explaind.exceptions import ConfigError, TrajectoryError, UnknownEntryError


def _setup(**kwargs):
    X, y = regression_data(n=12)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs.setdefault("train_data", (X, y))
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", **kwargs)
    return X, y, model, opt, rec


def _backward(model, X, y, idx, loss_fn=F.mse_loss):
    loss_fn(model(X[idx]), y[idx]).backward()


def test_step_without_log_batch_names_the_fix_and_keeps_earlier_steps():
    X, y, model, opt, rec = _setup()
    with pytest.raises(TrajectoryError, match=r"Step 1: .*call rec\.log_batch\(indices\) before optimizer\.step\(\)"):
        with rec:
            idx = torch.arange(4)
            _backward(model, X, y, idx)
            rec.log_batch(idx)
            opt.step()
            opt.zero_grad()
            _backward(model, X, y, idx)
            opt.step()
    assert rec.trajectory.n_steps == 1
    assert not opt._optimizer_step_pre_hooks  # removed although the block raised
    opt.step()  # the optimizer works normally again


@pytest.mark.parametrize(
    "indices, message",
    [
        (torch.tensor([0, 12]), r"index 12 is out of range for train_data of 12 samples \(allowed: 0\.\.11\)"),
        (torch.tensor([-1, 2]), r"index -1 is out of range"),
        (torch.tensor([0.0, 1.0]), r"indices must be integer dataset positions, got dtype torch\.float32"),
        (torch.ones(12, dtype=torch.bool), r"got dtype torch\.bool.*not a mask"),
        (torch.zeros(2, 2, dtype=torch.long), r"non-empty 1-D tensor, got shape \(2, 2\)"),
        (torch.tensor([], dtype=torch.long), r"got 0 indices \(a batch of 0 samples.*Fix: skip such a batch"),
        ("abc", r"indices of type str cannot be read as integers"),
    ],
)
def test_bad_indices(indices, message):
    X, y, model, opt, rec = _setup()
    with rec:
        with pytest.raises(TrajectoryError, match=message):
            rec.log_batch(indices)


def test_bad_weights():
    X, y, model, opt, rec = _setup()
    with rec:
        with pytest.raises(TrajectoryError, match=r"weights must be a float tensor of shape \(3,\).*shape \(2,\)"):
            rec.log_batch(torch.arange(3), torch.ones(2))
        with pytest.raises(TrajectoryError, match="weights contain NaN or inf"):
            rec.log_batch(torch.arange(2), torch.tensor([1.0, float("nan")]))


def test_log_batch_outside_the_context():
    X, y, model, opt, rec = _setup()
    with pytest.raises(TrajectoryError, match="outside the recorder: wrap the training loop in `with rec:`"):
        rec.log_batch(torch.arange(3))


def test_nan_gradient_names_the_step_and_parameter():
    X, y, model, opt, rec = _setup()
    X = X.clone()
    X[5] = float("nan")
    with pytest.raises(TrajectoryError, match=r"Step 1: the gradient of 0\.weight.*contains NaN or inf"):
        with rec:
            for idx in (torch.tensor([0, 1]), torch.tensor([4, 5])):
                opt.zero_grad()
                _backward(model, X, y, idx)
                rec.log_batch(idx)
                opt.step()
    assert rec.trajectory.n_steps == 1


def test_unknown_optimizer_lists_adapters_and_plugin_route():
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1)
    with pytest.raises(UnknownEntryError) as info:
        explaind.TrajectoryRecorder(model, opt, loss="mse")
    msg = str(info.value)
    assert "No optimizer adapter handles torch.optim.lbfgs.LBFGS" in msg
    assert re.search(r"Registered adapters: adadelta, adafactor, adagrad, adam, adamax, adamw, asgd, hf_adafactor, "
                     r"nadam, radam, rmsprop, rprop, sgd \(", msg)
    assert "entry-point group" in msg


def test_unknown_loss_suggests_the_closest_name():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UnknownEntryError, match=r"Unknown loss 'cross_entopy'.*Did you mean 'cross_entropy'"):
        explaind.TrajectoryRecorder(model, opt, loss="cross_entopy")
    with pytest.raises(ConfigError, match="loss=None"):
        explaind.TrajectoryRecorder(model, opt, loss=None)


def test_optimizer_over_other_parameters_is_refused():
    model, other = mlp(), mlp(hidden=4)
    opt = torch.optim.SGD(list(model.parameters()) + [other[0].weight], lr=0.1)
    with pytest.raises(TrajectoryError, match=r"1 parameter tensor\(s\) that are not parameters of the model: "
                                              r"group 0 position 4 shape \(4, 3\)"):
        explaind.TrajectoryRecorder(model, opt, loss="mse")


def test_bad_options():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"audit='yes' is not allowed. Choose one of: 'auto', True, False"):
        explaind.TrajectoryRecorder(model, opt, loss="mse", audit="yes")
    with pytest.raises(ConfigError, match=r"check_gradients=0 is not allowed"):
        explaind.TrajectoryRecorder(model, opt, loss="mse", check_gradients=0)
    with pytest.raises(ConfigError, match=r"check_gradients=True needs the training data: pass train_data"):
        explaind.TrajectoryRecorder(model, opt, loss="mse", check_gradients=True)
    with pytest.raises(ConfigError, match=r"resume=True needs store="):
        explaind.TrajectoryRecorder(model, opt, loss="mse", resume=True)
    with pytest.raises(ConfigError, match="optimizer must be a torch.optim.Optimizer, got str"):
        explaind.TrajectoryRecorder(model, "sgd", loss="mse")


def _one_step(rec, model, opt, X, y, used, logged, loss_fn=F.mse_loss):
    opt.zero_grad()
    for idx in used:
        loss_fn(model(X[idx]), y[idx]).backward()
    for idx in logged:
        rec.log_batch(idx)
    opt.step()


@pytest.mark.parametrize(
    "case",
    ["wrong loss", "wrong batch", "unlogged micro-batch"],
)
def test_gradient_check_catches_mistakes(case):
    X, y, model, opt, rec = _setup(check_gradients=True)
    a, b = torch.arange(0, 4), torch.arange(4, 8)
    with pytest.raises(TrajectoryError, match=r"Step 1: the gradient from backward\(\) does not match the gradient "
                                              r"of the logged batch under loss 'mse'.*check_gradients=False"):
        with rec:
            _one_step(rec, model, opt, X, y, [a], [a])
            if case == "wrong loss":
                _one_step(rec, model, opt, X, y, [b], [b], loss_fn=F.l1_loss)
            elif case == "wrong batch":
                _one_step(rec, model, opt, X, y, [b], [a])
            else:
                _one_step(rec, model, opt, X, y, [a, b], [a])
    assert rec.trajectory.n_steps == 1


def test_per_coordinate_clipping_is_refused():
    X, y, model, opt, rec = _setup()
    with pytest.raises(TrajectoryError, match=r"Step 0: .*changed by more than a global factor.*clip_grad_value_"):
        with rec:
            idx = torch.arange(6)
            _backward(model, X, y, idx)
            torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
            rec.log_batch(idx)
            opt.step()


def test_trajectory_before_recording():
    X, y, model, opt, rec = _setup()
    with pytest.raises(TrajectoryError, match="Nothing recorded yet"):
        _ = rec.trajectory


def test_recording_continues_after_a_refused_step():
    X, y, model, opt, rec = _setup()
    with rec:
        with pytest.raises(TrajectoryError, match="Step 0"):
            _backward(model, X, y, torch.arange(4))
            opt.step()
        opt.zero_grad()
        for idx in batches(12, 4):
            _one_step(rec, model, opt, X, y, [idx], [idx])
    assert rec.trajectory.n_steps == 3
