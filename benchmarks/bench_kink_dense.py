"""The kernel replica on a ReLU-dense model nobody tuned for: a small GroupNorm ResNet.

Workload: a hand-written ResNet (Conv2d 3x3 + GroupNorm + ReLU stem, two residual blocks of two
convolutions with GroupNorm, global average pooling, a linear head; 16 channels, about 10k
parameters) on sklearn's 8x8 digits, 1,000 training images, batches of 64, SGD with momentum 0.9 and
lr 0.05 from initialisation; the run is recorded in float64 and the replica explains every output of
held-out test images.

Printed (one table): for the adaptive rule (default tolerance) and the paper's 100-point midpoint
rule, the wall time, evaluations per step and test input, and the relative error of the replica
against the trained model, ``max |replica - f(x; theta_N)| / max |f|``. The path of each step crosses
thousands of ReLU kinks; ``docs/engine.md`` (section 2, *kink-dense paths*) describes what the
adaptive rule does then.

Run: ``python benchmarks/bench_kink_dense.py [--steps 40] [--inputs 64] [--threads 1]``
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import explaind
from explaind.kernel import planning


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(4, c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(4, c)

    def forward(self, x):
        return F.relu(x + self.n2(self.c2(F.relu(self.n1(self.c1(x))))))


class ResNet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(4, c)
        self.b1, self.b2, self.head = Block(c), Block(c), nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.b2(self.b1(F.relu(self.norm(self.stem(x))))).mean((2, 3)))


def record(steps: int):
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float64).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = ResNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:1000], y[:1000]))
    gen = torch.Generator().manual_seed(0)
    with rec:
        for _ in range(steps):
            idx = torch.randint(0, 1000, (64,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model.eval(), rec.trajectory, X[1000:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, traj, X_test = record(args.steps)
    X = X_test[: args.inputs]
    with torch.no_grad():
        target = model(X)
    evals: list[torch.Tensor] = []
    original = planning.adaptive_plan

    def counting(*a, **k):
        plan = original(*a, **k)
        evals.append(plan.evals)
        return plan

    planning.adaptive_plan = counting
    print(f"GroupNorm ResNet, {sum(p.numel() for p in model.parameters())} parameters, {args.steps} SGD-momentum "
          f"steps, {args.inputs} test inputs x 10 outputs, float64, torch threads={args.threads}")
    print("| rule | time s | evaluations per step and input | relative error |\n|---|---|---|---|")
    for rule, nodes in (("midpoint", 100), ("adaptive", None)):
        evals.clear()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = explaind.KernelReplica(quadrature=rule, nodes=nodes).fit(traj).predict(X)
        wall = time.perf_counter() - t0
        err = float((torch.as_tensor(out) - target).abs().max() / target.abs().max())
        per = f"{float(torch.cat(evals).double().mean()):.0f}" if evals else str(nodes)
        print(f"| {rule}{'' if nodes is None else f'-{nodes}'} | {wall:.1f} | {per} | {err:.2e} |", flush=True)


if __name__ == "__main__":
    main()
