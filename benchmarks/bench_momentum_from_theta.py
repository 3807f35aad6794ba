"""Can a dense store drop SGD's momentum buffer and derive it from the stored parameters at read time?

For torch's SGD with momentum (no dampening, no weight decay, not Nesterov) the step is
``buf = momentum * buf + g`` then ``theta -= lr * buf``, so ``buf_s`` is ``(theta_s - theta_{s+1}) / lr``
in exact arithmetic. A store may leave out a tensor only if it is recovered bit for bit. This script
trains the ~1M-parameter MLP of ``bench_recording.py`` (784-1024-256-10, batch 64, lr 0.05, momentum
0.9) and counts, per step, the coordinates where the derived buffer differs from torch's own: in the
parameters' dtype (float32) and computed in float64 and rounded.

Run: ``python benchmarks/bench_momentum_from_theta.py [--steps N]``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from explaind.models import build_model
from explaind.plugins import get_entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = {"in_features": 784, "hidden_sizes": [1024, 256], "out_features": 10}
    entry = get_entry("architecture", "mlp")
    X, y = entry.example_input(entry.config(**config), 512, torch.Generator().manual_seed(0))
    model = build_model("mlp", config, seed=0)
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    n = sum(p.numel() for p in model.parameters())
    print(f"{n} coordinates per step; lr={lr}")
    print(f"{'step':>5}{'differ (float32)':>20}{'differ (float64, rounded)':>28}")
    for s in range(args.steps):
        idx = torch.arange(64 * s, 64 * (s + 1)) % X.shape[0]
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        wrong32 = wrong64 = 0
        for p, t0 in zip(model.parameters(), before):
            buf = opt.state[p]["momentum_buffer"]
            d32 = (t0 - p.detach()) / lr
            d64 = ((t0.double() - p.detach().double()) / lr).to(buf.dtype)
            wrong32 += int((d32.view(torch.int32) != buf.view(torch.int32)).sum())
            wrong64 += int((d64.view(torch.int32) != buf.view(torch.int32)).sum())
        print(f"{s:>5}{wrong32:>20}{wrong64:>28}")


if __name__ == "__main__":
    main()
