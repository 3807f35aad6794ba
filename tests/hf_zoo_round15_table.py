"""Prints one row per case of tests/_zoo15_cases.py, the runs of tests/test_hf_zoo_round15.py and
tests/test_hf_zoo_round15_more.py (not collected by pytest): verdict, replica error against the trained model in
evaluation mode, residual share, ``keep=("train",)`` error against the slow float64 loop reference, that
reference's own quadrature error, seconds, the gradient check's largest mismatch, the conversions to float32 found
and the first words of a refusal or warning. Rows left from earlier rounds: ``levit_kinks`` (LeViT's kinks per
Hardswish module), ``levit_scales`` (its Hardswish inputs and logits in evaluation mode before and after training
at two rates), ``levit_cache_emptied`` (round 11's LeViT, explaind's figures), ``levit_silu`` (the same with SiLU
for its Hardswish activations) and ``levit_converging`` (at AdamW 1e-4), both against ``BufferReplayReference``,
``ctrl_cap`` (round 14's CTRL's train scores with the adaptive rule's cap raised) and ``swiftformer`` (round 10's
SwiftFormer, explaind's figures).

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/hf_zoo_round15_table.py [case ...]``
from the repository root. The load average comes first.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
from _zoo9_kit import N_TEST, logits_of, record, run
from _zoo14_cases import CASES as ROUND14
from _zoo15_cases import CASES, LEFT, evaluation_scales, kinks_per_module
from hf_zoo_round9_table import _short
from hf_zoo_round11_table import print_table, result_row
from reference import rel_err

import explaind
from explaind.exceptions import ExplaindError, ExplaindWarning
from explaind.kernel import adaptive


def row(name: str) -> str:
    """The table row of case ``name``."""
    start = time.perf_counter()
    try:
        case, reference = LEFT[name] if name in LEFT else (CASES[name], True)
        got = run(case, reference)
    except (ExplaindError, RuntimeError, TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        seconds = time.perf_counter() - start
        return f"| {name} | loud: {type(exc).__name__} | | | | | {seconds:.0f} | {_short(str(exc))} |"
    return result_row(name, got, time.perf_counter() - start,
                      f" gradient check {got['check']:.2g}; float32 casts {got['casts']};")


def levit_kinks(name: str) -> str:
    """LeViT (its attention-bias cache emptied): the sign changes of each Hardswish module's input, at -3 and 3,
    between the 257 points of a grid along each step, summed over the steps and held-out inputs."""
    model, traj, X, _ = record(LEFT["levit_cache_emptied"][0])
    counts = kinks_per_module(model, traj, X)
    return f"| {name} | | | | | | | {'; '.join(f'{k} {v}' for k, v in counts.items())} |"


def _capped(case_name: str, caps: tuple[int, ...], influence: bool) -> str:
    """The replica's (or the influence's train scores') error at each cap of the adaptive rule (``MAX_EVALS``,
    with ``MAX_DEPTH`` raised with it), and the seconds of each."""
    case = LEFT[case_name][0] if case_name in LEFT else ROUND14[case_name]
    model, traj, X, y = record(case)
    with torch.no_grad():
        truth = logits_of(model(**X)).reshape(N_TEST, -1)
    ref = None
    if influence:
        from _zoo9_kit import Float64ReplayReference
        ref = Float64ReplayReference(traj, X, target=case.target, loss_fn=case.ref_loss, panels=case.panels, y=y)
        expected = ref.kept(("train",))
    parts, before = [], (adaptive.MAX_EVALS, adaptive.MAX_DEPTH)
    try:
        for cap in caps:
            adaptive.MAX_EVALS, adaptive.MAX_DEPTH = cap, max(before[1], cap // 64)
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ExplaindWarning)
                if influence:
                    est = explaind.InfluenceEstimator(keep=("train",), target=case.target, tol=case.tol, device="cpu")
                    err = rel_err(est.fit(traj).transform(X, y).values, expected)
                else:
                    err = rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X), truth)
            warned = sum(issubclass(w.category, ExplaindWarning) for w in caught)
            parts.append(f"cap {cap}: {err:.2g}, {warned} warnings ({time.perf_counter() - start:.0f} s)")
    finally:
        adaptive.MAX_EVALS, adaptive.MAX_DEPTH = before
    return "; ".join(parts)


def ctrl_cap(name: str) -> str:
    """CTRL's train scores against the reference at the adaptive rule's cap 4096 and above."""
    return f"| {name} | | | | | | | {_capped('ctrl', (4096, 16384), True)} |"


def levit_scales(name: str, rates: tuple[float, ...] = (0.02, 1e-4)) -> str:
    """LeViT (its cache emptied): the largest input of its Hardswish activations over the held-out inputs in
    evaluation mode, before training and after its 3 AdamW steps at each of ``rates``, and the largest logit
    (tests/_zoo15_cases.py's ``evaluation_scales``)."""
    parts = []
    for lr in rates:
        before, after, logit = evaluation_scales(LEFT["levit_cache_emptied"][0], lr)
        parts.append(f"AdamW {lr:g}: Hardswish input up to {before:.3g} before, {after:.3g} after, logit up to "
                     f"{logit:.3g}")
    return f"| {name} | | | | | | | {'; '.join(parts)} |"


EXTRA = {"levit_scales": levit_scales, "levit_kinks": levit_kinks, "ctrl_cap": ctrl_cap}


def main(names: list[str]) -> None:
    print_table(names or [*CASES, *LEFT, *EXTRA], lambda n: EXTRA[n](n) if n in EXTRA else row(n))


if __name__ == "__main__":
    main(sys.argv[1:])
