"""What the checks every estimator's ``fit`` runs on the recorded model cost, beside the explanation itself.

``fit`` compares the recorded model object with the recording (``check_recorded_model`` in
``explaind/estimators/_model_checks.py``: its attributes and fingerprint, the checksums of its parameters and
buffers kept when ``with rec:`` ended, its recorded parameter names, whether a sample's output depends on the rest
of its batch, whether the loss reads parameters). This script times those checks alone and a whole
``KernelReplica().fit(traj).predict(X_test)`` on the same recorded run, for the paper-shaped modular-arithmetic
transformer of ``bench_engine.py`` and a ReLU MLP, and prints the checks' share of the whole (best of
``--repeats``; one torch thread by default, so the share does not depend on how many cores are free).

Usage: ``python benchmarks/bench_fit_checks.py [--steps 40] [--repeats 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import explaind
from explaind.estimators._model_checks import check_recorded_model


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The shortest wall time of ``repeats`` calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def recorded_mlp(steps: int) -> tuple[explaind.Trajectory, torch.Tensor]:
    """A 64-256-256-10 ReLU MLP, SGD momentum 0.9 at lr 0.1, batches of 32 of 256 random samples, float64."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(288, 64, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (288,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:256], y[:256]))
    with rec:
        for s in range(steps):
            idx = torch.arange(s * 32, s * 32 + 32) % 256
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory, X[256:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bench_engine import record  # the paper-shaped transformer of the engine benchmark

    cases = {"modular transformer (bench_engine), AdamW": record(args.steps, torch.float64),
             "ReLU MLP 64-256-256-10, SGD momentum": recorded_mlp(args.steps)}
    print(f"{args.steps} steps, best of {args.repeats}, {args.threads} torch thread(s)\n")
    print("| model | checks (ms) | fit + predict (s) | checks' share |")
    print("|---|---|---|---|")
    for name, (traj, X_test) in cases.items():
        checks = best_of(lambda traj=traj: check_recorded_model(traj, "bench"), args.repeats)
        whole = best_of(lambda traj=traj, X=X_test: explaind.KernelReplica(device="cpu").fit(traj).predict(X),
                        args.repeats)
        print(f"| {name} | {1000 * checks:.1f} | {whole:.3f} | {100 * checks / whole:.2f} % |")


if __name__ == "__main__":
    main()
