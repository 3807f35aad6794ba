"""Recording overhead of TrajectoryRecorder versus the plain training loop.

For each model and each optimizer (SGD with momentum, Adam; ``--optimizers`` adds RMSprop, Adagrad, NAdam,
RAdam and Adamax, each at torch's defaults but the learning rate) the wall time per step of the bare
loop and the ratios of the recorded loop to it, by wall time and by process CPU time (all threads;
steadier on a shared machine). The models: the quickstart's 64-32-10 MLP (``mlp-small``), three of
about 1M parameters -- the 784-1024-256-10 MLP (``mlp-1m``, batch 64), a CIFAR-style CNN on 32x32
images (``cnn-1m``, batch 64) and a causal transformer LM with context 64 (``lm-1m``, batch 16) --
a small CNN and the modular-arithmetic transformer. ``--batch`` runs each case at other batch sizes:
the recorder's work per step is O(parameters), the step's O(parameters x batch x positions), so the
ratio falls as the plain step's time per parameter (column ``ns/param``) rises. The modes:

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
[--cases mlp-1m cnn-1m lm-1m ...] [--batch 16 64 ...] [--optimizers sgd adam rmsprop adagrad nadam radam adamax]
[--modes memory disk disk-state10 disk-sparse10 ...]``
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
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import explaind
from explaind.models import build_model
from explaind.plugins import get_entry

MODES = ("plain", "memory", "memory+audit", "default", "disk", "disk+audit", "disk-nofsync")
_EXTRA = re.compile(r"disk-(state|sparse)([1-9][0-9]*)(\+audit)?")


class Case(NamedTuple):
    """A benchmarked model: a seeded factory, ``data(n)`` giving ``(X, y)`` of ``n`` samples, its batch and loss."""

    build: Callable[[], nn.Module]
    data: Callable[[int], tuple[Tensor, Tensor]]
    batch: int
    loss: str  # "cross_entropy" (class logits) or "causal_lm" (token logits (n, T, V), labels = the input ids)


def _registered(name: str, config: dict, batch: int) -> Case:
    """A case of a registered architecture, built with ``seed=0``, on its ``example_input``."""
    record = get_entry("architecture", name)

    def data(n: int) -> tuple[Tensor, Tensor]:
        return record.example_input(record.config(**config), n, torch.Generator().manual_seed(0))

    return Case(lambda: build_model(name, config, seed=0), data, batch, "cross_entropy")


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return factory()

    return build


class CifarCNN(nn.Module):
    """A small CIFAR-style CNN, 1,005,082 parameters: two conv-ReLU-pool stages (3-32-64) and a 4096-240-10 head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Linear(64 * 8 * 8, 240), nn.ReLU(), nn.Linear(240, 10))

    def forward(self, x: Tensor) -> Tensor:
        """``(n, 3, 32, 32) -> (n, 10)``."""
        return self.head(self.features(x).flatten(1))


class _Block(nn.Module):
    """Pre-LayerNorm causal self-attention (``scaled_dot_product_attention``) and a GELU MLP, no dropout."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d)
        x = x + self.out(z)
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A causal transformer LM, 1,063,680 parameters: vocabulary 1024, width 128, 4 blocks of 4 heads, context 64."""

    def __init__(self, vocab: int = 1024, d: int = 128, layers: int = 4, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(_Block(d, heads) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        """``(n, T)`` token ids -> ``(n, T, vocab)`` logits."""
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.norm(self.blocks(x)))


def _images(n: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _tokens(n: int) -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, 1024, (n, 64), generator=torch.Generator().manual_seed(0))
    return ids, ids


CASES = {
    "mlp-small": _registered("mlp", {"in_features": 64, "hidden_sizes": [32], "out_features": 10}, 64),
    "mlp-1m": _registered("mlp", {"in_features": 784, "hidden_sizes": [1024, 256], "out_features": 10}, 64),
    "cnn-1m": Case(_seeded(CifarCNN), _images, 64, "cross_entropy"),
    "lm-1m": Case(_seeded(TinyLM), _tokens, 16, "causal_lm"),
    "cnn": _registered("cnn", {"in_channels": 1, "image_size": 16, "channels": [16, 32], "out_features": 10}, 64),
    "modular_transformer": _registered("modular_transformer", {}, 256),
}


#: ``--optimizers``: each builds its optimizer on the model's parameters (single-tensor or foreach path: torch's
#: default for the device)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=1e-3),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=1e-2),
    "nadam": lambda params: torch.optim.NAdam(params, lr=1e-3),
    "radam": lambda params: torch.optim.RAdam(params, lr=1e-3),
    "adamax": lambda params: torch.optim.Adamax(params, lr=1e-3),
    "adafactor": lambda params: torch.optim.Adafactor(params, lr=1e-2),
}


def _loss(case: Case, out: Tensor, y: Tensor) -> Tensor:
    """The loop's loss: the mean cross-entropy over samples, or over the next-token predictions of an LM."""
    if case.loss == "causal_lm":
        return F.cross_entropy(out[:, :-1].flatten(0, 1), y[:, 1:].flatten())
    return F.cross_entropy(out, y)


def _run(case: Case, batch: int, opt_name: str, steps: int, mode: str, device: torch.device, root: str,
         tag: str = "run") -> tuple[float, float, float]:
    """Seconds per step after two warm-up steps: wall, process CPU and the loop thread's CPU."""
    model = case.build().to(device)
    opt = OPTIMIZERS[opt_name](model.parameters())
    X, y = (t.to(device) for t in case.data(batch * 8))
    idx_list = [torch.arange(i * batch, (i + 1) * batch) % X.shape[0] for i in range(steps)]
    rec = None
    if mode != "plain":
        store = None
        if mode.startswith("disk"):
            store = Path(root) / f"{tag}-{opt_name}"
            shutil.rmtree(store, ignore_errors=True)
        options = {} if mode == "default" else {"audit": mode.endswith("+audit"), "check_gradients": False}
        extra = _EXTRA.fullmatch(mode)
        if extra:
            options["save_optimizer_state" if extra[1] == "state" else "checkpoint_every"] = int(extra[2])
        rec = explaind.TrajectoryRecorder(model, opt, loss=case.loss, train_data=(X, y), store=store,
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
            _loss(case, model(X[idx]), y[idx]).backward()
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


def _ratios(rows: list[tuple[str, dict[str, float]]], shown: tuple[str, ...], cells: Callable) -> None:
    header = f"{'model':<11}{'params':>9}{'batch':>6}{'optim':>8}{'load':>6}{'plain ms':>10}{'ns/param':>10}" + "".join(
        f"{m:>15}" for m in shown)
    print(header)
    print("-" * len(header))
    for prefix, values in rows:
        print(prefix + "".join(f"{cells(values, m):>15}" for m in shown))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--root", default=None, help="directory for the disk stores (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="models to measure")
    parser.add_argument("--batch", nargs="+", type=int, default=None,
                        help="batch sizes to run each case at (default: each case's own)")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=["sgd", "adam"])
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
    shown = tuple(args.modes)
    rows: list[tuple[str, dict[str, float]]] = []
    for label in args.cases:
        case = CASES[label]
        n_params = sum(p.numel() for p in case.build().parameters())
        for batch in args.batch or [case.batch]:
            for opt_name in args.optimizers:
                best: dict[str, float] = {}
                for _ in range(args.repeats):
                    for mode in ("plain", *shown):
                        gc.collect()
                        times = _run(case, batch, opt_name, args.steps, mode, device, root, label)
                        for kind, t in zip(("wall", "cpu", "loop"), times):
                            best[f"{kind} {mode}"] = min(best.get(f"{kind} {mode}", float("inf")), t)
                plain = best["loop plain"]
                prefix = (f"{label:<11}{n_params:>9}{batch:>6}{opt_name:>8}{os.getloadavg()[0]:>6.1f}"
                          f"{best['wall plain'] * 1e3:>10.2f}"
                          f"{plain * 1e9 / n_params:>10.1f}")
                rows.append((prefix, best))
    print(f"load average at the end={os.getloadavg()[0]:.1f}")
    print("\n'load': the load average when the row was done; 'plain ms': the plain loop's wall time per step; "
          "'ns/param': its loop-thread CPU time per step per "
          "parameter\n(the compute per parameter: the recorder's own work per step is O(parameters), so "
          "its ratio falls as this rises)")
    print("\nwhole process: recorded / plain loop, wall time (process CPU time, all threads)")
    _ratios(rows, shown, lambda v, m: f"{v[f'wall {m}'] / v['wall plain']:.2f} ({v[f'cpu {m}'] / v['cpu plain']:.2f})")
    print("\nthe loop's thread: CPU time per step, recorded / plain loop (the recorder's hot path; steady under load)")
    _ratios(rows, shown, lambda v, m: f"{v[f'loop {m}'] / v['loop plain']:.2f}")
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
