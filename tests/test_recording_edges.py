"""Edits the recorder used to let through: frozen parameters changed by hand, ``maximize`` switched across a resume.

A parameter frozen when recording started is stored once, as a constant, and every step is evaluated at it; an
edit during recording (``p.data.mul_``, ``p.copy_``, ``load_state_dict``, a forward updating it as a running
statistic) is refused at the next step with every earlier step kept, and warned about after the last step — as
edits of trained parameters are (tests/test_hard_loops_edits.py). A run resumed with ``restore()`` and then
switched to the other ``maximize`` while momentum buffers exist is refused at its first step, as a switch mid-run
is (tests/test_hard_loops.py); without buffers the switch is exact. Exactness helpers: tests/test_hard_loops.py.
"""

from __future__ import annotations

import pytest
import torch
from test_hard_loops import assert_exact, batches, data, make_model, plain_step
from torch import nn

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError


def _frozen_model():
    model = make_model()
    model[0].weight.requires_grad_(False)
    return model


def _run_frozen(model, edit_at=None, edit=None, store=None, start_edit=None):
    """Record a loop over ``model`` (SGD over its trainable parameters); ``edit(model)`` after step ``edit_at``."""
    X, y = data()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store)
    with rec:
        if start_edit is not None:
            start_edit(model)
        for s, idx in enumerate(batches()):
            plain_step(s, model, opt, X, y, idx, rec)
            if s == edit_at:
                edit(model)
    return rec


def _mul_data(model):
    model[0].weight.data.mul_(0.9)  # through .data: no version bump


def _copy(model):
    model[0].weight.copy_(torch.zeros_like(model[0].weight))  # frozen: no no_grad needed


def _load_state_dict(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"] += 0.01
    model.load_state_dict(state)


@pytest.mark.parametrize("edit, change", [(_mul_data, r"0\.1\b"), (_copy, r"1\b"), (_load_state_dict, r"0\.0")],
                         ids=["p.data.mul_", "p.copy_", "load_state_dict"])
def test_a_frozen_parameter_edited_between_steps_is_refused_keeping_the_recorded_steps(tmp_path, edit, change):
    with pytest.raises(TrajectoryError, match=rf"Step 3: the frozen parameter\(s\) 0\.weight \(relative change "
                                              rf"{change}.*since step 2 was recorded.*requires_grad=False when the "
                                              r"recorder started.*stores them once, as constants.*the 3 step\(s\) "
                                              r"recorded before are kept.*Fix: make such changes before `with rec:`"):
        _run_frozen(_frozen_model(), edit_at=2, edit=edit, store=tmp_path / "run")
    traj = explaind.Trajectory.load(tmp_path / "run", model=_frozen_model(), train_data=data())
    assert traj.n_steps == 3 and not traj.manifest.complete
    assert torch.equal(traj.constants()["0.weight"], _frozen_model()[0].weight.detach())  # as stored at the start
    traj.verify()


def test_a_frozen_parameter_edited_inside_the_recorder_before_the_first_step_is_refused_at_step_0():
    with pytest.raises(TrajectoryError, match=r"Step 0: the frozen parameter\(s\) 0\.weight .*since recording "
                                              r"started"):
        _run_frozen(_frozen_model(), start_edit=_mul_data)


class _RunningScale(nn.Module):
    """Scales its input by a frozen parameter that its training forward updates as a running mean (no buffer)."""

    def __init__(self, width):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width, dtype=torch.float64), requires_grad=False)

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.scale.mul_(0.9).add_(0.1 * x.abs().mean(0))
        return x * self.scale


def test_a_forward_updating_a_frozen_parameter_is_refused_naming_the_buffer_fix():
    model = make_model()
    model.insert(2, _RunningScale(6))
    with pytest.raises(TrajectoryError, match=r"Step 0: the frozen parameter\(s\) 2\.scale .*a forward that updates "
                                              r"a parameter as a running statistic.*module\.register_buffer"):
        _run_frozen(model)


def test_a_frozen_parameter_edited_after_the_last_step_is_warned_about():
    steps = len(batches())
    with pytest.warns(ExplaindWarning, match=rf"After the last recorded step \({steps - 1}\) the frozen parameter\(s\)"
                                             rf" 0\.weight .*as stored when recording started.*traj\.constants\(\)"):
        rec = _run_frozen(_frozen_model(), edit_at=steps - 1, edit=_mul_data)
    assert torch.equal(rec.trajectory.constants()["0.weight"], _frozen_model()[0].weight.detach())


def test_a_frozen_parameter_left_alone_is_exact_and_not_flagged(recwarn):
    model = _frozen_model()
    rec = _run_frozen(model)
    assert not [w for w in recwarn if issubclass(w.category, ExplaindWarning)]
    assert_exact(model, rec.trajectory)


def test_a_trainable_parameter_outside_every_optimizer_group_edited_by_hand_is_refused():
    X, y = data()
    model = make_model()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)  # model[0] trainable, recorded as not moving
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with pytest.raises(TrajectoryError, match=r"Step 2: the parameter\(s\) 0\.bias .*changed outside "
                                              r"optimizer\.step\(\) since step 1 was recorded"):
        with rec:
            for s, idx in enumerate(batches()):
                plain_step(s, model, opt, X, y, idx, rec)
                if s == 1:
                    model[0].bias.data.add_(0.1)
    assert rec.n_steps == 2


# ----------------------------------------------------------------- maximize across a resume
def _resume(store, make_opt, recorded, resumed, first=3):
    """Record ``first`` steps with ``maximize=recorded``, resume with ``restore()``, set ``maximize=resumed``, go on."""
    X, y = data()
    model = make_model()
    opt = make_opt(model.parameters(), maximize=recorded)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store)
    with rec:
        for s, idx in enumerate(batches()[:first]):
            plain_step(s, model, opt, X, y, idx, rec)
    model = make_model(seed=5)
    opt = make_opt(model.parameters(), maximize=recorded)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store, resume=True)
    assert rec.restore() == first
    for group in opt.param_groups:
        group["maximize"] = resumed  # where restore()'s warning says new values go
    with rec:
        for s, idx in enumerate(batches()[first:], start=first):
            plain_step(s, model, opt, X, y, idx, rec)
    return model, explaind.Trajectory.load(store, model=make_model(), train_data=(X, y))


def _sgd_momentum(ps, maximize):
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9, maximize=maximize)


def _adam(ps, maximize):
    return torch.optim.Adam(ps, lr=0.01, maximize=maximize)


def _adamw(ps, maximize):
    return torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, maximize=maximize)


@pytest.mark.parametrize("make_opt, buffer, recorded", [
    (_sgd_momentum, "momentum_buffer", False), (_sgd_momentum, "momentum_buffer", True),
    (_adam, "exp_avg", False), (_adamw, "exp_avg", True),
], ids=["sgd-momentum-off-to-on", "sgd-momentum-on-to-off", "adam-off-to-on", "adamw-on-to-off"])
def test_maximize_switched_after_restore_while_buffers_exist_is_refused_at_the_first_resumed_step(
        tmp_path, make_opt, buffer, recorded):
    store = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"param_groups\[0\]\['maximize'\] was switched from {recorded} to "
                                          rf"{not recorded} while its parameters hold '{buffer}' built with "
                                          rf"maximize={recorded} \(at the previous step, or in the recorded run's "
                                          rf"optimizer state that restore\(\) loaded\).*Fix: keep maximize fixed"):
        _resume(store, make_opt, recorded, not recorded)
    traj = explaind.Trajectory.load(store, model=make_model(), train_data=data())
    assert traj.n_steps == 3  # the recorded steps are kept; nothing of the refused one
    traj.verify()


def test_maximize_switched_after_restore_without_buffers_is_exact(tmp_path):
    model, traj = _resume(tmp_path / "run", lambda ps, maximize: torch.optim.SGD(ps, lr=0.1, maximize=maximize),
                          False, True)
    assert traj.n_steps == len(batches())
    assert_exact(model, traj)


def test_maximize_kept_across_restore_is_exact(tmp_path):
    model, traj = _resume(tmp_path / "run", _adam, True, True)
    assert traj.n_steps == len(batches())
    assert_exact(model, traj)
