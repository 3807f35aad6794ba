"""Buffers and model copies that change between the steps of a user's loop: exact, checked at that step, or warned.

A buffer that changes outside a training forward (a validation forward in training mode under ``torch.no_grad()``,
a hand edit) is seen at the next step's first forward: the recorder checks that step's gradient, which passes when
the forward only updates the buffer (batch-norm running statistics) and fails naming the buffers and
``model.eval()`` when it reads it (spectral norm's power iteration, a hand-set shift); without checks it warns.
Before, such a change was silent: a spectral-norm run with one training-mode validation pass left a residual share
of 1.8e-4, under the warning threshold. A deep copy of the model inside ``with rec:`` (an ``AveragedModel`` EMA)
failed with "cannot pickle '_thread.lock'"; its forwards are now invisible to the recorder.

Float64 runs of small tanh MLPs. Exact means: replica <= 1e-6 relative to the trained model in evaluation mode,
residual share <= 1e-9 with no warning, and ``keep=("train",)`` scores <= 1e-9 relative to the slow loop references
of ``replay_reference.py`` (each micro-batch's training forward replayed at the recorded buffers and random state,
one ``autograd.grad`` per sample), whose own residual from the actual parameter changes is <= 1e-12.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import rel_err
from replay_reference import BufferReference, ReplayReference
from test_stranger_optimizers import QUAD, assert_exact
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError

DT = torch.float64
N, STEPS, BATCH, EDITED = 24, 8, 6, 5  # the buffers change after step EDITED - 1, before step EDITED


def _data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, 4, generator=gen, dtype=DT)
    return X, torch.randint(0, 3, (N,), generator=gen), torch.randn(3, 4, generator=gen, dtype=DT)


class Shifted(nn.Module):
    """``Linear - Tanh - (minus a buffer) - Linear``; with ``track=True`` training forwards move the buffer toward
    the batch mean of the hidden units (a running statistic the forward reads)."""

    def __init__(self, track: bool = False):
        super().__init__()
        self.hidden, self.out, self.track = nn.Linear(4, 6), nn.Linear(6, 3), track
        self.register_buffer("shift", torch.zeros(6), persistent=False)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        if self.track and self.training:
            with torch.no_grad():
                self.shift.mul_(0.8).add_(0.2 * h.mean(0))
        return self.out(h - self.shift)


class Annealed(nn.Module):
    """``Linear - Tanh - Linear`` with the hidden units scaled by ``1 / (1 + 0.1 t)``, ``t`` an integer buffer that
    every training forward counts up (a schedule kept in the model, read in evaluation mode too)."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("t", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.t += 1
        return self.out(torch.tanh(self.hidden(x)) / (1.0 + 0.1 * self.t))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "batchnorm":
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    elif kind == "spectral":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), spectral_norm(nn.Linear(6, 3)))
    elif kind == "annealed":
        model = Annealed()
    elif kind == "dropout":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3))
    else:
        model = Shifted(track=kind == "tracked")
    return model.to(DT)


def _train(kind: str, between=None, **rec_kwargs):
    """Record STEPS SGD-momentum steps; ``between(s, model, X_val)`` runs after step ``s``."""
    X, y, X_test = _data()
    model = _model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), **rec_kwargs)
    gen = torch.Generator().manual_seed(5)
    with rec:
        for s in range(STEPS):
            idx = torch.randperm(N, generator=gen)[:BATCH]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
            if between is not None:
                between(s, model, X_test)
    return model.eval(), rec.trajectory, X_test


def _validate_in_training_mode(s, model, X_val):
    if s == EDITED - 1:
        with torch.no_grad():  # model.eval() forgotten
            model(X_val)


def _checked_steps(traj) -> list[int]:
    return [int(s) for s in np.flatnonzero(np.isfinite(np.asarray(traj.gradient_check())))]


def test_a_batchnorm_validation_forward_in_training_mode_is_checked_at_the_next_step_and_exact():
    model, traj, X_test = _train("batchnorm", _validate_in_training_mode)
    assert _checked_steps(traj) == [0, 1, 4, EDITED]  # the automatic steps, and the one after the pass
    assert float(np.asarray(traj.gradient_check())[EDITED]) <= 1e-7
    assert_exact(model, traj, X_test, BufferReference)


def test_a_spectral_norm_validation_forward_in_training_mode_is_refused_at_the_next_step_naming_model_eval():
    with pytest.raises(TrajectoryError, match=rf"Step {EDITED}: the gradient from backward\(\) does not match.*"
                                              rf"The buffers \['2\.parametrizations\.weight\.0\._u', "
                                              rf"'2\.parametrizations\.weight\.0\._v'\] changed since step "
                                              rf"{EDITED - 1} outside a training forward.*Fix: run validation "
                                              rf"forwards under model\.eval\(\)"):
        _train("spectral", _validate_in_training_mode)


def test_a_spectral_norm_validation_forward_in_evaluation_mode_is_exact_and_not_checked_again():
    def validate(s, model, X_val):
        if s == EDITED - 1:
            model.eval()
            with torch.no_grad():
                model(X_val)
            model.train()

    model, traj, X_test = _train("spectral", validate)
    assert _checked_steps(traj) == [0, 1, 4]
    assert_exact(model, traj, X_test, BufferReference)


def _edit_shift(s, model, X_val):
    if s == EDITED - 1:
        with torch.no_grad():
            model.shift.add_(0.3)


def test_a_buffer_edited_by_hand_between_steps_is_refused_at_that_step_even_when_not_scheduled():
    with pytest.raises(TrajectoryError, match=rf"Step {EDITED}: .*The buffers \['shift'\] changed since step "
                                              rf"{EDITED - 1}.*change a buffer the forward reads only inside the "
                                              r"forward \(record with capture_random=True\)"):
        _train("shifted", _edit_shift)


def test_a_buffer_edited_by_hand_without_gradient_checks_is_warned_about_naming_the_step():
    with pytest.warns(ExplaindWarning, match=rf"Step {EDITED}: the buffers \['shift'\] changed since step "
                                             rf"{EDITED - 1}.*The step is not checked"):
        _train("shifted", _edit_shift, check_gradients=False)


def test_a_buffer_the_forward_itself_updates_recorded_with_capture_random_is_exact():
    model, traj, X_test = _train("tracked", capture_random=True)
    assert not torch.equal(traj.buffers(STEPS)["shift"], traj.buffers(0)["shift"])
    assert_exact(model, traj, X_test, BufferReference)


def test_an_integer_buffer_the_forward_counts_and_reads_is_part_of_the_replica_and_exact():
    # before, the engine left integer buffers at their start value: replica 94% off the trained model, residual
    # share 6e-16 (the engine agreed with itself), and only fidelity_report(model=...) could tell
    model, traj, X_test = _train("annealed", capture_random=True)
    assert [int(traj.buffers(s)["t"]) for s in range(STEPS + 1)] == list(range(STEPS + 1))
    assert_exact(model, traj, X_test, BufferReference)


def test_an_ema_copy_made_inside_the_recorder_and_run_in_training_mode_leaves_the_recording_exact():
    ema: dict[str, AveragedModel] = {}

    def between(s, model, X_val):
        # deep-copies the model with the recorder's hooks on it; its forward (training mode, gradients on)
        # draws dropout masks the recorder must not count as a training forward of the recorded model
        averaged = ema.setdefault("m", AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9)))
        averaged.update_parameters(model)
        averaged(X_val).sum()
        copy.deepcopy(model)  # a snapshot of the "best" model

    model, traj, X_test = _train("dropout", between)
    assert ema["m"].training and ema["m"].module[2].p == 0.3
    assert_exact(model, traj, X_test, ReplayReference)


def test_update_bn_after_the_last_step_inside_the_recorder_is_warned_about_and_measured_by_fidelity_report():
    X, _, X_test = _data()

    def recalibrate(s, model, X_val):
        if s == STEPS - 1:  # SWA's batch-norm recalibration after the last step, still inside `with rec:`
            torch.optim.swa_utils.update_bn([X[:12], X[12:]], model)

    with pytest.warns(ExplaindWarning, match=rf"After the last recorded step \({STEPS - 1}\) the buffers "
                                             r"\['1\.running_mean', '1\.running_var', '1\.num_batches_tracked'\] were "
                                             r"changed.*update_bn.*Fix: run such forwards under model\.eval\(\)"):
        model, traj, X_test = _train("batchnorm", recalibrate)
    recorded = copy.deepcopy(model)
    recorded.load_state_dict(traj.buffers(STEPS), strict=False)  # the model as the last step left it
    with torch.no_grad():
        as_recorded, as_now = recorded(X_test), model(X_test)
    assert float((as_recorded - as_now).abs().max()) > 1e-2  # the recalibration moved the outputs
    replica = explaind.KernelReplica(**QUAD).fit(traj)
    assert rel_err(replica.predict(X_test), as_recorded) <= 1e-6
    with pytest.warns(ExplaindWarning):
        report = replica.fidelity_report(X_test, model=model)
    assert report["model_vs_recorded"] > 1e-2
