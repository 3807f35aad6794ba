"""Seventh numerics round: the warnings of float32, half-precision and untuned-learning-rate runs name the right
cause, and an honest run in a coarse dtype is not accused of holding other weights.

Each test failed before its fix (docs/engine.md, "Residual share", "float32 and half-precision runs"):

* a float16/bfloat16 model holding exactly the recorded final state: ``fidelity_report(X, model=model)`` warned that
  the model held other weights (its own rounding, 5e-4 to 4e-3 of the outputs);
* Adam at lr 1 on a ReLU MLP: the replica missed the trained model by 8 % of the outputs while the only warning gave
  1e-3 (the largest error relative to a step's own change);
* float32 updates rounded away (lr 1e-12): a residual share of 1.6e297, blamed on a Python attribute;
* a diverging run (SGD lr 200): a residual share of 0.2 (float32, steps before the NaN) or 1.5e50 (float64), blamed
  on a Python attribute.

The figures the tests compare with are computed independently: the parameters read from the trajectory, the
model evaluated at them in float64.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _numerics7_kit import diverging, explain, half_model, relu_adam_lr1, rounded_away

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError

pytestmark = pytest.mark.usefixtures("one_thread")


def _norm(params: dict[str, torch.Tensor]) -> float:
    return float(torch.cat([t.double().reshape(-1) for t in params.values()]).norm())


def _final_outputs(model: torch.nn.Module, traj, X: torch.Tensor) -> torch.Tensor:
    """``f(x; theta_stop)`` in float64 from the trajectory's last parameters, on a float64 copy of ``model``."""
    wide = copy.deepcopy(model).double().eval()
    wide.load_state_dict({k: v.double() for k, v in traj.params(traj.n_steps).items()}, strict=False)
    with torch.no_grad():
        return wide(X.double())


def _residual_warning(messages: list[str]) -> str:
    (message,) = [m for m in messages if "residual share" in m]
    return message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_model_holding_the_recorded_state_is_not_said_to_hold_other_weights(dtype):
    model, traj, X = half_model(dtype)
    truth = _final_outputs(model, traj, X)
    with torch.no_grad():
        own = float((model.eval()(X).double() - truth).abs().max())
    assert own > 1e-4 * float(truth.abs().max())  # its own rounding, far above the float64 bound of the warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = explaind.KernelReplica(device="cpu").fit(traj).fidelity_report(X, model=model)
    assert not [w for w in caught if "differs from the recorded final state" in str(w.message)]
    assert report["model_vs_recorded"] > 1e-6 and report["max_rel_error"] <= 1e-12
    with torch.no_grad():  # other weights in the same dtype are still named
        model[0].bias.add_(0.25)
    with pytest.warns(ExplaindWarning, match="differs from the recorded final state"):
        explaind.KernelReplica(device="cpu").fit(traj).fidelity_report(X, model=model)


def test_the_replica_error_is_warned_when_the_per_step_figure_understates_it():
    model, traj, X = relu_adam_lr1(steps=40)
    truth = _final_outputs(model, traj, X)
    replica = explaind.KernelReplica(device="cpu").fit(traj)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = replica.fidelity_report(X)
        predicted = torch.as_tensor(replica.predict(X))
    error = float((predicted - truth).abs().max() / truth.abs().max())
    worst = float(max(report["relative_quadrature_error"]))
    assert error > 10 * worst and worst > 1e-7  # steps above tol, and the replica far worse than their figure
    messages = [str(w.message) for w in caught]
    (total,) = {m for m in messages if "the replica misses f(x; theta_stop) by" in m}
    assert f"by {error:.2g} (relative to the largest output)" in total and f"({worst:.2g} of that step's" in total
    after = [s for s, e in zip(report["steps"], report["relative_quadrature_error"], strict=True) if e > 1e-7][-1] + 1
    assert f"steps=({after}, stop)" in total
    with warnings.catch_warnings():  # the window it names is within the replica's bounds, and silent
        warnings.simplefilter("error", ExplaindWarning)
        later = explaind.KernelReplica(device="cpu", steps=(int(after), None)).fit(traj).fidelity_report(X)
    assert later["max_rel_error"] <= 1e-6


def test_updates_rounded_away_are_named_with_the_share_of_nothing():
    model, traj, X = rounded_away(1e-12)
    assert all(torch.equal(traj.params(0)[n], traj.params(traj.n_steps)[n]) for n in traj.param_names)
    got = explain(model, traj, X)
    message = _residual_warning(got["warnings"])
    assert "The outputs hardly moved: the explained change is 0 of the outputs" in message
    first = message.split("Likely causes: (1) ")[1]
    assert first.startswith(f"at {traj.n_steps} step(s) of the window (0, 1, 2, 3, 4, 5 ...) the stored parameters "
                            f"did not move at all") and "train in float64" in first.split("; (2)")[0]


def test_updates_partly_rounded_away_name_the_float32_rounding_of_tiny_updates():
    model, traj, X = rounded_away(1e-9)
    moved = [s for s in range(traj.n_steps) if not all(torch.equal(traj.params(s)[n], traj.params(s + 1)[n])
                                                       for n in traj.param_names)]
    assert 0 < len(moved) < traj.n_steps
    message = _residual_warning(explain(model, traj, X)["warnings"])
    assert f"(1) at {traj.n_steps - len(moved)} step(s) of the window" in message
    assert "(2) the updates are at the rounding level of the float32 parameters" in message
    assert "the run was trained in float32" not in message  # not the float32 gradients: the updates' size


def test_a_diverged_float64_run_is_named_with_its_growth():
    model, traj, error, X = diverging(torch.float64)
    assert error is None and traj.n_steps == 12
    norms = [_norm(traj.params(s)) for s in range(traj.n_steps + 1)]
    peak = max(range(len(norms)), key=norms.__getitem__)
    first = next(s for s, n in enumerate(norms) if n > 1e3 * norms[0])
    message = _residual_warning(explain(model, traj, X)["warnings"])
    assert (f"(1) the run diverged: |theta_s| grew from {norms[0]:.3g} to {norms[peak]:.3g} at step {peak} "
            f"(beyond 1000x its start first at step {first})") in message
    assert f"steps=(0, {first - 1})" in message and "the gradient check passed" not in message.split("; (2)")[0]


def test_a_float32_run_that_diverges_to_nan_keeps_its_steps_and_names_the_growth_and_float32():
    model, traj, error, X = diverging(torch.float32)
    assert isinstance(error, TrajectoryError) and str(error).startswith("Step 6: the gradient of")
    assert "NaN or inf" in str(error) and traj.n_steps == 6  # the steps before it are kept
    message = _residual_warning(explain(model, traj, X)["warnings"])
    assert "(1) the run diverged: |theta_s| grew from" in message and "(2) the run was trained in float32" in message
    assert "explain the steps before it grew (steps=(0, 1))" in message
    for window in [(0, 1), (0, 4)]:  # before the growth, and up to the outputs' peak: no residual beyond float32's
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            att = explaind.InfluenceEstimator(keep=("train",), device="cpu", steps=window).fit(traj).transform(X)
        assert att.meta["residual_share"] <= 1e-6 and att.completeness_error() <= 1e-12
        assert not [w for w in caught if "residual share" in str(w.message)]


def test_float32_master_weights_fed_by_a_half_precision_copy_are_refused_naming_autocast():
    """The "master weights" pattern by hand: a bfloat16 copy runs forward and backward, its gradients are copied
    into the float32 model's ``.grad`` and the float32 optimizer steps. No backward of the recorded model produced
    those gradients, so the step is refused; before, the message's only advice was ``loss.backward()``, which is
    what the loop already does (on the copy)."""
    from _numerics7_kit import data, mlp

    X, y = data()
    masters, half = mlp(), mlp().to(torch.bfloat16)
    opt = torch.optim.SGD(masters.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(masters, opt, loss="cross_entropy", train_data=(X, y))
    with pytest.raises(TrajectoryError, match=r"Step 0: .*no backward\(\).*Float32 master weights.*torch\.autocast"):
        with rec:
            with torch.no_grad():
                for a, b in zip(half.parameters(), masters.parameters(), strict=True):
                    a.copy_(b)
            idx = torch.arange(16)
            torch.nn.functional.cross_entropy(half(X[idx].bfloat16()), y[idx]).backward()
            for a, b in zip(half.parameters(), masters.parameters(), strict=True):
                b.grad = a.grad.float()
            rec.log_batch(idx)
            opt.step()
