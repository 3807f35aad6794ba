"""Recording overhead of TrajectoryRecorder versus the plain training loop.

Prints one table: for each model (the quickstart's 64-32-10 MLP, a ~1M-parameter MLP, a small
CNN and the modular-arithmetic transformer) and each optimizer, the wall time per step of the
bare loop and the ratios of the recorded loop to it, by wall time and by process CPU time (all
threads; steadier on a shared machine), side by side:

* ``memory`` / ``disk`` / ``disk no-fsync``: audit and gradient check off; disk runs use
  background writes, with and without fsync, and store the optimizer state every step;
* ``memory+audit`` / ``disk+audit``: the same with the update audit on;
* ``default``: ``TrajectoryRecorder``'s defaults in memory (audit on, the scheduled gradient check);
* optional (``--modes``): ``disk-stateK`` (``save_optimizer_state=K``), ``disk-sparseK``
  (``checkpoint_every=K``), both like ``disk``, optionally with ``+audit``.

A second table gives the CPU time of the loop's own thread (``time.thread_time``) per step as a ratio
to the plain loop: the recorder's work on the training loop's hot path, without the work moved to the
store's writer thread or the audit worker, and steady on a loaded machine where wall time is not.

Run: ``python benchmarks/bench_recording.py [--steps N] [--repeats R] [--device cpu|cuda] [--threads T]
[--cases mlp-small mlp-1m ...] [--modes memory disk disk-state10 ...]``
Goals: <= 1.3x in memory, <= 2x to disk; <= 1.3x with the store on a 1M-parameter model.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import explaind
from explaind.models import build_model
from explaind.plugins import get_entry

MODES = ("plain", "memory", "memory+audit", "default", "disk", "disk+audit", "disk-nofsync")
_EXTRA = re.compile(r"disk-(state|sparse)([1-9][0-9]*)(\+audit)?")
CASES = {
    "mlp-small": ("mlp", {"in_features": 64, "hidden_sizes": [32], "out_features": 10}, 64),
    "mlp-1m": ("mlp", {"in_features": 784, "hidden_sizes": [1024, 256], "out_features": 10}, 64),
    "cnn": ("cnn", {"in_channels": 1, "image_size": 16, "channels": [16, 32], "out_features": 10}, 64),
    "modular_transformer": ("modular_transformer", {}, 256),
}


def _data(name: str, config: dict, n: int, device: torch.device):
    record = get_entry("architecture", name)
    x, y = record.example_input(record.config(**config), n, torch.Generator().manual_seed(0))
    return x.to(device), y.to(device)


def _run(name, config, batch, opt_name, steps, mode, device, root):
    model = build_model(name, config, seed=0).to(device)
    params = model.parameters()
    opt = torch.optim.Adam(params, lr=1e-3) if opt_name == "adam" else torch.optim.SGD(params, lr=0.05, momentum=0.9)
    X, y = _data(name, config, batch * 8, device)
    idx_list = [torch.arange(i * batch, (i + 1) * batch) % X.shape[0] for i in range(steps)]
    rec = None
    if mode != "plain":
        store = None
        if mode.startswith("disk"):
            store = Path(root) / f"{name}-{opt_name}"
            shutil.rmtree(store, ignore_errors=True)
        options = {} if mode == "default" else {"audit": mode.endswith("+audit"), "check_gradients": False}
        extra = _EXTRA.fullmatch(mode)
        if extra:
            options["save_optimizer_state" if extra[1] == "state" else "checkpoint_every"] = int(extra[2])
        rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store,
                                          store_data=False, fsync=mode.startswith("disk") and "nofsync" not in mode,
                                          **options)
        rec.__enter__()
    try:
        for i, idx in enumerate(idx_list):
            if i == 2:  # warm-up steps excluded
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start, cpu_start, loop_start = time.perf_counter(), time.process_time(), time.thread_time()
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            if rec is not None:
                rec.log_batch(idx)
            opt.step()
        if rec is not None:
            rec.__exit__(None, None, None)  # includes draining the background writer
            rec = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        loop = time.thread_time() - loop_start
    finally:
        if rec is not None:
            rec.__exit__(None, None, None)
    return elapsed / (steps - 2), cpu / (steps - 2), loop / (steps - 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--root", default=None, help="directory for the disk stores (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="models to measure")
    parser.add_argument("--modes", nargs="+", default=list(MODES[1:]),
                        help="recorded modes (the plain loop is always run): those above, disk-stateK, disk-sparseK")
    args = parser.parse_args()
    unknown = [m for m in args.modes if m not in MODES[1:] and not _EXTRA.fullmatch(m)]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES[1:])}, disk-stateK or disk-sparseK[+audit]")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    root = args.root or tempfile.mkdtemp(prefix="explaind-bench-")
    print(f"device={device}  steps={args.steps}  repeats={args.repeats} (best of)  torch threads="
          f"{torch.get_num_threads()}  load average={os.getloadavg()[0]:.1f}  store root={root}")
    print("ratios = recorded / plain loop, 'wall (cpu)': wall-clock time and process CPU time")
    shown = tuple(args.modes)
    header = f"{'model':<21}{'params':>8}{'batch':>6}{'optim':>6}{'plain ms':>10}" + "".join(
        f"{m:>15}" for m in shown)
    print(header)
    print("-" * len(header))
    loop_rows = []
    for label in args.cases:
        name, config, batch = CASES[label]
        n_params = sum(p.numel() for p in build_model(name, config, seed=0).parameters())
        for opt_name in ("sgd", "adam"):
            wall: dict[str, float] = {}
            cpu: dict[str, float] = {}
            loop: dict[str, float] = {}
            for _ in range(args.repeats):
                for mode in ("plain", *shown):
                    gc.collect()
                    t, c, th = _run(name, config, batch, opt_name, args.steps, mode, device, root)
                    wall[mode] = min(wall.get(mode, float("inf")), t)
                    cpu[mode] = min(cpu.get(mode, float("inf")), c)
                    loop[mode] = min(loop.get(mode, float("inf")), th)
            ratio = {m: f"{wall[m] / wall['plain']:.2f} ({cpu[m] / cpu['plain']:.2f})" for m in shown}
            cells = "".join(f"{ratio[m]:>15}" for m in shown)
            print(f"{label:<21}{n_params:>8}{batch:>6}{opt_name:>6}{wall['plain'] * 1e3:>10.2f}{cells}")
            cells = "".join(f"{loop[m] / loop['plain']:>15.2f}" for m in shown)
            loop_rows.append(f"{label:<21}{n_params:>8}{batch:>6}{opt_name:>6}{loop['plain'] * 1e3:>10.2f}{cells}")
    print("\nthe loop's thread: CPU time per step, ratio recorded / plain loop ('plain ms': the plain loop's)")
    print(header)
    print("-" * len(header))
    print("\n".join(loop_rows))
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
