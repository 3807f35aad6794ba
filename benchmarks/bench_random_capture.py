"""What capturing the random state costs, and what the replayed per-sample split costs.

Workload: an MLP with dropout (32 -> 256 -> 256 -> 10, Dropout(0.1) after each hidden layer, float32
training, about 76k parameters), 512 training samples, batches of 64, SGD with momentum, 40 recorded
steps, 16 test inputs explained in float64.

Measured, side by side in one run (one table, markdown):

* recording with ``capture_random=True`` against ``False`` (the check off in both, so only the
  capture differs): wall time of the loop and bytes of the on-disk store per step;
* ``InfluenceEstimator(keep=("train",))`` on the captured run (per-sample gradients through the
  replayed batched training forward) against the uncaptured run (``vmap(grad)`` in evaluation mode,
  inexact for dropout): wall time and the residual share of each.

Run: ``python benchmarks/bench_random_capture.py [--steps 40] [--repeats 2] [--threads N]``. Times are
the fastest of ``--repeats`` runs, after one untimed warm-up recording.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import explaind


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 256), nn.ReLU(),
                         nn.Dropout(0.1), nn.Linear(256, 10))


def _record(capture: bool, root: Path, X: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, int, Path]:
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    store = root / f"capture-{capture}"
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store,
                                      capture_random=capture, check_gradients=False, overwrite=True, fsync=False,
                                      save_optimizer_state=False)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    start = time.perf_counter()
    with rec:
        for _ in range(steps):
            idx = torch.randperm(X.shape[0], generator=gen)[:64]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    elapsed = time.perf_counter() - start
    step_bytes = sum(p.stat().st_size for p in (store / "steps").iterdir())
    return elapsed, step_bytes // steps, store


def _influence(store: Path, X_test: torch.Tensor) -> tuple[float, float]:
    traj = explaind.Trajectory.load(store, model=_model(0))
    est = explaind.InfluenceEstimator(keep=("train",), quadrature="gauss-legendre", nodes=4, residual_tol=10.0,
                                      device="cpu")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        att = est.fit(traj).transform(X_test)
    return time.perf_counter() - start, float(att.meta["residual_share"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(512, 32, generator=gen), torch.randint(0, 10, (512,), generator=gen)
    X_test = torch.randn(16, 32, generator=gen)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        _record(True, Path(tmp), X, y, 2)  # warm-up: one-off set-up costs are not counted for either
        for capture in (False, True):
            runs = [_record(capture, Path(tmp), X, y, args.steps) for _ in range(args.repeats)]
            record_s, step_bytes, store = min(runs)
            infl = [_influence(store, X_test) for _ in range(args.repeats)]
            rows[capture] = (record_s, step_bytes, *min(infl))
    off, on = rows[False], rows[True]
    print(f"| {args.steps} steps, batch 64, MLP with dropout | capture off | capture on | on / off |")
    print("|---|---|---|---|")
    print(f"| recording, s | {off[0]:.3f} | {on[0]:.3f} | {on[0] / off[0]:.2f} |")
    print(f"| store bytes per step | {off[1]} | {on[1]} | +{on[1] - off[1]} bytes |")
    print(f"| keep=('train',), s | {off[2]:.3f} | {on[2]:.3f} | {on[2] / off[2]:.2f} |")
    print(f"| residual share | {off[3]:.3g} | {on[3]:.3g} | |")


if __name__ == "__main__":
    main()
