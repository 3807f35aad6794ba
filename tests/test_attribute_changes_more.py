"""What the attribute watch sees beyond plain values (explaind/trajectory/_tensor_watch.py, _attribute_record.py,
explaind/estimators/_model_checks.py); docs/recording.md, "Python attributes changed between steps".

Each "refused" or "warned" case below passed silently before (the run then explained every step with the edited
model: silently inexact): a plain tensor attribute (``self.mask``, not a buffer) or one in a list changed between
steps, in place, through ``.data``, made under ``torch.inference_mode()`` or too large to clone; a config object's
field the forward reads; any of those, a temperature, a ``Dropout.p`` or a swapped module edited after ``with rec:``
and before explaining (in memory, and a store reopened in another process); a loss callable reading a trained
parameter with the recorder's checks off (the scores then held an autograd graph). An edit of ``train_data`` made
before ``with rec:`` was refused although exact. The "quiet" cases (tensors the forward only writes, views of
parameters, GPT-2 and BERT from config, a Lightning module, GPT-2 under the Trainer) must record and fit without a
warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_attribute_changes import (
    DT,
    FRAMEWORKS,
    STEPS,
    Model,
    bert_run,
    data,
    gpt2_run,
    record,
    replica_error,
)
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError

pytestmark = pytest.mark.usefixtures("one_thread")


class Masked(Model):
    """``Model`` times ``gates[0]`` plus ``mask``: plain tensors the forward reads (no buffers), and ``last``, which
    the forward only writes (a cached output kept for logging)."""

    def __init__(self, inference: bool = False):
        super().__init__()
        with torch.inference_mode() if inference else torch.no_grad():
            self.mask = torch.ones(3, dtype=DT)
        self.gates = [torch.ones(3, dtype=DT)]
        self.to(DT)
        self.wT = self.l2.weight.T  # a view of a parameter: recorded
        self.last = None

    def forward(self, x):
        out = super().forward(x) * self.gates[0] + self.mask + 0 * self.wT.sum()
        self.last = out.detach()
        return out


def no_warnings(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        return call(*args, **kwargs)


TENSOR_EDITS = {
    "in place": (lambda m: m.mask.mul_(2.0), r"mask \(Masked\): a Tensor of shape \(3,\) float64 -> a Tensor of "
                                            r"shape \(3,\) float64 \(values changed; a plain tensor attribute"),
    "reassigned": (lambda m: setattr(m, "mask", m.mask * 2.0), r"mask \(Masked\): a Tensor .*values changed"),
    "through .data": (lambda m: m.mask.data.mul_(2.0), r"mask \(Masked\): a Tensor .*values changed"),
    "in a list attribute": (lambda m: m.gates[0].add_(1.0), r"gates \(Masked\): \[tensor\(\[1\., 1\., 1\.\]"),
}


@pytest.mark.parametrize("case", list(TENSOR_EDITS))
def test_a_plain_tensor_attribute_the_forward_reads_changed_between_steps_is_refused_naming_register_buffer(case):
    edit, named = TENSOR_EDITS[case]
    with pytest.raises(TrajectoryError, match=named) as caught:
        record(Masked(), lambda m, s: edit(m) if s == 0 else None)
    text = str(caught.value)
    assert text.startswith("Step 1:") and "register_buffer('mask', mask)" in text, text


def test_a_tensor_made_under_inference_mode_has_no_version_counter_and_is_still_seen_by_its_checksum():
    model = Masked(inference=True)
    assert model.mask.is_inference()

    def edit(m, s):
        if s == 0:
            with torch.inference_mode():
                m.mask.mul_(2.0)

    with pytest.raises(TrajectoryError, match=r"mask \(Masked\): a Tensor .*values changed"):
        record(model, edit)


def test_a_large_plain_tensor_changed_in_place_cannot_be_set_back_and_is_refused_without_a_test(monkeypatch):
    from explaind.trajectory import _tensor_watch

    monkeypatch.setattr(_tensor_watch, "CLONE_BYTES", 8)  # the mask (24 bytes) is kept by reference, not cloned
    with pytest.raises(TrajectoryError, match=r"mask \(Masked\): .*changed in place, too large to set back"):
        record(Masked(), lambda m, s: m.mask.mul_(1.5) if s == 0 else None)


def test_tensors_the_forward_only_writes_and_views_of_parameters_raise_nothing_and_stay_exact():
    model = Masked()
    rec = no_warnings(record, model)
    assert rec.n_steps == STEPS and model.last is not None
    assert replica_error(model, rec) <= 1e-8


def test_checksums_see_a_reordering_and_a_single_bit():
    from explaind.trajectory import _tensor_watch

    t = torch.arange(6, dtype=torch.float32)
    base = _tensor_watch.checksum(t)
    assert _tensor_watch.checksum(t.flip(0)) != base
    bits = t.clone().view(torch.int32)
    bits[3] ^= 1
    assert _tensor_watch.checksum(bits.view(torch.float32)) != base
    assert _tensor_watch.checksum(t.clone()) == base


@dataclasses.dataclass
class Settings:
    temperature: float = 1.0
    note: str = "run"


class Configured(Model):
    """``Model`` divided by ``settings.temperature`` (a dataclass) and ``config.initializer_range`` (a Hugging Face
    config), both read by the forward; ``settings.note`` read by nothing."""

    def __init__(self):
        from transformers import GPT2Config

        super().__init__()
        self.settings, self.config = Settings(), GPT2Config(initializer_range=0.5)

    def forward(self, x):
        return super().forward(x) / self.settings.temperature * (2 * self.config.initializer_range)


@pytest.mark.parametrize(("edit", "named"), [
    (lambda m: setattr(m.settings, "temperature", 2.0),
     r"settings \(Configured\): Settings with temperature 1\.0 -> 2\.0"),
    (lambda m: setattr(m.config, "initializer_range", 0.25),
     r"config \(Configured\): GPT2Config with initializer_range 0\.5 -> 0\.25"),
])
def test_a_config_field_the_forward_reads_changed_between_steps_is_refused_naming_the_field(edit, named):
    with pytest.raises(TrajectoryError, match=named):
        record(Configured(), lambda m, s: edit(m) if s == 0 else None)


def test_a_config_field_the_forward_does_not_read_is_accepted():
    model = Configured()
    rec = no_warnings(record, model, lambda m, s: setattr(m.settings, "note", f"step {s}"))
    assert replica_error(model, rec) <= 1e-8


# ----------------------------------------------------------------- edits after `with rec:`
AFTER = {
    "temperature": (lambda m: setattr(m, "tau", 1.5), r"tau: 1\.0 -> 1\.5"),
    "Dropout.p": (lambda m: setattr(m.drop, "p", 0.3), r"drop\.p: 0\.0 -> 0\.3"),
    "module swapped": (lambda m: setattr(m, "act", nn.ReLU()),
                       r"_modules: \{l1: Linear, act: Tanh, .* -> \{l1: Linear, act: ReLU"),
    "plain tensor": (lambda m: m.mask.mul_(2.0), r"mask: <tensor \(3,\) float64 [0-9a-f]{12}> -> <tensor \(3,\) "),
    "config field": (lambda m: setattr(m.settings, "temperature", 2.0), r"settings\.temperature: 1\.0 -> 2\.0"),
}


class Both(Masked, Configured):
    pass


@pytest.mark.parametrize("case", list(AFTER))
def test_an_edit_after_recording_is_warned_about_at_fit_naming_it_its_values_and_the_fix(case):
    edit, named = AFTER[case]
    model = Both()
    rec = no_warnings(record, model)
    no_warnings(explaind.KernelReplica().fit, rec.trajectory)  # unchanged: quiet
    edit(model)
    with pytest.warns(ExplaindWarning, match=r"KernelReplica\.fit: the model's state outside its parameters and "
                                             r"buffers differs from the recording's last step: " + named) as caught:
        explaind.KernelReplica().fit(rec.trajectory)
    assert any("set them back" in str(w.message) and "ignore_attributes" in str(w.message) for w in caught)


def test_an_edit_after_recording_is_warned_about_at_load_and_an_ignored_name_is_not(tmp_path):
    model = Model()
    record(model, store=tmp_path / "run", ignore_attributes=["epoch"])
    model.tau, model.epoch = 2.0, 7
    with pytest.warns(ExplaindWarning, match=r"Trajectory\.load: .* tau: 1\.0 -> 2\.0\. ") as caught:
        explaind.Trajectory.load(tmp_path / "run", model=model, train_data=data())
    assert not any("epoch" in str(w.message) for w in caught)
    model.tau = 1.0
    traj = no_warnings(explaind.Trajectory.load, tmp_path / "run", model=model, train_data=data())
    no_warnings(explaind.KernelReplica().fit, traj)


def test_a_store_without_the_fingerprint_file_loads_as_before_and_a_failed_recording_leaves_none(tmp_path):
    model = Model()
    record(model, store=tmp_path / "run")
    (tmp_path / "run" / "attributes.json").unlink()  # a store recorded before the file existed
    model.tau = 2.0
    no_warnings(explaind.KernelReplica().fit, explaind.Trajectory.load(tmp_path / "run", model=model,
                                                                      train_data=data()))
    with pytest.raises(TrajectoryError):
        record(Model(), lambda m, s: setattr(m, "tau", 3.0), store=tmp_path / "run", overwrite=True)
    assert not (tmp_path / "run" / "attributes.json").exists()


SCRIPT = """
import sys, warnings
sys.path[:0] = {paths!r}
import explaind
from test_attribute_changes import Model, data
model = Model()
model.tau = {tau}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    explaind.KernelReplica().fit(explaind.Trajectory.load({store!r}, model=model, train_data=data()))
print([str(w.message)[:160] for w in caught if issubclass(w.category, explaind.exceptions.ExplaindWarning)])
"""


def test_a_store_reopened_in_another_process_compares_the_fingerprint_it_keeps(tmp_path):
    """The fingerprint is process-independent (names, repr of values, checksums): a fresh process building the
    model anew sees no difference, and the edited temperature."""
    model = Model()
    record(model, store=tmp_path / "run")
    entries = json.loads((tmp_path / "run" / "attributes.json").read_text())["entries"]
    assert entries["tau"] == "1.0" and entries["squash"].startswith("<")
    tests = str(Path(__file__).parent)
    paths = [str(Path(explaind.__file__).parent.parent), tests]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    got = [subprocess.run([sys.executable, "-c", SCRIPT.format(paths=paths, tau=tau, store=str(tmp_path / "run"))],
                          capture_output=True, text=True, env=env, check=True, timeout=300).stdout.strip()
           for tau in (1.0, 1.5)]
    assert got[0] == "[]", got
    assert "Trajectory.load: the model's state" in got[1] and "tau: 1.0 -> 1.5" in got[1], got


# ----------------------------------------------------------------- frameworks: no false alarm, at record and fit
def test_gpt2_and_bert_from_config_record_and_fit_without_a_false_alarm():
    for run in (gpt2_run, bert_run):
        no_warnings(explaind.KernelReplica(device="cpu").fit, no_warnings(run).trajectory)


def test_gpt2_config_fields_edited_mid_run_are_seen_tested_and_after_the_run_named():
    """``output_hidden_states`` and ``use_cache`` change no logit (accepted at record time: the test forward gives the
    same outputs); after the run the fit names the edited field."""
    rec = no_warnings(gpt2_run, lambda m, s: setattr(m.config, "output_hidden_states", s % 2 == 0))
    assert rec.n_steps == STEPS
    rec.model.config.use_cache = not rec.model.config.use_cache
    with pytest.warns(ExplaindWarning, match=r"config\.use_cache: (True -> False|False -> True)"):
        explaind.KernelReplica(device="cpu").fit(rec.trajectory)


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_a_framework_run_fits_without_a_false_alarm_from_its_plumbing(tmp_path, framework):
    callback, fit = FRAMEWORKS[framework][0](tmp_path, change=False)
    no_warnings(fit)
    no_warnings(explaind.KernelReplica(device="cpu").fit, callback.trajectory)


# ----------------------------------------------------------------- a loss reading a live parameter, checks off
def test_a_loss_reading_a_trained_parameter_with_checks_off_is_named_at_fit_and_the_scores_hold_no_graph():
    from _round5_cases import N_TRAIN, XV, YV
    from _round5_kit import fit, seeded
    from _round5_models import Uncertainty, uncertainty_loss

    model = seeded(Uncertainty)
    model, traj = fit(model, XV, YV, loss=uncertainty_loss(model), check_gradients=False)
    with pytest.warns(ExplaindWarning, match=r"InfluenceEstimator\.fit: the loss custom:.*reads the model's "
                                             r"parameter\(s\) \['log_var'\] directly.*Fix: return them from forward"):
        att = explaind.InfluenceEstimator(keep=("train",), residual_tol=1.0).fit(traj).transform(XV[N_TRAIN:])
    assert not att.values.requires_grad and not att.residual.requires_grad
    assert not att.regularization.requires_grad and att.values.grad_fn is None


def test_a_registered_loss_is_not_probed():
    model = Model()
    rec = record(model)
    no_warnings(explaind.InfluenceEstimator(keep=("train",)).fit, rec.trajectory)


# ----------------------------------------------------------------- train_data edited before the loop
def loop(model, opt, rec, X, y, edit_at=None, edit=None):
    with rec:
        for s in range(STEPS):
            if s == edit_at:
                edit()
            idx = torch.arange(6 * s, 6 * s + 6)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()


def recorder_on_edited_data(edit_at):
    X, y = data()
    X, y = X.clone(), y.clone()
    model = Model().to(DT).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    return model, opt, rec, X, y


def test_train_data_edited_after_the_recorder_is_built_and_before_the_loop_is_the_data_and_exact():
    model, opt, rec, X, y = recorder_on_edited_data(None)
    X.mul_(2.0)  # normalised in place before `with rec:`: the loop reads these rows from its first step
    y[:3] = 0
    no_warnings(loop, model, opt, rec, X, y)
    with torch.no_grad():
        truth = model.eval()(X)
    got = torch.as_tensor(explaind.KernelReplica(device="cpu", tol=1e-10).fit(rec.trajectory).predict(X))
    assert float((got - truth).abs().max() / truth.abs().max()) <= 1e-8


@pytest.mark.parametrize("edit_at", [0, 2])
def test_train_data_edited_inside_the_recorder_stays_refused(edit_at):
    """After ``with rec:`` the data is fingerprinted (and stored with ``store_data=True``): an edit before the first
    step or between steps is refused (at the next step that reads the data, at the latest when explaining)."""
    model, opt, rec, X, y = recorder_on_edited_data(edit_at)
    with pytest.raises(TrajectoryError, match=r"X was changed in place"):
        loop(model, opt, rec, X, y, edit_at, lambda: X.mul_(2.0))
        explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(rec.trajectory).transform(X[:2])


def test_fidelity_report_names_an_edit_of_the_recorded_model_and_not_another_model():
    model = Model()
    rec = record(model)
    est = no_warnings(explaind.KernelReplica(device="cpu").fit, rec.trajectory)
    model.tau = 1.5
    with pytest.warns(ExplaindWarning, match=r"KernelReplica\.fidelity_report: the model's state .* tau: 1\.0 -> 1\.5"):
        est.fidelity_report(data()[0], model=model)
    model.tau = 1.0
    other = torch.optim.swa_utils.AveragedModel(model)  # another layout: measured by the report, not compared
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        est.fidelity_report(data()[0], model=other)
    assert not any("differs from the recording" in str(w.message) for w in caught)


def test_the_model_put_in_evaluation_mode_after_training_is_no_edit():
    """A submodule that trained in another mode than the model (``act``, which reads no mode) and ``model.eval()``
    after training: the engine sets the modes itself, so no warning."""
    model = Model()
    model.act.eval()
    rec = no_warnings(record, model)
    model.eval()
    no_warnings(explaind.KernelReplica(device="cpu").fit, rec.trajectory)
