"""Bytes per step of a sparse store (``checkpoint_every=k``) against the dense store, and the cost of replay.

For each optimizer and ``k`` in ``--ks`` one run of ``--steps`` steps is recorded to disk and read
back; one table row per run:

* ``bytes/step``: the files that grow with the run (step files and per-checkpoint optimizer states)
  divided by the number of steps; ``vs dense``: the ratio to the ``k = 1`` row of that optimizer;
* ``ckpt·k/dense``: the bytes of the stored thetas and optimizer states (the growing bytes less each
  step file's record: batch, scalars, replay record, random states, header) times ``k``, over the
  dense store's growing bytes: at most 1 is at most ``1/k`` of the dense store plus the per-step records;
* ``theta/state``: every how many steps theta and the optimizer state are stored (the layout the
  recorder chose, docs/recording.md "Sparse checkpoints"; read off the first stored ones, so give
  ``--steps`` of at least ``3 k``);
* ``fixed``: bytes that do not grow (theta_0, data, manifest, journal, the two resume slots);
* ``record ms/step``: wall time of the recorded loop per step;
* ``read ms/step``: wall time of reading ``theta_s`` and the coefficients of every step in order
  (a dense store opens files; a sparse one replays each segment once);
* ``max gap``: the largest relative gap between a replayed and a stored checkpoint
  (``traj.replay_error()``); ``max dθ``: the largest relative difference of a replayed
  ``theta_s`` from the dense store's.

The training loop uses two micro-batches per step and gradient clipping, so the recomputed batch
gradient is not bitwise the loop's.

Run: ``python benchmarks/bench_sparse_store.py [--steps N] [--ks 1 10 100] [--dtype float32|float64]
[--hidden H] [--threads T]``
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import explaind

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
}


def _grow_bytes(root: Path) -> tuple[int, int]:
    """(bytes of the step files and checkpoint states, bytes of every other file of the store)."""
    grow = [*(root / "steps").iterdir(), *(root / "optimizer").glob("checkpoint-*")]
    every = [p for p in root.rglob("*") if p.is_file()]
    g = sum(p.stat().st_size for p in grow)
    return g, sum(p.stat().st_size for p in every) - g


def _records(traj, theta_bytes: int) -> tuple[int, str]:
    """(bytes of the per-step records: each step file less the theta it holds, the layout as "every/every")."""
    steps = traj.manifest.steps
    records = sum((traj.root / r.file.path).stat().st_size - (theta_bytes if r.has_params else 0) for r in steps)
    thetas = [r.step for r in steps if r.has_params]
    states = [r.step for r in steps if r.optimizer_state is not None]
    if all(r.has_params for r in steps):
        return records, "dense"
    return records, f"{thetas[0] + 1}/{states[0] + 1}"  # the first of each (the last step is always a full one)


def _record(opt_name: str, k: int, steps: int, hidden: int, dtype: torch.dtype, store: Path):
    torch.manual_seed(0)
    X, y = torch.randn(512, 64, dtype=dtype), torch.randint(0, 10, (512,))
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                          nn.Linear(hidden, 10)).to(dtype)
    opt = OPTIMIZERS[opt_name](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store,
                                      checkpoint_every=k, check_gradients=False)
    start = time.perf_counter()
    with rec:
        for s in range(steps):
            idx = torch.randperm(512, generator=torch.Generator().manual_seed(s))[:48]
            opt.zero_grad()
            for part in (idx[:32], idx[32:]):
                (nn.functional.cross_entropy(model(X[part]), y[part]) * (len(part) / 48)).backward()
                rec.log_batch(part, torch.full((len(part),), 1 / 48, dtype=dtype))
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    record_s = time.perf_counter() - start
    return explaind.Trajectory.load(store, model=model, train_data=(X, y)), record_s, sum(
        p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    root = Path(tempfile.mkdtemp(prefix="explaind-sparse-"))
    print(f"{args.steps} steps, {args.dtype}, MLP 64-{args.hidden}-{args.hidden}-10, batches of 48 in two "
          f"micro-batches")
    head = (f"{'optimizer':<13}{'k':>5}{'bytes/step':>12}{'vs dense':>10}{'ckpt·k/dense':>14}{'theta/state':>13}"
            f"{'fixed':>11}{'record ms/step':>16}{'read ms/step':>14}{'max gap':>11}{'max dθ':>11}")
    print(head)
    print("-" * len(head))
    try:
        for opt_name in OPTIMIZERS:
            dense = None
            for k in args.ks:
                store = root / f"{opt_name}-{k}"
                traj, record_s, n_params = _record(opt_name, k, args.steps, args.hidden, dtype, store)
                grow, fixed = _grow_bytes(store)
                records, layout = _records(traj, n_params * torch.finfo(dtype).bits // 8)
                start = time.perf_counter()
                thetas = [traj.params(s) for s in range(traj.n_steps + 1)]
                for s in range(traj.n_steps):
                    traj.updates(s)
                read_s = time.perf_counter() - start
                if dense is None:
                    dense = (grow, thetas)
                dtheta = max(float((t[n].double() - d[n].double()).norm() / d[n].double().norm())
                             for t, d in zip(thetas, dense[1]) for n in t)
                gap = np.nanmax(traj.replay_error(replay_all=False), initial=0.0)
                ckpt = f"{k * (grow - records) / dense[0]:.3f}" if k > 1 else "-"
                print(f"{opt_name:<13}{k:>5}{grow / args.steps:>12.0f}{grow / dense[0]:>10.4f}{ckpt:>14}"
                      f"{layout:>13}{fixed:>11}"
                      f"{1e3 * record_s / args.steps:>16.2f}{1e3 * read_s / args.steps:>14.2f}{gap:>11.2e}"
                      f"{dtheta:>11.2e}")
                shutil.rmtree(store)
        print(f"({n_params} parameters; a theta is {n_params * torch.finfo(dtype).bits // 8} bytes)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
