"""Engine time with and without the closed-form layer-norm tangent on GPT-2 and a BERT classifier.

Run ``python benchmarks/bench_norm_rules.py [--widths 16 128] [--steps 4] [--inputs 8] [--repeat 3]
[--threads 1] [--models gpt2,bert] [--profile N] [--rows-only] [--calls] [--min-elements N]``. Float64 on the
CPU, one thread by default. Records, for each width:

* a GPT-2 (``GPT2LMHeadModel`` from a config, 2 layers, 4 heads, dropout 0; ``bench_layer_rules_models.py``)
  trained with AdamW on arithmetic sequences, explained at the last position's logits;
* a BERT classifier (``BertForSequenceClassification`` from a config, 2 layers, 4 heads, dropout 0, the next term
  of the same sequences as its class).

Both take the layer-factored evaluator (``factored="auto"``), whose rows (the adaptive rule's refinement: each
row at its own step and point, :math:`h'` by forward mode in :math:`t`) normalise every layer's input by
``LayerNormRule.normalised``: with the rule its tangent is :func:`~explaind.kernel.layer_norm_jvp.layer_norm_dual`
(for inputs of at least ``MIN_ELEMENTS`` values; ``--min-elements 0``: all), without it forward mode's derivative
of ``native_layer_norm`` (the rule switched off in this process). Printed:

* with ``--calls``: microseconds per call of the closed form (at every size) and of forward mode on rows of
  several sizes;
* per evaluation: microseconds per row of ``evaluator.slopes`` on rows (4 steps x ``--inputs`` inputs x 16
  points), and the share of that time spent in the layer norms' forward-mode calls (torch's profiler, without
  the rule);
* per step: seconds per recorded step of the adaptive ``KernelReplica`` and of the adaptive
  ``InfluenceEstimator(keep=("train",))`` (fit and predict/transform);

each the least CPU time of this process (``time.process_time``) over ``--repeat`` rounds, the two modes taking
turns, with the ratio ``without / with`` and the largest relative difference of the results.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from bench_layer_rules_models import TinyGPT2, sequences, train
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning
from explaind.kernel import fused_jvp as fused_module
from explaind.kernel import layer_norm_jvp, layer_rules
from explaind.kernel.evaluate import Rows
from explaind.kernel.layer_norm_jvp import layer_norm_dual

NORMS = (F.layer_norm, torch.layer_norm, F.rms_norm, torch.rms_norm)


class TinyBert(nn.Module):
    """``BertForSequenceClassification`` from a config; token ids in, class logits out (no padding)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, length: int, classes: int):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * width, max_position_embeddings=length, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, num_labels=classes)
        self.bert = BertForSequenceClassification(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=tokens).logits


@contextlib.contextmanager
def without_rule() -> Iterator[None]:
    """Layer norms (and the other normalisations) by forward mode's own derivative inside this block."""
    rules = {f: fused_module._RULES.pop(f) for f in NORMS if f in fused_module._RULES}
    closed = layer_rules.layer_norm_dual
    layer_rules.layer_norm_dual = lambda *args, **kwargs: None
    try:
        yield
    finally:
        layer_rules.layer_norm_dual = closed
        fused_module._RULES.update(rules)


def mode(closed: bool) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if closed else without_rule()


def record(kind: str, width: int, steps: int, n_test: int) -> tuple[str, explaind.Trajectory, torch.Tensor]:
    X, y = sequences(n_test)
    torch.manual_seed(0)
    model = (TinyGPT2(32, width, 2, 4, 8) if kind == "gpt2" else TinyBert(32, width, 2, 4, 8, 32)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    traj = train(model, opt, X[:256], y[:256], steps, batch=16)
    return f"{'GPT-2' if kind == 'gpt2' else 'BERT classifier'}, width {width}", traj, X[256:]


def cpu_time(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def per_row(traj: explaind.Trajectory, X: torch.Tensor, repeat: int, top: int = 0) -> tuple[dict, dict, float]:
    """CPU seconds per row of the evaluator's rows with and without the rule, the results, and the layer norms'
    share of the time without it (torch's profiler; with ``top``, the ``top`` costliest operations printed)."""
    est = explaind.KernelReplica(quadrature="adaptive", device="cpu").fit(traj)
    engine = est.engine_
    explained = engine.explained(X, None, None, "bench")
    stack = engine.stack(0, min(4, traj.n_steps), X, explained)
    S, T, n = stack.n_steps, X.shape[0], 16
    units = torch.arange(S * T).repeat_interleave(n)
    t = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).repeat(S * T)
    rows = Rows(units // T, units % T, t)
    ev = engine.evaluator
    run = lambda: ev.slopes(stack, rows)  # noqa: E731
    if "rows" not in getattr(ev, "used", ()):
        run()  # the start-up check
    if "rows" not in getattr(ev, "used", ()):
        raise RuntimeError(f"the layer-factored rows are off on this model: {getattr(ev, 'state', None)}")
    out, best = {}, {True: float("inf"), False: float("inf")}
    for r in range(repeat):
        for closed in ((True, False) if r % 2 == 0 else (False, True)):
            with mode(closed):
                out[closed], took = cpu_time(run)
            best[closed] = min(best[closed], took / rows.t.shape[0])
    with without_rule(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    norm = sum(e.cpu_time_total for e in events if e.key == "aten::native_layer_norm")
    if top:
        print(f"rows without the rule, the {top} aten operations of most CPU time (self), share of the rows' time:")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"    {e.key}: {100 * e.self_cpu_time_total / max(total, 1):.1f}% ({e.count} calls)")
    return out, best, norm / max(total, 1)


def per_call(repeat: int) -> None:
    """Microseconds per call of ``layer_norm_dual`` and of forward mode's ``F.layer_norm`` on a dual input of ``M``
    rows of ``n`` values, scale and shift with tangents (``affine``) or none: the least CPU time of ``repeat``
    rounds of calls, the two taking turns."""
    print("| rows M | values n | affine | closed form (us) | forward mode (us) | ratio |\n|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    default, layer_norm_jvp.MIN_ELEMENTS = layer_norm_jvp.MIN_ELEMENTS, 0  # the closed form at every size
    for M, n in ((200, 16), (4096, 16), (32768, 16), (512, 128), (512, 768), (4096, 768)):
        for affine in (False, True):
            x, dx = (torch.randn(M, n, generator=gen, dtype=torch.float64) for _ in range(2))
            w, dw, b, db = (torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(4))
            reps = max(2, 2**21 // (M * n))
            with fwad.dual_level():
                xd = fwad.make_dual(x, dx)
                wd, bd = (fwad.make_dual(w, dw), fwad.make_dual(b, db)) if affine else (None, None)
                args = (xd, (n,), wd, bd)
                ways = {True: lambda args=args: layer_norm_dual(*args), False: lambda args=args: F.layer_norm(*args)}
                best = {True: float("inf"), False: float("inf")}
                for r in range(repeat):
                    for closed in ((True, False) if r % 2 == 0 else (False, True)):
                        start = time.process_time()
                        for _ in range(reps):
                            ways[closed]()
                        best[closed] = min(best[closed], (time.process_time() - start) / reps)
            print(f"| {M} | {n} | {'yes' if affine else 'no'} | {1e6 * best[True]:.0f} | {1e6 * best[False]:.0f} | "
                  f"{best[False] / best[True]:.2f}x |", flush=True)
    layer_norm_jvp.MIN_ELEMENTS = default
    print()


def per_step(job: Callable[[], Any], repeat: int) -> tuple[dict, dict]:
    out, best = {}, {True: float("inf"), False: float("inf")}
    for r in range(repeat):
        for closed in ((True, False) if r % 2 == 0 else (False, True)):
            with mode(closed):
                out[closed], took = cpu_time(job)
            best[closed] = min(best[closed], took)
    return out, best


#: the timed engine calls: ``(trajectory, test inputs) -> result``
JOBS: dict[str, Callable[[explaind.Trajectory, torch.Tensor], Any]] = {
    "replica, adaptive": lambda traj, X: explaind.KernelReplica(quadrature="adaptive", device="cpu").fit(traj)
    .predict(X),
    "influence keep=(train,), adaptive": lambda traj, X: explaind.InfluenceEstimator(
        keep=("train",), quadrature="adaptive", residual_tol=1.0, device="cpu").fit(traj).transform(X).values}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--inputs", type=int, default=8, help="test inputs")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per mode (the least CPU time is printed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="gpt2,bert", help="comma-separated subset of gpt2, bert")
    ap.add_argument("--profile", type=int, default=0, help="print the N costliest operations of the rows")
    ap.add_argument("--rows-only", action="store_true", help="time the rows only, not the estimators")
    ap.add_argument("--calls", action="store_true", help="time single layer-norm calls first")
    ap.add_argument("--min-elements", type=int, default=None,
                    help="layer_norm_jvp.MIN_ELEMENTS for the models (default: the module's, 2**17)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", category=ExplaindWarning)  # quadrature notes, the same for both modes
    print(f"float64, CPU, threads {args.threads}, {args.steps} recorded steps, {args.inputs} test inputs; least CPU "
          f"time of {args.repeat}, modes alternating; load {os.getloadavg()[0]:.1f} at start\n")
    if args.calls:
        per_call(args.repeat)
    if args.min_elements is not None:
        layer_norm_jvp.MIN_ELEMENTS = args.min_elements
    print(f"the models with layer_norm_jvp.MIN_ELEMENTS = {layer_norm_jvp.MIN_ELEMENTS}")
    print("| model | measurement | closed form | forward mode | ratio | layer-norm share | max rel. difference |")
    print("|---|---|---|---|---|---|---|")
    for width in args.widths:
        for kind in args.models.split(","):
            name, traj, X = record(kind, width, args.steps, args.inputs)
            out, best, share = per_row(traj, X, args.repeat, args.profile)
            diff = max(rel(out[True][k], out[False][k]) for k in (0, 1))
            print(f"| {name} | rows, us per row | {1e6 * best[True]:.1f} | {1e6 * best[False]:.1f} | "
                  f"{best[False] / best[True]:.2f}x | {100 * share:.1f}% | {diff:.1e} |", flush=True)
            for label, job in ({} if args.rows_only else JOBS).items():
                out, best = per_step(lambda job=job, traj=traj, X=X: job(traj, X), args.repeat)
                n = traj.n_steps
                print(f"| {name} | {label}, s per step | {best[True] / n:.3f} | {best[False] / n:.3f} | "
                      f"{best[False] / best[True]:.2f}x | | {rel(out[True], out[False]):.1e} |", flush=True)
    print(f"\nload {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
