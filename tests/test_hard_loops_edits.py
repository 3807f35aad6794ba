"""Loops that change gradients or parameters behind the optimizer's back: refused with the fix, or warned loudly.

Parameters edited outside ``optimizer.step()`` (weight clipping, an EMA written into the model) are found by value
at the next step — ``p.data`` edits do not bump the version counter — and refused there with every earlier step
kept; an edit after the last step is warned about when recording ends. Gradient noise added to ``.grad`` is a
per-coordinate change and refused. A forgotten ``zero_grad`` is caught by the gradient check, and where no check
runs, the residual share flags it (warning, or an error with ``strict=True``), as it flags a loss changed at a step
the check skips. ``restore()`` warns when it replaces
the hyperparameters a resumed optimizer was built with; changing them after it is followed exactly.
The exactness helpers are those of tests/test_hard_loops.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_hard_loops import assert_exact, batches, data, make_model, plain_step, train

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError


def _edit_after(steps, edit):
    """A loop step that applies ``edit(model)`` under ``no_grad`` right after ``optimizer.step()`` at ``steps``."""
    def step(s, model, opt, X, y, idx, rec):
        plain_step(s, model, opt, X, y, idx, rec)
        if s in steps:
            with torch.no_grad():
                edit(model)
    return step


def _clip(model):
    for p in model.parameters():
        p.data.clamp_(-0.3, 0.3)  # through .data: no version bump


def _ema_into_model(model):
    model[0].weight.mul_(0.999).add_(0.001)


@pytest.mark.parametrize("edit, names", [(_clip, r"0\.weight \(relative change [0-9.e-]+\).*2\.weight"),
                                         (_ema_into_model, r"0\.weight \(relative change 0\.00")],
                         ids=["weight-clipping-via-data", "ema-written-in-place"])
def test_parameters_edited_between_steps_are_refused_keeping_the_recorded_steps(tmp_path, edit, names):
    with pytest.raises(TrajectoryError, match=rf"Step 3: the parameter\(s\) {names}.*changed outside "
                                              r"optimizer\.step\(\) since step 2 was recorded.*the 3 step\(s\) "
                                              r"recorded before are kept.*Fix: make such changes before `with rec:`"):
        train(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), step=_edit_after({2}, edit),
              store=tmp_path / "run")
    traj = explaind.Trajectory.load(tmp_path / "run", model=make_model(), train_data=data())
    assert traj.n_steps == 3 and not traj.manifest.complete
    traj.verify()


def test_an_edit_before_the_first_step_is_named_as_since_recording_started():
    X, y = data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with pytest.raises(TrajectoryError, match=r"Step 0: the parameter\(s\) 2\.bias .* since recording started"):
        with rec:
            model[2].bias.data.fill_(0.5)  # e.g. a checkpoint loaded inside `with rec:`
            plain_step(0, model, opt, X, y, batches()[0], rec)


def test_another_optimizer_moving_recorded_parameters_is_refused():
    X, y = data()
    model = make_model()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    other = torch.optim.SGD(model[0].parameters(), lr=0.1)  # not recorded: its updates are edits
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with pytest.raises(TrajectoryError, match=r"Step 1: the parameter\(s\) 0\.weight .*0\.bias .*another optimizer"):
        with rec:
            for s, idx in enumerate(batches()):
                plain_step(s, model, opt, X, y, idx, rec)
                other.step()
    assert rec.trajectory.n_steps == 1


def test_an_edit_after_the_last_step_is_warned_about_and_the_trajectory_ends_before_it():
    steps = len(batches())
    with pytest.warns(ExplaindWarning, match=rf"After the last recorded step \({steps - 1}\) the parameter\(s\) "
                                             rf"0\.weight .*explain theta_{steps}.*traj\.params\(traj\.n_steps\)"):
        model, traj = train(lambda ps: torch.optim.SGD(ps, lr=0.1), step=_edit_after({steps - 1}, _ema_into_model))
    final = traj.params(traj.n_steps)
    assert not torch.equal(final["0.weight"], model[0].weight.detach())
    assert torch.equal(final["2.weight"], model[2].weight.detach())
    with torch.no_grad():
        model[0].weight.copy_(final["0.weight"])  # the model the trajectory explains
    assert_exact(model, traj)


def test_noise_added_to_the_gradients_is_refused_naming_it():
    def noisy(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        for p in model.parameters():
            p.grad.add_(1e-3 * torch.randn_like(p))
        rec.log_batch(idx)
        opt.step()

    with pytest.raises(TrajectoryError, match=r"Step 0: .*changed by more than a global factor.*noise added to "
                                              r"\.grad cannot"):
        train(lambda ps: torch.optim.SGD(ps, lr=0.1), step=noisy)


def _no_zero_grad(s, model, opt, X, y, idx, rec):
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def test_a_forgotten_zero_grad_is_caught_by_the_gradient_check_and_otherwise_by_the_residual_share():
    with pytest.raises(TrajectoryError, match=r"Step 1: the gradient from backward\(\) does not match.*no gradient "
                                              r"carries over from an earlier backward"):
        train(lambda ps: torch.optim.SGD(ps, lr=0.1), step=_no_zero_grad)
    _, traj = train(lambda ps: torch.optim.SGD(ps, lr=0.1), step=_no_zero_grad, check_gradients=False)
    x = data()[0][:3]
    with pytest.raises(TrajectoryError, match=r"residual share 0\.[0-9]+ > residual_tol=1e-07 \(auto: for a float64 "
                                              r"run\).*no gradient check "
                                              r"ran — record with check_gradients=True"):
        explaind.InfluenceEstimator(keep=("train",), target=[0, 1, 2], strict=True, device="cpu").fit(traj).transform(x)


def test_a_loss_changed_at_a_step_the_check_skips_is_checked_and_refused_there():
    # before round 16 recorded, and flagged only by the residual share when explaining; the recorder now compares the
    # loss's derivative at the outputs at every step, so the step is checked and the smoothing named
    unchecked = 5  # "auto" checks steps 0, 1, 4, 16, ...

    def smoothed_once(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx], label_smoothing=0.2 if s == unchecked else 0.0).backward()
        rec.log_batch(idx)
        opt.step()

    with pytest.raises(TrajectoryError, match=r"Step 5: the gradient from backward\(\) does not match.*label "
                                              r"smoothing 0\.2"):
        train(lambda ps: torch.optim.SGD(ps, lr=0.1), step=smoothed_once)


def _stored_adam_run(store, steps):
    X, y = data()
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store)
    with rec:
        for s, idx in enumerate(batches()[:steps]):
            plain_step(s, model, opt, X, y, idx, rec)


def test_resuming_with_another_optimizer_config_warns_that_restore_replaced_it_and_later_changes_are_exact(tmp_path):
    store = tmp_path / "run"
    _stored_adam_run(store, 3)
    X, y = data()
    model = make_model(seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.8, 0.99))
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store, resume=True)
    replaced = (r"param_groups\[0\]\['lr'\]: 0\.05 -> 0\.01; "
                r"param_groups\[0\]\['betas'\]: \(0\.8, 0\.99\) -> \(0\.9, 0\.999\)")
    with pytest.warns(ExplaindWarning, match=rf"restore\(\) loaded the optimizer state of step 3.*{replaced}.*"
                                             r"set them in optimizer\.param_groups after restore\(\)"):
        assert rec.restore() == 3
    assert opt.param_groups[0]["lr"] == 0.01
    opt.param_groups[0]["lr"] = 0.05  # the new config, set where the warning says
    with rec:
        for s, idx in enumerate(batches()[3:], start=3):
            plain_step(s, model, opt, X, y, idx, rec)
    traj = explaind.Trajectory.load(store, model=make_model(), train_data=(X, y))
    assert traj.n_steps == len(batches())
    assert_exact(model, traj)


def test_resuming_with_the_recorded_config_restores_silently(tmp_path, recwarn):
    store = tmp_path / "run"
    _stored_adam_run(store, 2)
    X, y = data()
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store, resume=True)
    assert rec.restore() == 2
    assert not [w for w in recwarn if issubclass(w.category, ExplaindWarning)]
