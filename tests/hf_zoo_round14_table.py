"""Prints one row per case of tests/_zoo14_cases.py, the runs of tests/test_hf_zoo_round14.py and
tests/test_hf_zoo_round14_more.py (not collected by pytest): verdict, replica error against the trained model in
evaluation mode, residual share, ``keep=("train",)`` error against the slow float64 loop reference, that
reference's own quadrature error, seconds, the gradient check's largest mismatch, the conversions to float32 found
and the first words of a refusal or warning. Rows left from earlier rounds: ``mobilenet_v2_converging`` (round 10's
MobileNetV2 at AdamW 1e-4, against tests/_zoo11_kit.py's ``BufferReplayReference``), ``mobilenet_v2_rates`` (its
largest evaluation-mode logit before and after training at three rates) and ``levit_nodes`` (LeViT's
replica error against the number of evaluations per (step, input)).

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/hf_zoo_round14_table.py [case ...]``
from the repository root. The load average comes first.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
from _zoo9_kit import run
from _zoo11_kit import BufferReplayReference
from _zoo14_cases import CASES, LEFT
from hf_zoo_round9_table import _short
from hf_zoo_round11_table import print_table, result_row

from explaind.exceptions import ExplaindError, ExplaindWarning

#: Cases run without the reference: the loud ones whose explaind figures already fail.
NO_REFERENCE: set[str] = set()


def row(name: str) -> str:
    """The table row of case ``name``."""
    start = time.perf_counter()
    try:
        got = run(LEFT[name], BufferReplayReference) if name in LEFT else run(CASES[name], name not in NO_REFERENCE)
    except (ExplaindError, RuntimeError, TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        seconds = time.perf_counter() - start
        return f"| {name} | loud: {type(exc).__name__} | | | | | {seconds:.0f} | {_short(str(exc))} |"
    return result_row(name, got, time.perf_counter() - start,
                      f" gradient check {got['check']:.2g}; float32 casts {got['casts']};")


def levit_nodes(name: str, nodes: tuple[int, ...] = (64, 256, 1024, 4096)) -> str:
    """LeViT (round 11's case, its attention-bias cache emptied): the replica's error against the trained model
    with the adaptive rule (default ``tol``) and with the midpoint rule at each of ``nodes`` evaluations per
    (step, input), and the seconds of each."""
    from _zoo9_kit import N_TEST, logits_of, record
    from _zoo11_cases import ROUTES
    from reference import rel_err

    import explaind

    model, traj, X, _ = record(ROUTES["levit_cache_emptied"])
    with torch.no_grad():
        truth = logits_of(model(**X)).reshape(N_TEST, -1)
    parts = []
    for rule, n in [("adaptive", None), *(("midpoint", n) for n in nodes)]:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExplaindWarning)
            replica = explaind.KernelReplica(device="cpu", quadrature=rule, nodes=n).fit(traj).predict(X)
        parts.append(f"{rule}{'' if n is None else f' {n}'}: {rel_err(replica, truth):.2g} "
                     f"({time.perf_counter() - start:.0f} s)")
    return f"| {name} | | | | | | | {'; '.join(parts)} |"


def mobilenet_v2_rates(name: str, rates: tuple[float, ...] = (0.02, 1e-3, 1e-4)) -> str:
    """Round 10's MobileNetV2: the largest evaluation-mode logit of the held-out inputs before training and after
    its 3 AdamW steps at each of ``rates``."""
    import dataclasses

    from _zoo9_kit import logits_of, record
    from _zoo10_cases import BATCH_NORM as ROUND10

    case = ROUND10["mobilenet_v2"]
    _, _, X, _ = record(case)
    torch.manual_seed(0)
    with torch.no_grad():
        parts = [f"before {float(logits_of(case.build().double().eval()(**X)).abs().max()):.2g}"]
    for lr in rates:
        model = record(dataclasses.replace(case, lr=lr))[0]
        with torch.no_grad():
            parts.append(f"AdamW {lr:g}: {float(logits_of(model(**X)).abs().max()):.2g}")
    return f"| {name} | | | | | | | largest logit {'; '.join(parts)} |"


EXTRA = {"levit_nodes": levit_nodes, "mobilenet_v2_rates": mobilenet_v2_rates}


def main(names: list[str]) -> None:
    print_table(names or [*CASES, *LEFT, *EXTRA], lambda n: EXTRA[n](n) if n in EXTRA else row(n))


if __name__ == "__main__":
    main(sys.argv[1:])
