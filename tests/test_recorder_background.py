"""The recorder's per-step work off the hot path: the background audit, reused copies, gradient comparison.

Each guarantee is checked against an independent record of the run: the parameters cloned by the
loop itself after every step, the audit of the same run computed inline (``background_writes=False``).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import _audit, store
from explaind.trajectory._background import CopyPool, OrderedWorker
from explaind.trajectory._gradients import _same

N_STEPS = 8


def _setup(opt_name: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    X = torch.randn(32, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    return model, opt, X, y


def _run(opt_name, store_path=None, *, background=True, steps=N_STEPS, before_step=None, clip=None, **kwargs):
    """Record ``steps`` steps; returns the recorder and the parameters the loop itself cloned after each step."""
    model, opt, X, y = _setup(opt_name)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store_path,
                                      background_writes=background, fsync=False, check_gradients=False, **kwargs)
    seen = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    with rec:
        for s in range(steps):
            idx = torch.arange(4 * s, 4 * s + 4) % 32
            opt.zero_grad(set_to_none=False)  # gradients overwritten in place: copies must be taken on time
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            if clip is not None:  # p.grad no longer equals the snapshot: the audit gets a copy of it
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            rec.log_batch(idx)
            if before_step is not None:
                before_step(s)
            opt.step()
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return rec, seen, opt


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_the_background_audit_equals_the_inline_audit_bit_for_bit(tmp_path, opt_name, on_disk, clip):
    audits = []
    for background in (True, False):
        path = tmp_path / f"run-{background}" if on_disk else None
        rec, seen, _ = _run(opt_name, path, background=background, clip=clip)
        traj = rec.trajectory if not on_disk else explaind.Trajectory.load(path, model=_setup("sgd")[0])
        audits.append(traj.audit())
        scales = [traj.grad_scale(s) for s in range(N_STEPS)]
        assert (max(scales) < 1.0) if clip else scales == [1.0] * N_STEPS  # clipping was seen
        for s in range(N_STEPS + 1):
            for n, t in traj.params(s).items():
                assert torch.equal(t, seen[s][n]), (s, n)
    background, inline = audits
    assert background.shape == (N_STEPS,) and np.isfinite(background).all()
    assert np.array_equal(background, inline)
    assert background.max() < 1e-12  # float64: the adapter replays torch's update


@pytest.mark.parametrize("audit", [True, False])
def test_reused_buffers_hold_every_step_while_the_writer_lags(tmp_path, monkeypatch, audit):
    real_write, calls = store.TensorFileWriter.write, {"fresh": 0, "reused": 0}

    def slow_write(*args, **kwargs):  # the writer falls behind: the queue fills and buffers come back late
        time.sleep(0.01)
        return real_write(*args, **kwargs)

    handed_out = set()

    def counting(real):  # a pool's copies (CopyPool.copy) and its buffers to copy into (CopyPool.buffer, theta's)
        def hand_out(self, key, src):
            out = real(self, key, src)
            calls["reused" if out.data_ptr() in handed_out else "fresh"] += 1
            handed_out.add(out.data_ptr())
            return out
        return hand_out

    monkeypatch.setattr(store.TensorFileWriter, "write", slow_write)
    monkeypatch.setattr(CopyPool, "copy", counting(CopyPool.copy))
    monkeypatch.setattr(CopyPool, "buffer", counting(CopyPool.buffer))
    path = tmp_path / "run"
    rec, seen, opt = _run("adam", path, steps=16, audit=audit)
    assert calls["reused"] > 0  # the test exercises recycled buffers
    traj = explaind.Trajectory.load(path, model=_setup("sgd")[0])
    for s in range(17):
        for n, t in traj.params(s).items():
            assert torch.equal(t, seen[s][n]), (s, n)
    if audit:  # the audit read theta_s before its buffer was reused
        inline = _run("adam", tmp_path / "inline", steps=16, background=False)[0].trajectory.audit()
        assert np.array_equal(traj.audit(), inline) and inline.max() < 1e-12
    model, opt2, _, _ = _setup("adam")
    again = explaind.TrajectoryRecorder(model, opt2, loss="cross_entropy", store=path, resume=True,
                                        check_gradients=False)
    assert again.restore() == 16
    want = opt.state_dict()["state"]
    for k, entry in opt2.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(want[k][key])), (k, key)


def _failing_audit(monkeypatch, at: int):
    real, calls = _audit.UpdateAudit.step, []

    def step(self, *args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == at + 1:
            raise RuntimeError("disk full in the audit")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_audit.UpdateAudit, "step", step)
    return calls


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_failed_background_audit_stops_the_next_step(tmp_path, monkeypatch, on_disk):
    calls = _failing_audit(monkeypatch, at=2)
    path = tmp_path / "run" if on_disk else None
    raised_at = []

    def wait_for_the_audit(s):
        raised_at.append(s)
        if s == 4:
            time.sleep(0.3)  # the audit of step 2 has failed by now

    with pytest.raises(TrajectoryError, match=r"audit of step 2 failed: RuntimeError: disk full"):
        _run("sgd", path, before_step=wait_for_the_audit)
    if on_disk:  # with a store the audit runs at the step, on the loop's thread: the step itself raises
        assert raised_at[-1] == 2 and set(calls) == {"MainThread"}
        traj = explaind.Trajectory.load(path, model=_setup("sgd")[0])
        assert traj.n_steps == 2 and np.isfinite(traj.audit()).all()
    else:
        assert raised_at[-1] <= 5  # surfaced at the step after the pause at the latest
        assert "MainThread" not in calls  # the audit ran off the loop's thread


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_failed_audit_of_the_last_step_is_raised_at_exit(tmp_path, monkeypatch, on_disk):
    _failing_audit(monkeypatch, at=N_STEPS - 1)
    path = tmp_path / "run" if on_disk else None
    with pytest.raises(TrajectoryError, match=rf"audit of step {N_STEPS - 1} failed"):
        _run("sgd", path)
    if on_disk:
        traj = explaind.Trajectory.load(path, model=_setup("sgd")[0])
        assert traj.n_steps == N_STEPS - 1 and not traj.manifest.complete
        assert np.isfinite(traj.audit()).all()


def test_the_in_memory_trajectory_waits_for_the_audits(monkeypatch):
    real = _audit.UpdateAudit.step

    def slow(self, *args, **kwargs):
        time.sleep(0.02)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_audit.UpdateAudit, "step", slow)
    model, opt, X, y = _setup("sgd")
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=False)
    with rec:
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(model(X[:4]), y[:4]).backward()
            rec.log_batch(torch.arange(4))
            opt.step()
        audit = rec.trajectory.audit()  # inside the loop: every audit so far is in
        assert np.isfinite(audit).all() and audit.shape == (4,)
        assert [r.audit for r in rec.trajectory.manifest.steps] == audit.tolist()


# ------------------------------------------------------------------ the pieces
def test_ordered_worker_runs_jobs_in_order_and_raises_a_failure_once_then_skips():
    done: list[int] = []
    worker = OrderedWorker("test-worker", max_queue=2)
    for i in range(6):
        worker.submit(lambda i=i: (time.sleep(0.002), done.append(i)))
    worker.flush()
    assert done == list(range(6))

    def fail():
        raise ValueError("boom")

    worker.submit(fail)
    worker.submit(lambda: done.append(99))
    with pytest.raises(ValueError, match="boom"):
        worker.flush()
    worker.submit(lambda: done.append(100))
    worker.close()
    assert 99 not in done and 100 not in done  # nothing runs after a failure (later results would be wrong)


def test_ordered_worker_inline_runs_in_submit_and_close_raises_a_queued_failure():
    done: list[int] = []
    inline = OrderedWorker("inline", background=False)
    inline.submit(lambda: done.append(threading.current_thread().name))
    assert done == ["MainThread"]
    worker = OrderedWorker("test-worker")
    worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        worker.close()


def test_copy_pool_reuses_a_released_buffer_only_for_the_same_key_and_shape():
    pool = CopyPool()
    a = torch.randn(4, 3)
    first = pool.copies("p.", {"w": a})
    assert torch.equal(first["w"], a) and first["w"].data_ptr() != a.data_ptr()
    pool.release("p.", first)
    b = torch.randn(4, 3)
    second = pool.copy("p.w", b)
    assert second.data_ptr() == first["w"].data_ptr() and torch.equal(second, b)
    assert pool.copy("p.w", b).data_ptr() != second.data_ptr()  # not released: a new buffer
    pool.release("p.", {"w": second})
    other = pool.copy("p.w", torch.randn(2, 6))  # another shape: never the old buffer
    assert other.shape == (2, 6) and other.data_ptr() != second.data_ptr()
    assert pool.copy("q.w", b).data_ptr() != second.data_ptr()  # another key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_gradients_are_compared_by_value(dtype):
    a = torch.tensor([[0.0, 1.5, -2.0], [3.0, 4.0, 5.0]], dtype=dtype)
    assert _same(a, a.clone())
    signed = a.clone()
    signed[0, 0] = -0.0
    assert _same(a, signed)  # -0.0 == 0.0 (by value, not by bits)
    changed = a.clone()
    changed[1, 2] = torch.nextafter(changed[1, 2], torch.tensor(10.0, dtype=dtype))
    assert not _same(a, changed)
    assert not _same(a, a.double() if dtype != torch.float64 else a.float())  # dtype differs
    assert _same(a.t(), a.t().contiguous()) and not _same(a.t(), a.contiguous().reshape(3, 2))
    assert _same(a.neg(), torch._neg_view(a))  # a lazily negated view
    nan = a.clone()
    nan[0, 0] = float("nan")
    assert _same(nan, nan.clone())  # the same bytes on CPU; refused by the finiteness check (tests below)
    other = nan.clone()
    other[0, 1] = float("nan")
    assert not _same(nan, other)  # a NaN where the snapshot has a number: changed


@pytest.mark.parametrize(("opt_name", "value"), [("sgd", float("inf")), ("adam", float("nan"))])
def test_a_non_finite_gradient_equal_to_its_snapshot_is_still_refused(opt_name, value):
    model, opt, X, y = _setup(opt_name)
    model[0].weight.register_hook(lambda g: torch.full_like(g, value))  # the raw gradient is inf / NaN
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=False)
    with rec:
        opt.zero_grad()
        F.cross_entropy(model(X[:4]), y[:4]).backward()
        rec.log_batch(torch.arange(4))
        with pytest.raises(TrajectoryError, match=r"Step 0: the gradient of 0\.weight contains NaN or inf"):
            opt.step()
