"""The update audit alone: its CPU time per step on real models' tensors, against the plain training step.

For each model the script records three steps (the trajectory in memory, gradient check off), keeps the
inputs of the third step's audit (theta_s, theta_{s+1}, the gradient the optimizer saw, the adapter's
coefficients and the audit's momentum before it) and then times ``UpdateAudit().step`` on them alone,
``--repeats`` times (each from the same momentum), next to the plain loop's step (zero_grad, forward,
backward, ``optimizer.step()``) of the same model. CPU time of the calling thread, median over repeats.

Models: bench_real_models.py's GPT-2 (AdamW, 28 tensors, 0.54M parameters) and ResNet-18 (SGD momentum,
62 tensors, 11.2M parameters), and bench_recording.py's 1M-parameter MLP (784-1024-256-10, batch 64) with
SGD momentum and with Adam.

``--checkouts NAME=PATH ...`` runs each measurement in a child process per checkout (``PYTHONPATH`` set to
``PATH`` and ``PATH/plugins``; this script and the model definitions are this checkout's), alternating the
checkouts ``--rounds`` times, so that two versions of the audit are compared at the same machine load; the
table gives each round's figures and the ratio of the medians.

Run: ``python benchmarks/bench_audit.py [--cases gpt2 resnet18 mlp-1m-sgd mlp-1m-adam] [--repeats R]
[--rounds K] [--checkouts before=/path/to/old after=.]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_real_models import train_step  # noqa: E402  (the same loop step)

CASES = ("gpt2", "resnet18", "mlp-1m-sgd", "mlp-1m-adam")


def _model(case: str):
    """``(model, optimizer, X, y, batch, forward, loss)`` of a case, seeded."""
    if case in ("gpt2", "resnet18"):
        from bench_real_models import _case

        return _case(case, torch.device("cpu"))
    from bench_recording import CASES as RECORDING

    mlp = RECORDING["mlp-1m"]
    model, batch = mlp.build(), mlp.batch
    params = model.parameters()
    opt = torch.optim.Adam(params, lr=1e-3) if case.endswith("adam") else torch.optim.SGD(params, lr=0.05,
                                                                                            momentum=0.9)
    X, y = mlp.data(batch * 8)
    return model, opt, X, y, batch, lambda m, x: m(x), "cross_entropy"


def _clone(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def child(case: str, repeats: int) -> dict[str, float]:
    """In this process: the audit's and the plain step's median thread CPU ms."""
    import explaind
    from explaind.trajectory import _audit

    model, opt, X, y, batch, forward, loss = _model(case)
    captured: list[tuple] = []
    real = _audit.UpdateAudit.step

    def capture(self, theta, theta_next, grads, updates):
        captured.append(({n: _clone(v) for n, v in theta.items()}, {n: _clone(v) for n, v in theta_next.items()},
                         {n: _clone(v) for n, v in grads.items()},
                         {n: type(u)(**{f.name: _clone(getattr(u, f.name)) for f in fields(u)})
                          for n, u in updates.items()},
                         {n: _clone(v) for n, v in self.momentum.items()}))
        return real(self, theta, theta_next, grads, updates)

    def plain_step(i: int) -> None:
        train_step(model, opt, X, y, batch, forward, loss, rec, i)

    _audit.UpdateAudit.step = capture
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), check_gradients=False,
                                      background_writes=False)
    with rec:
        for i in range(3):
            plain_step(i)
    _audit.UpdateAudit.step = real
    rec = None
    theta, theta_next, grads, updates, momentum = captured[-1]
    audit_ms, step_ms = [], []
    for r in range(repeats + 1):
        auditor = _audit.UpdateAudit()
        auditor.momentum = dict(momentum)
        start = time.thread_time()
        auditor.step(theta, theta_next, grads, updates)
        audit_ms.append(1e3 * (time.thread_time() - start))
        start = time.thread_time()
        plain_step(3 + r)
        step_ms.append(1e3 * (time.thread_time() - start))
    return {"audit_ms": statistics.median(audit_ms[1:]), "step_ms": statistics.median(step_ms[1:]),
            "tensors": len(updates), "params": sum(t.numel() for t in theta.values())}


def _spawn(case: str, path: str, args: argparse.Namespace) -> dict[str, float]:
    root = Path(path).resolve()
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'plugins'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", case, "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{case} at {path} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkouts", nargs="+", default=[f"this={HERE.parent}"], metavar="NAME=PATH")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(child(args.child, args.repeats)))
        return
    checkouts = [c.split("=", 1) for c in args.checkouts]
    print(f"torch threads=1  repeats={args.repeats} (median)  rounds={args.rounds}  "
          f"load average={os.getloadavg()[0]:.1f}")
    print("thread CPU ms of one audit; in brackets as a share of the plain step measured in the same child")
    header = f"{'model':12s} {'tensors':>7s} {'params':>9s} {'plain ms':>9s}" + "".join(
        f" {name + ' audit ms (share)':>30s}" for name, _ in checkouts)
    if len(checkouts) > 1:
        header += f" {checkouts[-1][0] + ' / ' + checkouts[0][0]:>14s}"
    print(header)
    print("-" * len(header))
    for case in args.cases:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in checkouts}
        for _ in range(args.rounds):
            for name, path in checkouts:
                runs[name].append(_spawn(case, path, args))
        first = runs[checkouts[0][0]][0]
        steps = [r["step_ms"] for rs in runs.values() for r in rs]
        line = f"{case:12s} {first['tensors']:7d} {first['params']:9d} {statistics.median(steps):9.1f}"
        for name, _ in checkouts:
            cells = ", ".join(f"{r['audit_ms']:.2f} ({r['audit_ms'] / r['step_ms']:.3f})" for r in runs[name])
            line += f" {cells:>30s}"
        if len(checkouts) > 1:
            medians = [statistics.median(r["audit_ms"] for r in runs[name]) for name, _ in checkouts]
            line += f" {medians[-1] / medians[0]:14.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
