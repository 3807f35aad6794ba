"""Layer rules against the generic torch.func path on a GroupNorm CNN (8x8 digits), printed side by side.

Run ``python benchmarks/bench_layer_rules.py [--steps N] [--inputs T]``. Trains a small
Conv2d/GroupNorm/ReLU network with SGD momentum on scikit-learn's digits, records it, and times
``KernelReplica`` (Gauss-Legendre 4) and ``InfluenceEstimator(keep=("train",))`` with the layer rules
(``factored="auto"``) and without them (``factored="never"``), with the largest difference between
the two results.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.datasets import digits


class SmallResNet(nn.Module):
    """Conv-GroupNorm-ReLU stem and one residual block, global average pooling, a linear read-out."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = nn.GroupNorm(2, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.stem(x)))
        h = torch.relu(h + self.norm2(self.conv(h)))
        return self.head(h.mean(dim=(2, 3)))


def record(steps: int, width: int) -> tuple[explaind.Trajectory, torch.Tensor]:
    data = digits(flatten=False, dtype=torch.float64)
    X, y = data.train
    X = X.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = SmallResNet(width).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    gen = torch.Generator().manual_seed(0)
    with rec:
        for _ in range(steps):
            idx = torch.randint(len(X), (32,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory, data.X_val.reshape(-1, 1, 8, 8)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--width", type=int, default=8, help="channels of the convolutions")
    args = ap.parse_args()
    traj, X = record(args.steps, args.width)
    X = X[:args.inputs]
    print(f"GroupNorm CNN, {sum(p.numel() for p in traj.params(0).values())} parameters, {traj.n_steps} SGD steps, "
          f"{X.shape[0]} test inputs x 10 outputs, float64, torch threads {torch.get_num_threads()}\n")
    print("| measurement | layer rules (s) | torch.func (s) | ratio | max rel. difference |")
    print("|---|---|---|---|---|")
    jobs = {
        "replica, gauss-legendre 4": lambda f: torch.as_tensor(explaind.KernelReplica(
            quadrature="gauss-legendre", factored=f, device="cpu").fit(traj).predict(X)),
        "influence keep=(train,), gauss-legendre 4": lambda f: explaind.InfluenceEstimator(
            keep=("train",), quadrature="gauss-legendre", factored=f, residual_tol=1.0,
            device="cpu").fit(traj).transform(X).values,
    }
    for label, job in jobs.items():
        fast, t_fast = timed(lambda job=job: job("auto"))
        slow, t_slow = timed(lambda job=job: job("never"))
        diff = float((fast - slow).abs().max() / slow.abs().max())
        print(f"| {label} | {t_fast:.2f} | {t_slow:.2f} | {t_fast / t_slow:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
