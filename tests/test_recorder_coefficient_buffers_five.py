"""The RMSprop, Adagrad, NAdam, RAdam and Adamax adapters in a dense store: their tensor coefficients (``P``, or
RMSprop's gain ``b`` with momentum) go into the recorder's pool buffers, filled by a deferred job (audit off) or at
the step (audit on). Every coefficient of every step equals, bit for bit, the new tensor the in-memory recorder
keeps, also after a resume and against a sparse store's replay; the buffers are reused; a failing deferred job is
the step's error; an unusable buffer is ignored with the same bits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _recording_helpers import classifier_setup, classifier_step, fail_third_call, spy_coefficient_buffers
from explaind_optimizers import _pooled
from explaind_optimizers.adagrad import AdagradAdapter
from explaind_optimizers.adamax import AdamaxAdapter
from explaind_optimizers.nadam import NAdamAdapter
from explaind_optimizers.radam import RAdamAdapter
from explaind_optimizers.rmsprop import RMSpropAdapter

import explaind
from explaind.exceptions import TrajectoryError
from explaind.recurrence import LinearUpdate
from explaind.trajectory import _coefficients
from explaind.trajectory.disk import DiskTrajectory

STEPS = 10
#: name -> (optimizer class, options, {step: group options set before that step})
VARIANTS = {
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01}, {}),
    # momentum (tensor b), centered, maximize, L2; momentum switched off at step 6 (stale buffer, tensor P)
    "rmsprop-momentum": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.9, "centered": True, "maximize": True,
                                               "weight_decay": 0.1}, {6: {"momentum": 0.0}}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.1, "maximize": True,
                                      "initial_accumulator_value": 0.1}, {}),
    "nadam": (torch.optim.NAdam, {"lr": 0.01, "weight_decay": 0.1}, {}),
    "nadam-foreach": (torch.optim.NAdam, {"lr": 0.01, "foreach": True, "decoupled_weight_decay": True,
                                          "weight_decay": 0.1}, {}),
    # steps 1-5 unrectified (scalar P), later rectified (tensor P)
    "radam": (torch.optim.RAdam, {"lr": 0.01, "maximize": True}, {}),
    "radam-foreach": (torch.optim.RAdam, {"lr": 0.01, "foreach": True, "weight_decay": 0.1}, {}),
    "adamax": (torch.optim.Adamax, {"lr": 0.01, "maximize": True, "weight_decay": 0.05}, {}),
}
ONE_EACH = ("rmsprop-momentum", "adagrad", "nadam", "radam", "adamax")
FIELDS = [f.name for f in dataclasses.fields(LinearUpdate)]


def _setup(variant: str, dtype: torch.dtype):
    optimizer, options, _ = VARIANTS[variant]
    return classifier_setup(optimizer, options, dtype)


def _step(variant, model, opt, X, y, s, rec=None):
    for key, value in VARIANTS[variant][2].get(s, {}).items():
        opt.param_groups[0][key] = value
    classifier_step(model, opt, X, y, s, rec)


def _recorded(variant, dtype, store=None, steps=STEPS, **options):
    model, opt, X, y = _setup(variant, dtype)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store,
                                      fsync=False, check_gradients=False, **options)
    with rec:
        for s in range(steps):
            _step(variant, model, opt, X, y, s, rec)
    return rec


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def _assert_same_updates(got, want, where) -> int:
    """Every field of every parameter's update identical (tensors bit for bit); returns the tensors compared."""
    assert set(got) == set(want), where
    tensors = 0
    for name, w in want.items():
        for field in FIELDS:
            a, b = getattr(got[name], field), getattr(w, field)
            assert isinstance(a, torch.Tensor) == isinstance(b, torch.Tensor), (where, name, field)
            if isinstance(b, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), (where, name, field)
                tensors += 1
            else:
                assert a == b, (where, name, field, a, b)
    return tensors


def _assert_same_run(got, want, steps=STEPS) -> int:
    assert got.n_steps == want.n_steps == steps
    tensors = 0
    for s in range(steps):
        tensors += _assert_same_updates(got.updates(s), want.updates(s), s)
        for name, theta in want.params(s + 1).items():
            assert torch.equal(got.params(s + 1)[name], theta), (s, name)
    return tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pooled_coefficients_equal_the_in_memory_ones_bit_for_bit(tmp_path, variant, dtype):
    memory = _recorded(variant, dtype)
    assert memory._coefs is None  # in memory every coefficient is a new tensor
    deferred = _recorded(variant, dtype, store=tmp_path / "deferred", audit=False)
    assert deferred._coefs is not None and deferred._coefs._jobs is not None  # pooled, filled on the copier
    at_step = _recorded(variant, dtype, store=tmp_path / "at-step")
    assert at_step._coefs is not None and at_step._coefs._jobs is None  # pooled, filled at the step (audit on)
    assert isinstance(deferred.trajectory, DiskTrajectory)
    tensors = _assert_same_run(deferred.trajectory, memory.trajectory)
    assert tensors >= 4 * (STEPS - 5)  # RAdam's first five steps have a scalar P; every other step four tensors
    _assert_same_run(at_step.trajectory, memory.trajectory)
    assert np.array_equal(at_step.trajectory.audit(), memory.trajectory.audit())  # the audit read the same P


@pytest.mark.parametrize("variant", ONE_EACH)
def test_dense_store_reuses_the_coefficient_buffers(tmp_path, monkeypatch, variant):
    handed = spy_coefficient_buffers(monkeypatch)
    _recorded(variant, torch.float32, store=tmp_path / "run", audit=False, background_writes=False)
    tensor_steps = STEPS - 5 if variant == "radam" else STEPS  # RAdam asks for a buffer once P is a tensor
    assert len(handed) == tensor_steps * 4
    assert len({id(b) for b in handed}) == 4  # written inline: each step's buffers are back before the next


def _interrupted_and_resumed(variant, dtype, store, monkeypatch, pooled: bool):
    """Recorded to ``store`` until step 4 (the loop raises), then restored and finished; ``pooled=False``: the
    dense store computes new coefficient tensors (no buffers lent), as in memory."""
    if not pooled:
        monkeypatch.setattr(_coefficients.CoefficientBuffers, "for_adapter", classmethod(lambda *a, **k: None))
    model, opt, X, y = _setup(variant, dtype)
    options = dict(loss="cross_entropy", train_data=(X, y), store=store, fsync=False, check_gradients=False,
                   audit=False)
    rec = explaind.TrajectoryRecorder(model, opt, **options)
    with pytest.raises(RuntimeError, match="crash"), rec:
        for s in range(STEPS):
            if s == 4:
                raise RuntimeError("crash")
            _step(variant, model, opt, X, y, s, rec)
    model, opt, X, y = _setup(variant, dtype)
    rec = explaind.TrajectoryRecorder(model, opt, **options, resume=True)
    start = rec.restore()
    assert start == 4 and (rec._coefs is not None) == pooled
    with rec:
        for s in range(start, STEPS):
            _step(variant, model, opt, X, y, s, rec)
    monkeypatch.undo()
    return rec


# Adagrad is here too: torch builds its state (step 0, the initial sum) with the optimizer, which restore() takes
# for a fresh optimizer's
@pytest.mark.parametrize("variant", ["rmsprop-momentum", "adagrad", "nadam", "radam", "adamax"])
def test_a_resumed_dense_store_continues_with_pooled_coefficients_bit_identical(tmp_path, monkeypatch, variant):
    """Interrupted after 4 steps, resumed, finished: pooled and new coefficient tensors give the same bits; and,
    but for NAdam (torch's load_state_dict casts its float32 mu_product to float64, so the resumed q and n differ in
    their last float32 bits: tests/test_optimizer_adam_family_state.py), the same run as one uninterrupted one."""
    dtype = torch.float64
    pooled = _interrupted_and_resumed(variant, dtype, tmp_path / "pooled", monkeypatch, pooled=True)
    fresh = _interrupted_and_resumed(variant, dtype, tmp_path / "fresh", monkeypatch, pooled=False)
    _assert_same_run(pooled.trajectory, fresh.trajectory)
    if variant != "nadam":
        _assert_same_run(pooled.trajectory, _recorded(variant, dtype, store=tmp_path / "whole", audit=False).trajectory)


@pytest.mark.parametrize("variant", ONE_EACH)
def test_a_sparse_stores_replay_gives_the_pooled_coefficients(tmp_path, variant):
    """A sparse store keeps checkpoints and replays the steps between them with new tensors: the same bits."""
    dtype = torch.float32
    sparse = _recorded(variant, dtype, store=tmp_path / "sparse", checkpoint_every=3)
    assert sparse._coefs is None
    dense = _recorded(variant, dtype, store=tmp_path / "dense", audit=False)
    assert dense._coefs is not None
    _assert_same_run(sparse.trajectory, dense.trajectory)


@pytest.mark.parametrize("variant", ONE_EACH)
def test_a_failed_deferred_fill_is_the_steps_error(tmp_path, monkeypatch, variant):
    fail_third_call(monkeypatch, _pooled, "_run", "deferred coefficient failed")
    with pytest.raises(TrajectoryError, match="deferred coefficient failed"):
        _recorded(variant, torch.float32, store=tmp_path / "run", audit=False)


ADAPTERS = {"rmsprop-momentum": RMSpropAdapter, "rmsprop": RMSpropAdapter, "adagrad": AdagradAdapter,
            "nadam": NAdamAdapter, "radam": RAdamAdapter, "adamax": AdamaxAdapter}


@pytest.mark.parametrize("bad", ["dtype", "shape", "strided", "none"])
@pytest.mark.parametrize("variant", list(ADAPTERS))
def test_after_step_ignores_an_unusable_buffer_and_gives_the_same_bits(variant, bad):
    """``out`` handing a buffer of another dtype, shape or layout (or none): new memory, the bits of no ``out``;
    a usable buffer is filled and returned as the coefficient."""
    model, opt, X, y = _setup(variant, torch.float32)
    adapter = ADAPTERS[variant].from_optimizer(opt)
    for s in range(7):  # RAdam's P is a tensor from step 6 on
        _step(variant, model, opt, X, y, s)
    before = adapter.before_step(opt)
    _step(variant, model, opt, X, y, 7)
    fresh = adapter.after_step(opt, before)
    unusable = {"dtype": lambda p: torch.empty(p.shape, dtype=torch.float64),
                "shape": lambda p: torch.empty(p.numel() + 1),
                "strided": lambda p: torch.empty(tuple(reversed(p.shape))).t() if p.dim() == 2 else None,
                "none": lambda p: None}[bad]
    handed: list = []

    def out(p):
        handed.append(unusable(p))
        return handed[-1]

    got = adapter.after_step(opt, before, out=out)
    assert len(handed) == 4
    _assert_same_updates(got, fresh, bad)
    kept = {id(t) for u in got.values() for t in (u.P, u.b) if isinstance(t, torch.Tensor)}
    assert kept and not kept & {id(b) for b in handed}
    good: list = []
    pooled = adapter.after_step(opt, before, out=lambda p: good.append(torch.full_like(p, 7.0)) or good[-1])
    _assert_same_updates(pooled, fresh, "good")
    assert {id(t) for u in pooled.values() for t in (u.P, u.b) if isinstance(t, torch.Tensor)} == {id(b) for b in good}
