"""The adaptive rule on rough paths of models it was not tuned on, side by side with the fixed rules.

``benchmarks/bench_kink_dense.py`` holds the two workloads the kink-dense fallback's constants were
chosen on (a GroupNorm ResNet and a ReLU MLP). This script runs the same replica on six others, each
trained from initialisation with an untuned learning rate so that the path of every step is rough;
all on sklearn's 8x8 digits (1,000 training images, batches of 64), recorded in float64, the replica
explaining every output of held-out test images:

* ``deep-mlp``: a ReLU MLP of 8 linear layers (64-64-...-64-10), plain SGD lr 0.5;
* ``leaky-cnn``: Conv2d + LeakyReLU + MaxPool2d, Conv2d + ELU + MaxPool2d, a linear head, SGD momentum 0.9
  lr 0.2;
* ``batchnorm-cnn``: two Conv2d + BatchNorm2d + ReLU blocks trained in training mode (batch statistics,
  running statistics updated every step), replayed in evaluation mode with each step's running statistics
  (docs/maths.md, "Buffers"), SGD momentum 0.9 lr 0.1;
* ``transformer``: rows of the image as 8 tokens, two pre-norm blocks of two-head attention and an MLP (GELU
  in the first block, ReLU in the second), mean pooling, Adam lr 1e-2;
* ``rnn``: rows as 8 time steps through a Tanh RNN and an LSTM (32 units each), SGD momentum 0.9 lr 0.5;
* ``spiky-mlp``: a ReLU MLP 64-128-128-10 trained by SGD at lr 1e-3 except two steps in every 16 at lr 1.0
  (a few kink-dense steps among many smooth ones; the shared budget must not starve them).

Printed per workload and rule (the adaptive rule at each tolerance of ``--tols``, by default its own 1e-7; the
paper's 100-point midpoint rule; Gauss-Legendre with 4 nodes): wall time; evaluations per step and input (mean and the
largest of any (step, input)); the replica's relative error against the trained model run independently in
float64, ``max |replica - f(x; theta_N)| / max |f|`` (the telescoping sum makes ``f(x; theta_N)`` the exact
value the replica must reach, so it is the reference: no quadrature of its own); the worst (step, input)'s
quadrature error relative to its change ``max_o |g_o(theta_{s+1}) - g_o(theta_s)|`` and how many (step,
input) pairs end above ``tol = 1e-7`` of it; and whether an ``ExplaindWarning`` about the quadrature fired.

Run: ``python benchmarks/bench_kink_dense_models.py [--models deep-mlp ...] [--steps 16] [--inputs 16]
[--threads 1] [--tols 1e-7 1e-5]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kink_dense import digits, train_recorded  # noqa: E402  (the same data and training loop)
from torch import nn

import explaind
from explaind.estimators import replica as replica_module
from explaind.exceptions import ExplaindWarning

TOL = 1e-7


class LeakyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.leaky_relu(self.c1(x), 0.1), 2)
        return self.head(F.max_pool2d(F.elu(self.c2(x)), 2).flatten(1))


class BatchNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.n2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        return self.head(F.relu(self.n2(self.c2(x))).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, d: int, act):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down, self.act = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), act

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, L, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // 2) ** 0.5, -1) @ v
        x = x + self.out(a.transpose(1, 2).reshape(B, L, d))
        return x + self.down(self.act(self.up(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.embed, self.pos = nn.Linear(8, d), nn.Parameter(0.02 * torch.randn(8, d))
        self.blocks = nn.Sequential(Block(d, F.gelu), Block(d, F.relu))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x.reshape(-1, 8, 8)) + self.pos).mean(1))


class Recurrent(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.rnn = nn.RNN(8, d, nonlinearity="tanh", batch_first=True)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h, _ = self.lstm(self.rnn(x.reshape(-1, 8, 8))[0])
        return self.head(h[:, -1])


def deep_mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for k in range(8):
        layers += [nn.Linear(64, 10 if k == 7 else 64)] + ([] if k == 7 else [nn.ReLU()])
    return nn.Sequential(*layers)


def spiky_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def spikes(step: int) -> float:
    """The learning-rate factor of ``spiky-mlp``: 1.0 at two steps in every 16, else 1e-3."""
    return 1.0 if step % 16 in (3, 11) else 1e-3


#: name -> (description, model factory, optimizer factory, lr schedule factor or None)
WORKLOADS = {
    "deep-mlp": ("ReLU MLP, 8 linear layers, SGD lr 0.5", deep_mlp,
                 lambda p: torch.optim.SGD(p, lr=0.5), None),
    "leaky-cnn": ("LeakyReLU/ELU CNN with MaxPool2d, SGD momentum lr 0.2", LeakyCNN,
                  lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9), None),
    "batchnorm-cnn": ("BatchNorm CNN (train-mode run, eval-mode replay), SGD momentum lr 0.1", BatchNormCNN,
                      lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), None),
    "transformer": ("GELU/ReLU transformer, 2 blocks, Adam lr 1e-2", Transformer,
                    lambda p: torch.optim.Adam(p, lr=1e-2), None),
    "rnn": ("Tanh RNN + LSTM, SGD momentum lr 0.5", Recurrent,
            lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), None),
    "spiky-mlp": ("ReLU MLP, SGD lr 1e-3 with lr 1.0 at 2 steps in 16", spiky_mlp,
                  lambda p: torch.optim.SGD(p, lr=1.0), spikes),
}


def record(name: str, steps: int):
    """Train workload ``name`` for ``steps`` steps under the recorder; the model (evaluation mode), run, test images."""
    X, y = digits()
    _, factory, make_opt, schedule = WORKLOADS[name]
    torch.manual_seed(0)
    model = factory().double()
    opt = make_opt(model.parameters())
    sched = None if schedule is None else torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model, traj = train_recorded(model, opt, X, y, steps, sched)
    return model, traj, X[1000:]


def measure(name: str, args: argparse.Namespace) -> list[str]:
    """Table rows of the three rules on workload ``name``."""
    model, traj, X_test = record(name, args.steps)
    X = X_test[: args.inputs]
    with torch.no_grad():
        target = model(X)  # the trained model itself, evaluation mode, float64: what the replica must reach
    plans = []
    original = replica_module.window_plans

    def keeping(*a, **k):
        out = original(*a, **k)
        plans.extend(out[2])
        return out

    replica_module.window_plans = keeping
    rows = []
    try:
        for rule, nodes, tol in [*(("adaptive", None, t) for t in args.tols), ("midpoint", 100, TOL),
                                 ("gauss-legendre", 4, TOL)]:
            plans.clear()
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = explaind.KernelReplica(quadrature=rule, nodes=nodes, tol=tol).fit(traj).predict(X)
            wall = time.perf_counter() - t0
            warned = any(issubclass(w.category, ExplaindWarning) and "quadrature" in str(w.message) for w in caught)
            err = float((torch.as_tensor(out) - target).abs().max() / target.abs().max())
            evals = torch.cat([p.evals for p in plans]).double()
            unit = torch.cat([(p.estimate - p.exact).abs().amax(-1) / p.exact.abs().amax(-1).clamp_min(1e-300)
                              for p in plans])
            label = (rule if tol == TOL else f"{rule} tol={tol:g}") if nodes is None else f"{rule}-{nodes}"
            rows.append(f"| {name} | {label} | {wall:.1f} | {float(evals.mean()):.1f} | {int(evals.max())} | "
                        f"{err:.2e} | {float(unit.max()):.2e} | {int((unit > TOL).sum())}/{unit.numel()} | "
                        f"{'yes' if warned else 'no'} |")
            print(rows[-1], flush=True)
    finally:
        replica_module.window_plans = original
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=tuple(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tols", type=float, nargs="+", default=[TOL],
                    help="tolerances of the adaptive rule, one row each (default: its own 1e-7)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.steps} steps, {args.inputs} test inputs x 10 outputs, float64, torch threads={args.threads}; "
          f"load {os.getloadavg()[0]:.1f}")
    for name in args.models:
        print(f"{name}: {WORKLOADS[name][0]}, {sum(p.numel() for p in WORKLOADS[name][1]().parameters())} parameters")
    head = ("| workload | rule | time s | evaluations per step and input | most for one | replica relative error | "
            f"worst (step, input) error / its change | pairs above tol {TOL:g} | quadrature warning |\n"
            "|---|---|---|---|---|---|---|---|---|")
    print(head, flush=True)
    rows = [row for name in args.models for row in measure(name, args)]
    print(f"\n{head}\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
