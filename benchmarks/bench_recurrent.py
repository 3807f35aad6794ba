"""Unrolled recurrent layers: their cost against torch's fused kernels, and the engine's time per step, in one run.

Run ``python benchmarks/bench_recurrent.py [--steps N] [--inputs T] [--length L]``. For an LSTM and a GRU
token classifier (``Embedding(50, 16)``, one recurrent layer of 32 units, ``Linear(32, 4)``; float64), it
trains ``--steps`` SGD steps of 16 sequences with the recorder on, then prints one table:

* ``fused``: one forward and backward of a training batch through torch's own kernel (``torch.lstm``);
* ``loop``: the same through a plain per-step loop (``x_t W_ih^T`` computed inside the loop, each gate
  its own operation: the form of the first unrolled implementation, written out in this script);
* ``unrolled``: the same through explaind's unrolled form (``explaind/kernel/recurrent.py``: the input
  projection of all steps before the loop);
* the engine's time per recorded step, ``KernelReplica`` (Gauss-Legendre 4) and ``InfluenceEstimator``
  (``keep=("train",)``), with the loop form swapped in and with explaind's form, and the largest
  relative difference between the two results.

Every job runs once untimed (warm-up); times are the least of ``--repeat`` (forward and backward) or
``--engine-repeat`` (engine) runs after it, the loop form and explaind's alternating; ratios are within
this run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_layer_rules_models import train  # noqa: E402  (the recorded plain loop)

import explaind
from explaind.kernel import rewrites
from explaind.kernel.rewrites import FusedKernelRewrite

VOCAB, EMB, HIDDEN, CLASSES, BATCH = 50, 16, 32, 4, 16


class Classifier(nn.Module):
    """Token ids ``(n, L)`` -> embedding -> recurrent layer -> last step -> linear read-out."""

    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMB)
        self.rnn = cell(EMB, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


def loop_kernel(kind: str, args: Sequence[Any], packed: Any) -> tuple[Tensor, ...]:
    """The per-step loop form of a single-layer, one-direction, padded ``torch.lstm``/``torch.gru`` with biases."""
    x, hx, params, _, layers, _, _, bidirectional, batch_first = args
    if layers != 1 or bidirectional:
        raise ValueError("the loop form of this benchmark covers one layer, one direction")
    w_ih, w_hh, b_ih, b_hh = params
    seq = x.transpose(0, 1) if batch_first else x
    h = hx[0][0] if kind == "lstm" else hx[0]
    c = hx[1][0] if kind == "lstm" else None
    ys = []
    for t in range(seq.shape[0]):
        if kind == "lstm":
            gates = seq[t] @ w_ih.T + h @ w_hh.T + b_ih + b_hh
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            ir, iz, in_ = (seq[t] @ w_ih.T + b_ih).chunk(3, dim=-1)
            hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, dim=-1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            h = (1 - z) * n + z * h
        ys.append(h)
    out = torch.stack(ys)
    out = out.transpose(0, 1) if batch_first else out
    return (out, h[None], c[None]) if kind == "lstm" else (out, h[None])


def timed_pair(slow: Callable[[], Any], fast: Callable[[], Any], repeat: int) -> tuple[Any, float, Any, float]:
    """Both results and the least time of ``repeat`` runs each, the two alternating after one warm-up run each.

    The least time is the one the machine's other load disturbs least; alternating spreads that load
    over both sides of each ratio.
    """
    with loop_form():
        out_slow = slow()
    out_fast, t_slow, t_fast = fast(), [], []
    for _ in range(repeat):
        with loop_form():
            start = time.perf_counter()
            out_slow = slow()
            t_slow.append(time.perf_counter() - start)
        start = time.perf_counter()
        out_fast = fast()
        t_fast.append(time.perf_counter() - start)
    return out_slow, min(t_slow), out_fast, min(t_fast)


def record(cell: type[nn.RNNBase], steps: int, length: int) -> tuple[Any, nn.Module, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    X = torch.randint(0, VOCAB, (256, length), generator=gen)
    y = torch.randint(0, CLASSES, (256,), generator=gen)
    torch.manual_seed(0)
    model = Classifier(cell).double()
    traj = train(model, torch.optim.SGD(model.parameters(), lr=0.1), X, y, steps, BATCH)
    return traj, model, X, y


def forward_backward(model: nn.Module, X: Tensor, y: Tensor, rewrite: bool) -> None:
    """One training forward and backward, through torch's kernel or (``rewrite``) the unrolled form."""
    model.zero_grad()
    with FusedKernelRewrite() if rewrite else contextlib.nullcontext():
        F.cross_entropy(model(X), y).backward()


@contextlib.contextmanager
def loop_form() -> Iterator[None]:
    """Inside the block explaind's recurrent kernels are replaced by :func:`loop_kernel`."""
    saved = rewrites.run_kernel
    rewrites.run_kernel = loop_kernel
    try:
        yield
    finally:
        rewrites.run_kernel = saved


def engine_jobs(traj: Any, X: Tensor) -> dict[str, Callable[[], Tensor]]:
    return {
        "replica GL4": lambda: torch.as_tensor(explaind.KernelReplica(
            quadrature="gauss-legendre", device="cpu").fit(traj).predict(X)),
        "influence train": lambda: explaind.InfluenceEstimator(
            keep=("train",), quadrature="gauss-legendre", residual_tol=1.0, device="cpu").fit(traj).transform(X).values,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--length", type=int, default=16, help="time steps per sequence")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs of a forward and backward")
    ap.add_argument("--engine-repeat", type=int, default=3, help="timed runs of an engine job")
    args = ap.parse_args()
    print(f"token classifier, Embedding({VOCAB}, {EMB}) -> cell({EMB}, {HIDDEN}) -> Linear({HIDDEN}, {CLASSES}), "
          f"length {args.length}, batch {BATCH}, {args.steps} SGD steps, {args.inputs} test inputs, float64, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| cell | fused fwd+bwd (ms) | loop / fused | unrolled / fused | engine job | loop (s/step) "
          "| unrolled (s/step) | unrolled / loop | max rel. difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in (nn.LSTM, nn.GRU):
        rows(cell, args)


def rows(cell: type[nn.RNNBase], args: argparse.Namespace) -> None:
    """The table rows of one cell type."""
    traj, model, X, y = record(cell, args.steps, args.length)
    Xb, yb = X[:BATCH], y[:BATCH]
    forward_backward(model, Xb, yb, False)
    fused = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        forward_backward(model, Xb, yb, False)
        fused.append(time.perf_counter() - start)
    _, t_loop, _, t_new = timed_pair(lambda: forward_backward(model, Xb, yb, True),
                                     lambda: forward_backward(model, Xb, yb, True), args.repeat)
    t_fused = min(fused)
    head = f"| {cell.__name__} | {1e3 * t_fused:.2f} | {t_loop / t_fused:.1f}x | {t_new / t_fused:.1f}x"
    for label, job in engine_jobs(traj, X[-args.inputs:]).items():
        slow, t_slow, fast, t_fast = timed_pair(job, job, args.engine_repeat)
        diff = float((fast - slow).abs().max() / slow.abs().max())
        print(f"{head} | {label} | {t_slow / args.steps:.3f} | {t_fast / args.steps:.3f} | "
              f"{t_fast / t_slow:.2f}x | {diff:.1e} |", flush=True)
        head = "| | | |"


if __name__ == "__main__":
    main()
