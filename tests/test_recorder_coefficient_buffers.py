"""A dense store lends the Adam adapter pool buffers for ``P`` (``after_step(..., out=...)``), given back once the
step is written: the stored ``P`` of every step equals, bit for bit, the ``P`` a plain loop derives from torch's
own state after that step and the ``P`` of the in-memory recorder (fresh tensors), also while steps wait for a
slow writer and their buffers are in flight; buffers are reused; a flipped byte in a stored ``P`` is detected.
"""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch
from _recording_helpers import classifier_setup, classifier_step, fail_third_call, spy_coefficient_buffers
from explaind_optimizers.adam import preconditioner

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import _background, _filewrite
from explaind.trajectory.disk import DiskTrajectory
from explaind.trajectory.store import read_manifest

STEPS = 10
VARIANTS = {
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "adam-amsgrad-maximize": (torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "maximize": True}),
    "adamw-decay": (torch.optim.AdamW, {"lr": 0.02, "weight_decay": 0.1, "betas": (0.8, 0.99)}),
}


def _setup(name: str, dtype: torch.dtype):
    return classifier_setup(*VARIANTS[name], dtype)


_step = classifier_step


def _loop_reference(variant: str, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """``P`` after each step, derived in a plain loop from torch's state (no recorder, no adapter)."""
    model, opt, X, y = _setup(variant, dtype)
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    out = []
    for s in range(STEPS):
        _step(model, opt, X, y, s)
        per_step = {}
        for name, p in model.named_parameters():
            state = opt.state[p]
            t = float(state["step"])
            v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
            step_size = group["lr"] / (1 - beta1**t)
            scalar = step_size if dtype == torch.float64 else float(np.float32(step_size))
            denom = v.sqrt() / math.sqrt(1 - beta2**t) + group["eps"]
            P = torch.tensor(scalar, dtype=dtype) / denom
            per_step[name] = -P if group["maximize"] else P
        out.append(per_step)
    return out


def _recorded(variant, dtype, store=None, **options):
    model, opt, X, y = _setup(variant, dtype)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store,
                                      fsync=False, check_gradients=False, **options)
    with rec:
        for s in range(STEPS):
            _step(model, opt, X, y, s, rec)
    return rec


def _slow_writer(monkeypatch, delay=0.01):
    """Every tensor file takes ``delay`` seconds longer, so steps wait in the writer's queue with their buffers."""
    write = _filewrite.TensorFileWriter.write
    gate = threading.Event()

    def slow(self, *args, **kwargs):
        gate.wait(delay)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(_filewrite.TensorFileWriter, "write", slow)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stored_P_equals_the_loop_reference_and_the_in_memory_recording_bit_for_bit(tmp_path, monkeypatch,
                                                                                     variant, dtype):
    _slow_writer(monkeypatch)
    reference = _loop_reference(variant, dtype)
    memory = _recorded(variant, dtype).trajectory
    rec = _recorded(variant, dtype, store=tmp_path / "run", audit=False)
    assert rec._coefs is not None and rec._coefs._jobs is not None  # pooled and filled on the copier's thread
    stored = rec.trajectory
    assert isinstance(stored, DiskTrajectory) and stored.n_steps == STEPS
    for s in range(STEPS):
        on_disk, in_memory = stored.updates(s), memory.updates(s)
        for name, P in reference[s].items():
            assert torch.equal(_bits(on_disk[name].P), _bits(P)), (s, name)
            assert torch.equal(_bits(in_memory[name].P), _bits(P)), (s, name)
        for name, theta in memory.params(s + 1).items():
            assert torch.equal(stored.params(s + 1)[name], theta)


def test_audit_at_the_step_reads_the_pooled_P_computed_at_the_step(tmp_path, monkeypatch):
    """With the audit on, ``P`` is computed at the step (not deferred): the store's ``P`` and audit values equal
    the in-memory recorder's."""
    _slow_writer(monkeypatch)
    memory = _recorded("adamw-decay", torch.float64).trajectory
    rec = _recorded("adamw-decay", torch.float64, store=tmp_path / "run")
    assert rec._coefs is not None and rec._coefs._jobs is None
    stored = rec.trajectory
    assert np.array_equal(stored.audit(), memory.audit())
    assert np.all(stored.audit() < 1e-12)
    for s in range(STEPS):
        for name, u in memory.updates(s).items():
            assert torch.equal(_bits(stored.updates(s)[name].P), _bits(u.P)), (s, name)


@pytest.mark.parametrize("save_state", [True, False], ids=["state", "no-state"])
def test_a_slow_deferred_P_holds_back_the_next_step_and_the_writer(tmp_path, monkeypatch, save_state):
    """The copier's job finishes late: the next ``optimizer.step()`` (which changes ``exp_avg_sq``) and the write
    wait for it, also without a state copy to wait for, so every stored ``P`` still equals the loop's."""
    run = _background.StateCopier.run
    finished: list[float] = []

    def slow(self, jobs):
        def late():
            threading.Event().wait(0.03)
            finished.append(len(finished))
        return run(self, [late, *jobs])

    monkeypatch.setattr(_background.StateCopier, "run", slow)
    reference = _loop_reference("adam", torch.float32)
    rec = _recorded("adam", torch.float32, store=tmp_path / "run", audit=False, save_optimizer_state=save_state)
    assert len(finished) >= STEPS  # every step's P went through the slow copier
    stored = rec.trajectory
    for s in range(STEPS):
        for name, P in reference[s].items():
            assert torch.equal(_bits(stored.updates(s)[name].P), _bits(P)), (s, name)


def test_a_failed_deferred_P_is_the_steps_error(tmp_path, monkeypatch):
    from explaind_optimizers import _pooled

    fail_third_call(monkeypatch, _pooled, "_run", "deferred P failed")
    with pytest.raises(TrajectoryError, match="deferred P failed"):
        _recorded("adam", torch.float32, store=tmp_path / "run", audit=False)


def test_dense_store_reuses_the_coefficient_buffers(tmp_path, monkeypatch):
    handed = spy_coefficient_buffers(monkeypatch)
    _recorded("adam", torch.float32, store=tmp_path / "run", audit=False, background_writes=False)
    n_params = 4
    assert len(handed) == STEPS * n_params
    distinct = len({id(b) for b in handed})
    assert distinct == n_params  # written inline: each step's buffers are back before the next step


def test_memory_sparse_and_adapters_without_out_compute_fresh_tensors(tmp_path):
    assert _recorded("adam", torch.float32)._coefs is None
    assert _recorded("adam", torch.float32, store=tmp_path / "sparse", checkpoint_every=3)._coefs is None
    model, _, X, y = _setup("adam", torch.float32)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, sgd, loss="cross_entropy", train_data=(X, y), store=tmp_path / "sgd")
    assert rec._coefs is None
    memory = _recorded("adam", torch.float32).trajectory
    ptrs = [memory.updates(s)["0.weight"].P.data_ptr() for s in range(STEPS)]
    assert len(set(ptrs)) == STEPS  # in memory every step keeps its own P


@pytest.mark.parametrize("bad", ["dtype", "shape", "strided"])
def test_preconditioner_ignores_an_unusable_out_and_gives_the_same_bits(bad):
    v = torch.rand(5, 4, generator=torch.Generator().manual_seed(0)) + 0.01
    state = {"step": torch.tensor(3.0), "exp_avg_sq": v}
    fresh = preconditioner(state, 0.01, 0.9, 0.999, 1e-8, False, torch.float32)
    out = {"dtype": torch.empty(5, 4, dtype=torch.float64), "shape": torch.empty(4, 5),
           "strided": torch.empty(4, 5).t()}[bad]
    got = preconditioner(state, 0.01, 0.9, 0.999, 1e-8, False, torch.float32, out)
    assert got is not out
    assert torch.equal(_bits(got), _bits(fresh))
    good = torch.full((5, 4), 7.0)
    assert preconditioner(state, 0.01, 0.9, 0.999, 1e-8, False, torch.float32, good) is good
    assert torch.equal(_bits(good), _bits(fresh))


def test_a_flipped_byte_in_a_stored_P_is_detected(tmp_path):
    rec = _recorded("adam", torch.float32, store=tmp_path / "run", audit=False)
    record = read_manifest(tmp_path / "run").steps[4]
    path = tmp_path / "run" / record.file.path
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    spans = json.loads(data[8:8 + header])
    lo, hi = spans["update.0.weight.P"]["data_offsets"]
    data[8 + header + (lo + hi) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    stored = rec.trajectory
    stored.updates(3)  # other steps still read
    with pytest.raises(TrajectoryError, match="step 4|step_000004|checksum"):
        stored.updates(4)


def test_resumed_dense_store_continues_with_pooled_P_bit_identical(tmp_path):
    """Interrupted after 4 steps (the loop raises), resumed, finished: the same ``P`` and theta as one run."""
    whole = _recorded("adam", torch.float64, store=tmp_path / "whole", audit=False)
    assert whole._coefs is not None
    model, opt, X, y = _setup("adam", torch.float64)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "cut",
                                      fsync=False, check_gradients=False, audit=False)
    with pytest.raises(RuntimeError, match="crash"), rec:
        for s in range(STEPS):
            if s == 4:
                raise RuntimeError("crash")
            _step(model, opt, X, y, s, rec)
    model, opt, X, y = _setup("adam", torch.float64)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "cut",
                                      fsync=False, check_gradients=False, audit=False, resume=True)
    start = rec.restore()
    assert start == 4
    with rec:
        for s in range(start, STEPS):
            _step(model, opt, X, y, s, rec)
    a, b = whole.trajectory, rec.trajectory
    assert b.n_steps == STEPS
    for s in range(STEPS):
        for name, u in a.updates(s).items():
            assert torch.equal(_bits(b.updates(s)[name].P), _bits(u.P)), (s, name)
        for name, theta in a.params(s + 1).items():
            assert torch.equal(b.params(s + 1)[name], theta)
