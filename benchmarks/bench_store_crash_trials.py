"""SIGKILL a recording at random moments, many times over: nothing committed is lost, the resumed run is exact.

Each trial forks a process (after the imports, so a trial costs the recording, not torch's start-up)
that records ``--steps`` steps of a small MLP with SGD and momentum into a new dense store (``fsync``
on, background writes on: the defaults) and kills it with SIGKILL after a delay drawn uniformly from
the time an uninterrupted forked recording takes (measured first, after one recording in the script's
own process, the reference, which also pays the lazy imports). Then:

* the store holds a prefix of the run for a reader: ``Trajectory.load`` and ``verify()`` pass (or the
  kill came before the manifest was written: no store yet), and every step it holds equals the
  uninterrupted run bit for bit (θ, batch, ``c_s``, coefficients);
* ``resume=True`` and ``rec.restore()`` continue it to the end (a new recording where the kill came
  before the set-up marker, which ``resume=True`` refuses naming ``resume=False``), and the whole
  trajectory equals the uninterrupted run bit for bit.

docs/recording.md ("What a crash keeps") states the guarantee; tests/test_store_kill_points*.py kill at
chosen write operations, this script at random times. Printed: one row per trial (the delay, the steps a
reader got after the kill, whether they and the resumed run equal the uninterrupted one) and a summary.
Exit status 1 when any trial fails.

Run: ``python benchmarks/bench_store_crash_trials.py [--trials N] [--steps K] [--seed S] [--root DIR]``
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.exceptions import TrajectoryError

N_TRAIN, BATCH = 64, 16


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(N_TRAIN, 32, generator=g), torch.randint(0, 10, (N_TRAIN,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), X, y


def record(store: Path, steps: int, *, resume: bool) -> None:
    """Record steps ``restore()..steps-1`` of the run into ``store`` (a new store unless ``resume``)."""
    model, opt, X, y = _setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store,
                                      resume=resume)
    start = rec.restore() if resume else 0
    with rec:
        for s in range(start, steps):
            idx = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(100 + s))[:BATCH]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()


def _forked_recording(store: Path, steps: int, kill_after: float | None) -> float:
    """Record in a forked process; SIGKILL it ``kill_after`` seconds after the fork (``None``: let it finish).

    Returns the seconds the process ran.
    """
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: record, then leave without running the parent's exit handlers
        code = 0
        try:
            record(store, steps, resume=False)
        except BaseException:  # noqa: BLE001 - reported through the exit status
            code = 1
        os._exit(code)
    if kill_after is not None:
        while time.perf_counter() - start < kill_after:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return time.perf_counter() - start
            time.sleep(min(0.002, kill_after))
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if kill_after is None and status != 0:
        raise RuntimeError(f"the uninterrupted recording failed (wait status {status})")
    return time.perf_counter() - start


def _values(traj, steps: range) -> list[torch.Tensor]:
    out = [t for s in steps for t in traj.params(s + 1).values()] + list(traj.params(0).values())
    for s in steps:
        out += [*traj.batch(s), torch.tensor(traj.grad_scale(s))]
        out += [c for u in traj.updates(s).values() for c in (u.a, u.b, u.P, u.q, u.n) if isinstance(c, torch.Tensor)]
    return out


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@dataclass
class Trial:
    delay_ms: float
    kept: int | None  # steps a reader got after the kill; None: no store yet (killed before its manifest)
    kept_equal: bool
    resumed_equal: bool


def trial(root: Path, reference, steps: int, delay: float) -> Trial:
    """One killed recording into ``root`` (removed first), read, resumed to the end and compared."""
    shutil.rmtree(root, ignore_errors=True)
    _forked_recording(root, steps, delay)
    model = _setup()[0]
    try:
        traj = explaind.Trajectory.load(root, model=model)
    except TrajectoryError:
        if (root / "manifest.json").exists():
            raise  # a store that cannot be read after a kill: the failure this script looks for
        kept, kept_equal = None, True
    else:
        traj.verify()
        kept = traj.n_steps
        kept_equal = _equal(_values(traj, range(kept)), _values(reference, range(kept)))
    # a kill before the set-up marker leaves no directory or an empty one: resume=True would be refused there
    # (naming resume=False), so the run is recorded anew, as the user would
    record(root, steps, resume=any((root / name).exists() for name in ("manifest.json", ".explaind-setup")))
    resumed = explaind.Trajectory.load(root, model=_setup()[0])
    resumed.verify()
    resumed_equal = resumed.n_steps == steps and _equal(_values(resumed, range(steps)),
                                                        _values(reference, range(steps)))
    return Trial(delay * 1e3, kept, kept_equal, resumed_equal)


def run_trials(root: Path, trials: int, steps: int, seed: int) -> tuple[float, list[Trial]]:
    """The uninterrupted run's duration and ``trials`` killed runs at delays drawn from ``[0, duration]``."""
    record(root / "reference", steps, resume=False)  # in this process: its first recording pays the lazy imports
    reference = explaind.Trajectory.load(root / "reference", model=_setup()[0])
    duration = _forked_recording(root / "forked", steps, None)  # what a trial's recording takes from the fork on
    forked = explaind.Trajectory.load(root / "forked", model=_setup()[0])
    if not _equal(_values(forked, range(steps)), _values(reference, range(steps))):
        raise RuntimeError("a forked recording differs from the one in this process; the trials would compare nothing")
    draw = random.Random(seed)
    return duration, [trial(root / "killed", reference, steps, draw.uniform(0.0, duration)) for _ in range(trials)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default=None, help="directory for the stores (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.root or tempfile.mkdtemp(prefix="explaind-crash-"))
    load = os.getloadavg()[0]
    duration, results = run_trials(root, args.trials, args.steps, args.seed)
    print(f"uninterrupted recording of {args.steps} steps (fork to exit): {duration * 1e3:.0f} ms; load average "
          f"{load:.1f}")
    print("| trial | kill after (ms) | steps a reader got | kept steps equal | resumed run equal |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(results):
        got = "no store yet" if r.kept is None else str(r.kept)
        print(f"| {i} | {r.delay_ms:.0f} | {got} | {r.kept_equal} | {r.resumed_equal} |")
    failed = [i for i, r in enumerate(results) if not (r.kept_equal and r.resumed_equal)]
    mid = sum(1 for r in results if r.kept is not None and r.kept < args.steps)
    print(f"{len(results)} trials: {sum(r.kept is None for r in results)} killed before the store existed, {mid} "
          f"mid-run, {sum(r.kept == args.steps for r in results)} after the last step was committed; failed: "
          f"{failed or 'none'}")
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
