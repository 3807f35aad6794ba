"""Engine timings per algorithm path, and CPU/CUDA agreement.

Workload: the modular-arithmetic transformer of ``bench_engine.py`` (p = 23, d_model 32, 4 heads,
MLP 64; AdamW, 200 training pairs, batches of 50, 40 steps), 20 test inputs, all 23 outputs.

Prints one markdown table: wall time of ``KernelReplica`` and of ``InfluenceEstimator`` for several
``keep``/quadrature settings on each requested device, the completeness error of every Attribution,
and (with both devices) the largest relative difference between the CPU and the CUDA results. A
process CPU time is printed next to the wall time (on a shared machine the wall time also counts
waiting for cores). A second table checks every ``keep`` combination on a tiny MLP on each device (completeness, and
agreement with the CPU).

Run: ``python benchmarks/check_engine_devices.py [--devices cpu cuda] [--threads 2] [--steps 40]``
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
from explaind_architectures.transformer import modular_arithmetic_dataset

import explaind


def transformer_run(steps: int):
    p = 23
    model = explaind.build_model("modular_transformer", {"p": p, "d_model": 32, "n_heads": 4, "d_mlp": 64}, seed=0,
                                 dtype="float64")
    X, y = modular_arithmetic_dataset(p)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=gen)
    tr, te = perm[:200], perm[200:220]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[tr], y[tr]))
    with rec:
        for _ in range(steps):
            idx = torch.randperm(200, generator=gen)[:50]
            opt.zero_grad()
            F.cross_entropy(model(X[tr][idx]), y[tr][idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory, X[te]


def mlp_run():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:12], y[:12]))
    with rec:
        for _ in range(6):
            idx = torch.randperm(12, generator=gen)[:4]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory, X[12:]


def timed(fn, device: str):
    """``(result, wall seconds, process CPU seconds)``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, time.process_time() - c0


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


CASES = [
    ("replica", {"quadrature": "adaptive"}),
    ("replica", {"quadrature": "gauss-legendre"}),
    ("influence", {"keep": ("step", "group")}),
    ("influence", {"keep": ("param",)}),
    ("influence", {"keep": ("train",), "momentum": "reverse"}),
    ("influence", {"keep": ("train",), "momentum": "reverse", "quadrature": "gauss-legendre"}),
    ("influence", {"keep": ("train",), "momentum": "forward"}),
    ("influence", {"keep": ("step", "train")}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", nargs="+", default=["cpu"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    traj, X = transformer_run(args.steps)
    print(f"transformer: D={sum(v.numel() for v in traj.params(0).values())}, N={traj.n_steps}, T={len(X)}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("\n| case | device | wall (s) | CPU (s) | completeness | vs cpu |\n|---|---|---|---|---|---|")
    results: dict[tuple[int, str], object] = {}
    for dev in args.devices:
        explaind.KernelReplica(device=dev, steps=(0, 1)).fit(traj).predict(X[:2])  # warm-up
        for i, (kind, kw) in enumerate(CASES):
            if kind == "replica":
                est = explaind.KernelReplica(device=dev, **kw).fit(traj)
                out, dt, cpu = timed(lambda est=est: est.predict(X), dev)
                compl = ""
                value = torch.as_tensor(out)
            else:
                est = explaind.InfluenceEstimator(device=dev, **kw).fit(traj)
                out, dt, cpu = timed(lambda est=est: est.transform(X), dev)
                compl = f"{out.completeness_error():.1e}"
                value = out.values
            results[(i, dev)] = value
            vs = f"{rel(value, results[(i, 'cpu')]):.1e}" if dev != "cpu" and (i, "cpu") in results else ""
            label = f"{kind} " + ", ".join(f"{k}={v}" for k, v in kw.items())
            print(f"| {label} | {dev} | {dt:.3f} | {cpu:.3f} | {compl} | {vs} |", flush=True)

    mtraj, mX = mlp_run()
    print("\n| keep (MLP) | device | completeness | values vs cpu |\n|---|---|---|---|")
    axes = ("step", "group", "param", "train")
    for r in range(5):
        for keep in itertools.combinations(axes, r):
            if "group" in keep and "param" in keep:
                continue
            base = None
            for dev in args.devices:
                att = explaind.InfluenceEstimator(keep=keep, device=dev).fit(mtraj).transform(mX)
                base = att if base is None else base
                vs = f"{rel(att.values, base.values):.1e}" if att is not base else ""
                print(f"| {keep} | {dev} | {att.completeness_error():.1e} | {vs} |", flush=True)


if __name__ == "__main__":
    main()
