"""Cost per step of the recorder's attribute watch (docs/recording.md, "Python attributes changed between steps").

At every step the recorder fingerprints the model's non-tensor state once (``snapshot``, at the step's first
gradient-enabled forward) and compares it with the previous step's (``differences``); nothing else runs unless
something changed. This script measures, in CPU seconds (``time.process_time``, the median of ``--repeats``
calls), that work next to one plain training step (forward, backward, ``SGD.step``, batch ``--batch``, no
recorder) on the same model, and the per-step CPU time of a recorded run (in memory, default options) with the
watch on and off (``ignore_attributes=["*"]``), alternated ``--runs`` times.

Models: an MLP 784-1024-256-10 (1.07M parameters, float32); the same MLP scaling its input by a plain tensor
attribute of 784 x 1024 float32 elements (3.2 MB, not a buffer: value checksums and a clone per step, see
``explaind/trajectory/_tensor_watch.py``); GPT-2 built from a config (no download), 2 layers, width 64,
vocabulary 100, sequences of 32 tokens ("tiny", its ``GPT2Config`` fingerprinted field by field); the same with 12
layers (more modules to walk). A second table gives the CPU time of the check that compares the model with the
fingerprint a recording keeps (``explaind/trajectory/_attribute_record.py``), run once per ``Trajectory.load`` /
``fit``, when the tree has it, and a third the CPU time of the plain tensor's value checksum alone against the
16 block sums it replaced (explaind/trajectory/_tensor_watch.py), when the tree has both.

Before/after: run this script with ``PYTHONPATH`` on each tree (the script only imports ``snapshot`` and
``differences``, which both have).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_attribute_watch.py [--repeats 50] [--runs 3] [--steps 8]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.trajectory._attributes import differences, snapshot


def _cpu(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def mlp() -> tuple[nn.Module, Any, Any, str]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, torch.randn(256, 784), torch.randint(0, 10, (256,)), "cross_entropy"


class MaskedMLP(nn.Module):
    """The MLP with its input scaled by ``self.scale``, a plain tensor attribute of shape (784, 1024) (not a buffer),
    read through its row sums."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()[0]
        self.scale = torch.ones(784, 1024)
        self.row = self.scale.sum(1) / 1024

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.row)


def masked_mlp() -> tuple[nn.Module, Any, Any, str]:
    torch.manual_seed(0)
    _, X, y, loss = mlp()
    return MaskedMLP(), X, y, loss


def gpt2(layers: int) -> Callable[[], tuple[nn.Module, Any, Any, str]]:
    def build() -> tuple[nn.Module, Any, Any, str]:
        from transformers import GPT2Config, GPT2LMHeadModel

        from explaind.inputs import Inputs

        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=layers, n_head=2, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
        ids = torch.randint(0, 100, (256, 32))
        return GPT2LMHeadModel(cfg), Inputs({"input_ids": ids}), ids, "causal_lm"
    return build


def _rows(X: Any, idx: torch.Tensor) -> Any:
    from explaind.inputs import Inputs

    return {k: v[idx] for k, v in X.data.items()} if isinstance(X, Inputs) else X[idx]


def _loss(model: nn.Module, X: Any, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    x = _rows(X, idx)
    if isinstance(x, dict):
        logits = model(**x).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[idx][:, 1:].reshape(-1))
    return F.cross_entropy(model(x), y[idx])


def _step(model: nn.Module, opt: Any, X: Any, y: torch.Tensor, idx: torch.Tensor, rec: Any = None) -> None:
    opt.zero_grad()
    _loss(model, X, y, idx).backward()
    if rec is not None:
        rec.log_batch(idx)
    opt.step()


def _recorded(build: Callable, steps: int, batch: int, ignore: list[str]) -> float:
    """CPU seconds per recorded step (in memory, default options, gradient checks off)."""
    model, X, y, loss = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), check_gradients=False,
                                      ignore_attributes=ignore)
    with rec:
        _step(model, opt, X, y, torch.arange(batch), rec)  # the first step outside the timing
        start = time.process_time()
        for s in range(1, steps + 1):
            _step(model, opt, X, y, (torch.arange(batch) + s * batch) % 256, rec)
        return (time.process_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; CPU seconds per call (median)")
    print("| model | parameters | modules | fingerprinted entries | snapshot ms | compare ms | plain step ms | "
          "watch / step | recorded step ms, watch off | watch on | on / off |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    models = (("MLP 784-1024-256-10", mlp), ("MLP + 3.2 MB plain tensor", masked_mlp),
              ("GPT-2 tiny (2 layers)", gpt2(2)), ("GPT-2 12 layers", gpt2(12)))
    checks = []
    for name, build in models:
        model, X, y, _ = build()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        idx = torch.arange(args.batch)
        snap = snapshot(model)
        t_snap = _cpu(partial(snapshot, model), args.repeats)
        t_cmp = _cpu(partial(differences, snap, snapshot(model)), args.repeats)
        t_step = _cpu(partial(_step, model, opt, X, y, idx), max(3, args.repeats // 5))
        off, on = [], []
        for _ in range(args.runs):  # alternated, so a change of load hits both
            off.append(_recorded(build, args.steps, args.batch, ["*"]))
            on.append(_recorded(build, args.steps, args.batch, []))
        n_params = sum(p.numel() for p in model.parameters())
        off_m, on_m = statistics.median(off), statistics.median(on)
        print(f"| {name} | {n_params / 1e6:.2f}M | {len(list(model.modules()))} | {len(snap.frozen)} | "
              f"{t_snap * 1e3:.3f} | {t_cmp * 1e3:.3f} | {t_step * 1e3:.2f} | {(t_snap + t_cmp) / t_step:.4f} | "
              f"{off_m * 1e3:.2f} | {on_m * 1e3:.2f} | {on_m / off_m:.3f} |", flush=True)
        checks.append((name, _check_cost(model, args.repeats)))
    _checksum_cost(args.repeats)
    if any(t is not None for _, t in checks):
        print("\n| model | compare with the kept fingerprint ms (once per load / fit) |\n|---|---|")
        for name, t in checks:
            print(f"| {name} | {t * 1e3:.3f} |")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def _checksum_cost(repeats: int) -> None:
    """CPU time of the plain tensor's value checksum alone, and of the 16 block sums it replaced (``block_sums``,
    still computed for format-1 records), when the tree has them, on float32 tensors of 0.26, 3.2 and 64 MB."""
    from explaind.trajectory import _tensor_watch

    if not hasattr(_tensor_watch, "block_sums"):
        return
    print("\n| plain tensor (float32) | checksum ms (row and column sums) | block_sums ms (the checksum before) |")
    print("|---|---|---|")
    for shape in ((256, 256), (784, 1024), (4096, 4096)):
        t = torch.randn(*shape)
        size = t.numel() * 4 / 1e6
        print(f"| {shape[0]} x {shape[1]} ({size:.2f} MB) | "
              f"{_cpu(partial(_tensor_watch.checksum, t), _repeats_for(repeats, size)) * 1e3:.3f} | "
              f"{_cpu(partial(_tensor_watch.block_sums, t), _repeats_for(repeats, size)) * 1e3:.3f} |", flush=True)


def _repeats_for(repeats: int, megabytes: float) -> int:
    """Fewer repeats for the 64 MB tensor."""
    return max(3, repeats // 10) if megabytes > 16 else repeats


def _check_cost(model: nn.Module, repeats: int) -> float | None:
    """CPU seconds of ``check_model`` against a record of ``model`` itself (``None`` in a tree without it)."""
    try:
        from explaind.trajectory._attribute_record import check_model, keep_record
    except ImportError:
        return None
    holder = type("Held", (), {})()
    holder.attribute_record = keep_record(snapshot(model), (), set())
    return _cpu(partial(check_model, holder, model, "bench"), max(3, repeats // 5))


if __name__ == "__main__":
    main()
