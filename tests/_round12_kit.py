"""Shared kit of the round-12 store tests (stores that travel): recordings, copies taken mid-run, forged files.

A store is read as the same run when round 5's reader gives, after ``verify()``, bit for bit what the uninterrupted
run recorded in memory gives (``_assert_same`` against :func:`resumable_reference`, the independent in-memory
recording); a resumed store must equal the uninterrupted longer run bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from _recording_helpers import resumable_reference, resumable_setup, resumable_step
from test_store_faults import _assert_same

import explaind

#: steps of a recorded store, and of the run a resume continues it to
STEPS, LONG = 6, 8


def reference():
    """The uninterrupted run of ``LONG`` steps, recorded in memory."""
    return resumable_reference(LONG)


def record(store: Path, steps: int = STEPS, *, resume: bool = False, after: Callable[[Path, int], None] | None = None,
           shift: int = 0, **kwargs) -> int:
    """Record (or resume) the kill/resume run into ``store`` up to ``steps``; ``after(store, s)`` runs after each step
    (its files committed: no background writes). ``shift`` moves the batches of the steps recorded here (another
    attempt at them). Returns the step the recording started at."""
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, resume=resume,
                                      background_writes=False, **kwargs)
    start = rec.restore() if resume else 0
    with rec:
        for s in range(start, steps):
            resumable_step(model, opt, X, y, s + shift, rec)
            if after is not None:
                after(store, s)
    return start


def load(store: Path) -> explaind.Trajectory:
    return explaind.Trajectory.load(store, model=resumable_setup()[0])


def same_run(store: Path, ref) -> int:
    """The steps ``store`` holds; it verifies and equals the uninterrupted run bit for bit on them."""
    traj = load(store)
    traj.verify()
    _assert_same(ref, traj)
    return traj.n_steps


def resumes_to_the_end(store: Path, ref) -> int:
    """Resume ``store`` to ``LONG`` steps (the run equals the uninterrupted one bit for bit); the step resumed at."""
    start = record(store, LONG, resume=True)
    assert same_run(store, ref) == LONG
    return start


def salvaged(store: Path, out: Path, ref) -> int:
    """Salvage ``store`` into ``out``: the steps kept, equal to the uninterrupted run; ``store`` unchanged."""
    before = snapshot(store)
    explaind.Trajectory.salvage(store, out=out)
    assert snapshot(store) == before
    return same_run(out, ref)


def snapshot(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def copy_at(step: int, copy: Path,
            how: Callable[[Path, Path], object] = shutil.copytree) -> Callable[[Path, int], None]:
    """An ``after`` hook of :func:`record` that copies the store to ``copy`` with ``how`` once ``step`` is committed."""
    def after(store: Path, s: int) -> None:
        if s == step:
            how(store, copy)
    return after


def manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_bytes())


def lfs_pointer(path: Path) -> None:
    """Replace ``path`` by the Git LFS pointer file a clone without ``git lfs pull`` holds in its place."""
    size = path.stat().st_size
    path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'ab' * 32}\nsize {size}\n")


def finished_and_live(root: Path) -> Path:
    """``root`` holding ``finished``, a store of ``STEPS`` steps, and ``live``, a copy of it taken after step 3 while
    it was recorded (its manifest lists no step: the journal holds them)."""
    record(root / "finished", after=copy_at(3, root / "live"))
    assert manifest(root / "live")["steps"] == []
    return root


def momentum_residuals(traj, model, batch_loss: Callable[[object, int], object], steps: int, lr: float,
                       mu: float) -> list[float]:
    """The independent float64 reference of salvage's replay (tests/test_store_salvage_round1[45].py): per step
    ``||theta_{s+1} - (theta_s - lr m_s)|| / ||theta_{s+1} - theta_s||`` with ``m_s = mu m_{s-1} + g_s`` (SGD's
    momentum written out), ``g_s`` by torch's autograd of ``batch_loss(model, s)`` on ``model`` loaded with the
    stored theta_s of ``traj``."""
    momentum: dict = {}
    out = []
    for s in range(steps):
        theta, theta_next = traj.params(s), traj.params(s + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(theta[name])
        model.zero_grad()
        batch_loss(model, s).backward()
        err = delta = 0.0
        for name, p in model.named_parameters():
            m = p.grad.clone() if name not in momentum else mu * momentum[name] + p.grad
            momentum[name] = m
            actual = theta_next[name] - theta[name]
            err += float(((actual + lr * m) ** 2).sum())
            delta += float((actual ** 2).sum())
        out.append(math.sqrt(err / delta))
    return out
