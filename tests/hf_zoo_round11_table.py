"""Prints one row per case of tests/_zoo11_cases.py and of the train-mode batch-norm models of round 10
(tests/_zoo10_cases.py's ``BATCH_NORM``; they and RegNet are checked against tests/_zoo11_kit.py's
buffer-replaying reference), the runs of tests/test_hf_zoo_round11.py and tests/test_hf_zoo_round11_more.py (not
collected by pytest): verdict, replica error against the trained model in evaluation mode, residual share,
``keep=("train",)`` error against the slow float64 loop reference, that reference's own quadrature error, seconds,
and the first words of a refusal or warning; the batch-norm rows add the largest difference of the recorded running
statistics from the replayed ones and explaind's buffers term against the reference's.

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/hf_zoo_round11_table.py [case ...]``
from the repository root. The load average comes first.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch
from _zoo9_kit import run
from _zoo10_cases import BATCH_NORM
from _zoo11_cases import BATCH_NORM_MORE, CASES, ROUTES
from _zoo11_kit import BufferReplayReference
from hf_zoo_round9_table import _short

from explaind.exceptions import ExplaindError

#: Batch-norm models left out of the default list: MobileNetV2 runs past 100 s (round 10), EfficientNet at width
#: 0.1 returns the same logits for every input.
SLOW = {"mobilenet_v2", "efficientnet"}
#: Cases run without the reference: LeViT and SwiftFormer (the reference's search for their Hardswish and ReLU kinks
#: did not finish in 25 minutes), and the cases whose verdict is a refusal or a warning.
NO_REFERENCE = {"levit", "levit_cache_emptied", "swiftformer", "nemotron", "granite_moe_top2", "olmoe_top2",
                "luke", "markuplm", "recurrent_gemma"}


def row(name: str) -> str:
    """The table row of case ``name``."""
    start = time.perf_counter()
    bn = {**BATCH_NORM, **BATCH_NORM_MORE}
    every = {**CASES, **ROUTES, **bn}
    try:
        reference = BufferReplayReference if name in bn or name in ROUTES else True
        got = run(every[name], False if name in NO_REFERENCE else reference)
    except (ExplaindError, RuntimeError, TypeError, ValueError) as exc:
        seconds = time.perf_counter() - start
        return f"| {name} | loud: {type(exc).__name__} | | | | | {seconds:.0f} | {_short(str(exc))} |"
    extra = (f" buffers replayed {got['buffers_replayed']:.2g}, buffers term {got['buffers_term']:.2g};"
             if "buffers_term" in got else "")
    return result_row(name, got, time.perf_counter() - start, extra)


def result_row(name: str, got: dict, seconds: float, extra: str = "") -> str:
    """The table row of the figures ``got`` of case ``name`` (tests/_zoo9_kit.py's ``figures``)."""
    said = _short(got["warnings"][0]) if got["warnings"] else ""
    exact = got["replica"] <= 1e-6 and got["share"] <= 1e-7 and not got["train"] > 1e-6 and not said
    verdict = "exact" if exact else "loud" if said else "inexact"
    return (f"| {name} | {verdict} | {got['replica']:.2g} | {got['share']:.2g} | {got['train']:.2g} | "
            f"{got['ref_quad']:.2g} | {seconds:.0f} |{extra} {said} |")


def print_table(names: list[str], row_of) -> None:
    """The load average, the table's header and ``row_of(name)`` for every name, one thread."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print("| case | verdict | replica | residual share | train vs reference | reference quadrature | seconds | "
          "message |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        print(row_of(name), flush=True)


def main(names: list[str]) -> None:
    print_table(names or [n for n in [*BATCH_NORM, *BATCH_NORM_MORE, *ROUTES, *CASES] if n not in SLOW], row)


if __name__ == "__main__":
    main(sys.argv[1:])
