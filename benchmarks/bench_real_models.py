"""Recording overhead on real models: a tiny GPT-2 language model and a ResNet-18, versus the plain loop.

Prints one table: for each model, the plain loop's time per step and peak memory, and the ratios of the
recorded loop to them, side by side, for

* ``memory``: ``TrajectoryRecorder``'s defaults with the trajectory in memory (update audit, the scheduled
  gradient check, random-state capture for dropout and batch norm);
* ``disk``: the same defaults with the store on (background writes, fsync, optimizer state every step);
* ``disk-nocheck``: the store on with the gradient check off (it recomputes a step's gradient at steps 0, 1 and
  the powers of 4, so its share of a short run is larger than of a long one: steps 4 and 16 of a 40-step run's
  timed steps 2..39, step 4 of a 12-step run's);
* ``disk-lean``: the store on with the audit and the gradient check off.

The models are built in this script: GPT-2 from ``transformers.GPT2Config`` (2 layers, ``n_embd=128``, 4 heads,
vocabulary 1024, dropout 0.1, SDPA attention; next-token cross entropy on sequences of 64 tokens, batch 16,
AdamW) and tests/resnet_model.py's ResNet-18 (BasicBlocks [2, 2, 2, 2], widths 64..512, batch norm, 3x3 stem
for 32x32 inputs; cross entropy, batch 32, SGD momentum). Every (model, mode, repeat) runs in a fresh child
process, so the peak resident set is that run's: ``VmHWM`` minus ``VmRSS`` taken after the imports, before the
model is built (model, optimizer state, data, activations and everything the recorder holds count). Times are per step
after two warm-up steps, the recorder's exit (draining the background writer) included; wall clock and
process CPU time (all threads), the best of ``--repeats``.

With ``--live`` (glibc only) the children run with ``MALLOC_MMAP_THRESHOLD_=65536``: every allocation of 64 KiB
or more gets a memory map of its own, given back when freed, so the peak resident set counts the bytes alive at
the peak rather than also the heap memory that the allocator keeps resident after a free (which depends on the
order of allocations: the default figures move by several tenths between runs on the ResNet-18).

Run: ``python benchmarks/bench_real_models.py [--steps N] [--repeats R] [--threads T] [--cases gpt2 resnet18]
[--modes disk ...] [--live]`` (``--modes``: the recorded modes to run, default all; the plain loop always runs)
Goals: <= 1.3x time with the store on, <= 1.5x peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from resnet_model import ResNet18  # noqa: E402  (the network the exactness tests record, at full width)

#: ``--live``: allocations from this many bytes up are memory maps of their own (glibc's ``M_MMAP_THRESHOLD``)
LIVE_MMAP_THRESHOLD = 1 << 16
MODES = ("plain", "memory", "disk", "disk-nocheck", "disk-lean")
VOCAB, SEQ = 1024, 64


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean next-token cross entropy of ``logits (n, T, V)`` against ``ids (n, T)``: each sequence's mean, averaged."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _case(name: str, device: torch.device):
    """``(model, optimizer, X, y, batch, forward, loss)`` of a case, seeded."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=128, n_layer=2, n_head=4)
        model = GPT2LMHeadModel(config).to(device)
        X = torch.randint(0, VOCAB, (16 * 8, SEQ), generator=gen).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        return model, opt, X, X, 16, lambda m, x: m(input_ids=x).logits, next_token_loss
    if name == "resnet18":
        model = ResNet18().to(device)
        X = torch.randn(32 * 4, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (32 * 4,), generator=gen).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, X, y, 32, lambda m, x: m(x), "cross_entropy"
    raise KeyError(name)


def train_step(model, opt, X, y, batch: int, forward, loss, rec, i: int) -> None:
    """Step ``i`` of a case's loop: batch ``i`` (cycling through ``X``), logged to ``rec`` unless it is ``None``."""
    idx = torch.arange(i * batch, (i + 1) * batch, device=X.device) % X.shape[0]
    opt.zero_grad()
    out = forward(model, X[idx])
    (F.cross_entropy(out, y[idx]) if loss == "cross_entropy" else loss(out, y[idx])).backward()
    if rec is not None:
        rec.log_batch(idx)
    opt.step()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(name: str, mode: str, steps: int, device: torch.device, root: str) -> dict[str, float]:
    """One timed run in this (fresh) process: per-step wall and CPU seconds, peak MB above the start."""
    import explaind

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    base = _status_kb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, opt, X, y, batch, forward, loss = _case(name, device)
    model.train()
    rec = None
    if mode != "plain":
        store = None if mode == "memory" else Path(root) / f"{name}-{mode}"
        options = {"disk-nocheck": {"check_gradients": False},
                   "disk-lean": {"audit": False, "check_gradients": False}}.get(mode, {})
        rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), store=store, **options)
        rec.__enter__()
    for i in range(steps):
        if i == 2:  # warm-up steps excluded
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
        train_step(model, opt, X, y, batch, forward, loss, rec, i)
    if rec is not None:
        rec.__exit__(None, None, None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = (_status_kb("VmHWM") - base) / 1024
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    return {"wall": wall / (steps - 2), "cpu": cpu / (steps - 2), "peak_mb": peak,
            "params": sum(p.numel() for p in model.parameters())}


def _spawn(args: argparse.Namespace, name: str, mode: str, root: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", name, mode, "--steps", str(args.steps), "--device", args.device,
           "--root", root]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(LIVE_MMAP_THRESHOLD)} if args.live else None
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name}/{mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cases", nargs="+", choices=("gpt2", "resnet18"), default=["gpt2", "resnet18"])
    parser.add_argument("--modes", nargs="+", choices=MODES[1:], default=list(MODES[1:]),
                        help="recorded modes to run (the plain loop always runs)")
    parser.add_argument("--live", action="store_true",
                        help="peak of the bytes alive: allocations from 64 KiB up mapped on their own (glibc)")
    parser.add_argument("--root", default=None, help="directory for the disk stores (default: a temp dir)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.root or tempfile.mkdtemp(prefix="explaind-bench-")
    if args.child:
        print(json.dumps(child(*args.child, args.steps, torch.device(args.device), root)))
        return
    print(f"device={args.device}  steps={args.steps} (2 warm-up)  repeats={args.repeats} (best of)  torch threads="
          f"{args.threads or torch.get_num_threads()}  load average={os.getloadavg()[0]:.1f}"
          + (f"  live bytes (MALLOC_MMAP_THRESHOLD_={LIVE_MMAP_THRESHOLD})" if args.live else ""))
    print("ratios = recorded / plain loop: time 'wall (cpu)', peak memory above the start of the run")
    shown = [m for m in MODES[1:] if m in args.modes]
    header = (f"{'model':<10}{'params':>10}{'plain ms':>10}{'plain MB':>10}"
              + "".join(f"{m + ' time':>19}{m + ' mem':>17}" for m in shown))
    print(header)
    print("-" * len(header))
    for name in args.cases:
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.repeats):
            for mode in ("plain", *shown):
                shutil.rmtree(Path(root) / f"{name}-{mode}", ignore_errors=True)
                got = _spawn(args, name, mode, root)
                old = best.setdefault(mode, got)
                best[mode] = {k: min(old[k], got[k]) for k in got}
        plain = best["plain"]
        cells = "".join(f"{best[m]['wall'] / plain['wall']:>12.2f} ({best[m]['cpu'] / plain['cpu']:.2f})"
                        f"{best[m]['peak_mb'] / plain['peak_mb']:>17.2f}" for m in shown)
        print(f"{name:<10}{int(plain['params']):>10}{plain['wall'] * 1e3:>10.1f}{plain['peak_mb']:>10.0f}{cells}")
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
