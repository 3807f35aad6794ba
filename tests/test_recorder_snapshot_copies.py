"""The raw-gradient snapshots made on the state copier's thread during ``backward()`` keep every check's answer.

Gradients of at least ``INLINE_BELOW`` elements on the CPU are copied (and checked finite) on the
recorder's state copier thread while ``backward()`` computes the layers before them, and ``backward()``
waits for them before it returns (explaind/trajectory/_snapshot_copies.py). Each test makes those copies
slow (a sleep before each), so a snapshot that were not finished when ``backward()`` returns would hold
the loop's later change, and checks what the loop's thread did before:

* the copies are made on the copier's thread (and the small ones in the hook), complete at return;
* a global rescale right after ``backward()`` (``clip_grad_norm_``) is measured exactly: ``grad_scale``
  against the factor the test computes in float64 from its own copies of the gradients;
* a per-coordinate change right after ``backward()`` (``clip_grad_value_``) and a NaN in a large
  gradient are refused at their step; the steps a ``GradScaler`` skips are found from the finiteness
  the copier's thread checked (with it always ``True``, these two tests fail);
* gradient accumulation (a second ``backward()`` adding into the snapshotted ``.grad``) is recorded with
  ``c = 1`` and the update audit at float64 rounding;
* a post-accumulate-grad hook of the loop's own, which scales one gradient in place after the tap's hook
  ran, makes the tap copy in its hooks (the copy holds the gradient before the loop's hook): refused.
"""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import amp_loop
from torch import nn

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import _gradients
from explaind.trajectory._background import StateCopier
from explaind.trajectory._snapshot_copies import INLINE_BELOW, SnapshotCopies

N_IN, N_HIDDEN = 256, 160  # the first weight has 40960 >= INLINE_BELOW elements: copied on the thread


def _setup(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(N_IN, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, 1)).double()
    assert model[0].weight.numel() >= INLINE_BELOW > model[2].weight.numel()
    X = torch.randn(24, N_IN, dtype=torch.float64)
    return model, X, torch.randn(24, 1, dtype=torch.float64)


@pytest.fixture
def slow_copies(monkeypatch):
    """Every snapshot copy made off the loop's thread sleeps first; returns the (name, thread) of each copy."""
    real = _gradients.GradientTap._snap
    made: list[tuple[str, str]] = []

    def slow(self, name, g, stamp=None):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.02)
        made.append((name, threading.current_thread().name))
        real(self, name, g, stamp)

    monkeypatch.setattr(_gradients.GradientTap, "_snap", slow)
    return made


def _recorder(model, X, y, tmp_path, store, **options):
    where = {} if store is None else {"store": tmp_path / "run"}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), **where, **options)
    return rec, opt


def test_large_snapshots_are_made_on_the_copier_thread_and_complete_when_backward_returns(slow_copies):
    model, X, y = _setup()
    rec, opt = _recorder(model, X, y, None, None, check_gradients=False)
    with rec:
        for s in range(3):
            opt.zero_grad()
            F.mse_loss(model(X[s::3]), y[s::3]).backward()
            tap = rec._tap  # right after backward(): every snapshot is complete and checked finite
            for name, p in model.named_parameters():
                assert torch.equal(tap._raw[name], p.grad), name
                assert tap._finite.get(name) == (tap._stamp[name], True) or p.numel() < INLINE_BELOW, name
            rec.log_batch(torch.arange(s, 24, 3))
            opt.step()
    threads = {name: {t for n, t in slow_copies if n == name} for name, _ in model.named_parameters()}
    assert all(t.startswith("explaind-state-copy") for t in threads["0.weight"]), threads
    assert threads["2.weight"] == threads["0.bias"] == {threading.main_thread().name}, threads


def _factor(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """The global factor between the gradients after and before the clip, from float64 sums over their entries."""
    dot = sum(float(a.double().flatten() @ b.double().flatten()) for a, b in zip(after, before))
    return dot / sum(float(b.double().flatten() @ b.double().flatten()) for b in before)


@pytest.mark.parametrize("store", [None, "disk"])
def test_a_global_clip_right_after_backward_is_measured_exactly(slow_copies, tmp_path, store):
    model, X, y = _setup(1)
    rec, opt = _recorder(model, X, y, tmp_path, store, check_gradients=False)
    factors = []
    with rec:
        for s in range(4):
            opt.zero_grad()
            F.mse_loss(model(X[s::4]), y[s::4]).backward()
            before = [p.grad.clone() for p in model.parameters()]
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
            factors.append(_factor(before, [p.grad for p in model.parameters()]))
            rec.log_batch(torch.arange(s, 24, 4))
            opt.step()
    traj = rec.trajectory
    assert all(f < 0.99 for f in factors), factors  # the clip did rescale
    for s, f in enumerate(factors):
        assert math.isclose(traj.grad_scale(s), f, rel_tol=1e-12), (s, traj.grad_scale(s), f)


def test_a_per_coordinate_clip_right_after_backward_is_refused(slow_copies):
    model, X, y = _setup(2)
    rec, opt = _recorder(model, X, y, None, None, check_gradients=False)
    with pytest.raises(TrajectoryError, match=r"Step 0: between backward\(\) and optimizer\.step\(\) the gradient "
                                              r"of 0\.weight.*more than a global factor"), rec:
        opt.zero_grad()
        F.mse_loss(model(X), y).backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), clip_value=1e-4)
        rec.log_batch(torch.arange(24))
        opt.step()


def test_a_nan_in_a_large_gradient_is_refused_at_its_step(slow_copies):
    model, X, y = _setup(3)
    X[5, 7] = math.nan  # reaches every gradient through the first layer's output
    rec, opt = _recorder(model, X, y, None, None, check_gradients=False)
    with pytest.raises(TrajectoryError, match=r"Step 1: the gradient of 0\.weight.*contains NaN or inf"), rec:
        for s, rows in enumerate((torch.arange(0, 4), torch.arange(4, 8))):
            opt.zero_grad()
            F.mse_loss(model(X[rows]), y[rows]).backward()
            rec.log_batch(rows)
            opt.step()
            assert s == 0
    assert model[0].weight.isfinite().all()  # refused before the optimizer moved the parameters


@pytest.mark.parametrize("store", [None, "disk"])
def test_gradient_accumulation_is_recorded_exactly(slow_copies, tmp_path, store):
    model, X, y = _setup(4)
    rec, opt = _recorder(model, X, y, tmp_path, store, check_gradients=True, audit=True)
    with rec:
        for s in range(3):
            opt.zero_grad()
            for half in (torch.arange(8 * s, 8 * s + 4), torch.arange(8 * s + 4, 8 * s + 8)):
                (F.mse_loss(model(X[half]), y[half]) / 2).backward()  # adds into the snapshotted .grad
                rec.log_batch(half, torch.full((4,), 1 / 8, dtype=torch.float64))
            opt.step()
    traj = rec.trajectory
    assert [traj.grad_scale(s) for s in range(3)] == [1.0, 1.0, 1.0]
    assert float(max(traj.audit())) < 1e-13, traj.audit()
    assert float(max(traj.gradient_check())) < 1e-12, traj.gradient_check()
    assert {t for n, t in slow_copies if n == "0.weight"} != {threading.main_thread().name}


def _halve(p: torch.Tensor) -> None:
    p.grad.mul_(0.5)


def test_a_loop_hook_after_the_taps_that_scales_a_gradient_in_place_is_refused(slow_copies):
    model, X, y = _setup(5)
    rec, opt = _recorder(model, X, y, None, None, check_gradients=False)
    with pytest.raises(TrajectoryError, match=r"Step 1: between backward\(\) and optimizer\.step\(\) the gradient "
                                              r"of 0\.weight.*more than a global factor"), rec:
        for s in range(2):
            if s == 1:  # registered after the recorder's: it runs after the tap's hook, inside backward()
                model[0].weight.register_post_accumulate_grad_hook(_halve)
            opt.zero_grad()
            F.mse_loss(model(X), y).backward()
            rec.log_batch(torch.arange(24))
            opt.step()
    assert {t for n, t in slow_copies if n == "0.weight"} == {
        threading.main_thread().name, "explaind-state-copy_0"}  # step 0 on the thread, step 1 in the hook


def test_snapshot_copies_run_inline_outside_a_backward_and_with_a_foreign_hook():
    p = nn.Parameter(torch.zeros(INLINE_BELOW))
    copies = SnapshotCopies({"p": p}, StateCopier())
    ran = []
    assert copies.submit(p, torch.zeros(INLINE_BELOW), lambda: ran.append(1)) is False  # no backward running
    assert copies.submit(p, torch.zeros(INLINE_BELOW - 1), lambda: ran.append(1)) is False  # small
    p.register_post_accumulate_grad_hook(lambda t: None)
    p.register_post_accumulate_grad_hook(lambda t: None)  # the tap's and the loop's
    answers = []
    p.register_post_accumulate_grad_hook(lambda t: answers.append(copies.submit(t, t.grad, lambda: ran.append(1))))
    (p * 2).sum().backward()
    assert answers == [False] and ran == []


def test_grad_scaler_skips_are_found_from_the_copier_threads_finiteness(slow_copies):
    """fp16 autocast with a GradScaler whose first scales overflow: the copies of the first layer's gradient (the
    only trained parameter, large), checked finite on the copier's thread, tell the skipped steps (their batches
    dropped, nothing recorded)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(N_IN, N_HIDDEN, bias=False), nn.Tanh(), nn.Linear(N_HIDDEN, 3))
    model[2].requires_grad_(False)
    X, y = torch.randn(48, N_IN), torch.randint(0, 3, (48,))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, growth_interval=2)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), grad_scaler=scaler,
                                      check_gradients=False)
    with rec:
        stepped = amp_loop(model, opt, scaler, X, y, [torch.arange(4 * s, 4 * s + 4) for s in range(12)], rec)
    traj = rec.trajectory
    assert 0 < len(stepped) < 12 and rec.skipped_batches == 12 - len(stepped)
    assert traj.n_steps == len(stepped)
    assert all(torch.equal(traj.batch(s)[0], rows) for s, rows in enumerate(stepped))
    assert {t for n, t in slow_copies if n == "0.weight"} != {threading.main_thread().name}
