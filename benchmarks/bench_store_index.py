"""CPU time of reading a store's index (``manifest.json`` and ``journal.jsonl``) of a long run.

A 4-step run of a small MLP is recorded; its manifest and journal are then rewritten to list ``--steps``
copies of its first step record (as a complete store of that many steps holds them: every step in the
manifest and in the journal). Printed: the best of ``--repeats`` process-CPU times of
``explaind.trajectory.store.read_manifest`` and the manifest's size; with ``--load``, also the wall and process-CPU
time of one ``explaind.Trajectory.load`` of the store and the peak of Python's allocations (``tracemalloc``) of a
second one; with ``--verify N``, the time of ``Trajectory.load`` and ``verify()`` (every file's checksum and
binding) of a real recording of ``N`` steps (the copies of one record cannot be verified: each step file names
its step).
To compare two versions, run the script with each on ``PYTHONPATH``, in turn.

Run: ``python benchmarks/bench_store_index.py [--steps N] [--repeats R] [--load] [--verify N]``
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.trajectory.manifest import TrajectoryManifest
from explaind.trajectory.store import read_manifest


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(torch.float64)


def _recorded(root: Path, steps: int) -> nn.Module:
    """A real recording of ``steps`` SGD steps of batches of 4 of 16 samples (each step its own file); the model."""
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=root) as rec:
        for s in range(steps):
            idx = torch.arange(4 * (s % 4), 4 * (s % 4) + 4)
            opt.zero_grad()
            F.mse_loss(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model


def _long_store(root: Path, steps: int) -> Path:
    _recorded(root, 4)
    manifest = TrajectoryManifest.model_validate_json((root / "manifest.json").read_bytes())
    manifest.steps = [manifest.steps[0].model_copy(update={"step": s}) for s in range(steps)]
    manifest.n_steps = steps
    (root / "manifest.json").write_text(manifest.model_dump_json(indent=1))
    (root / "journal.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in manifest.steps))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--load", action="store_true", help="also time Trajectory.load and its peak allocation")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="also record a real run of N steps and time Trajectory.load and verify() of it")
    args = parser.parse_args(argv)
    top = tempfile.mkdtemp(prefix="explaind-index-")
    atexit.register(shutil.rmtree, top, True)
    root = _long_store(Path(top) / "run", args.steps)
    best = float("inf")
    for _ in range(args.repeats):
        start = time.process_time()
        read_manifest(root)
        best = min(best, time.process_time() - start)
    size = (root / "manifest.json").stat().st_size / 1e6
    print(f"{explaind.__file__}: read_manifest of {args.steps} steps (manifest {size:.1f} MB and journal): "
          f"{best * 1e3:.1f} ms CPU (best of {args.repeats}); load average {os.getloadavg()[0]:.1f}")

    if args.load:
        start, cpu = time.perf_counter(), time.process_time()
        traj = explaind.Trajectory.load(root, model=_model())
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        tracemalloc.start()  # a second load, traced (tracemalloc slows it down)
        explaind.Trajectory.load(root, model=_model())
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        print(f"Trajectory.load of {traj.n_steps} steps: {wall * 1e3:.0f} ms wall, {cpu * 1e3:.0f} ms CPU; peak Python "
              f"allocation of a load {peak:.0f} MB (tracemalloc); load average {os.getloadavg()[0]:.1f}")

    if args.verify:
        top = tempfile.mkdtemp(prefix="explaind-verify-")
        atexit.register(shutil.rmtree, top, True)
        run = Path(top) / "run"
        _recorded(run, args.verify)
        start, cpu = time.perf_counter(), time.process_time()
        explaind.Trajectory.load(run, model=_model()).verify()
        print(f"Trajectory.load and verify() of a recorded run of {args.verify} steps: "
              f"{(time.perf_counter() - start) * 1e3:.0f} ms wall, {(time.process_time() - cpu) * 1e3:.0f} ms CPU; "
              f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
