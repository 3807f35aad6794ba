"""Prints one row per case of tests/_zoo12_cases.py, the runs of tests/test_hf_zoo_round12.py and
tests/test_hf_zoo_round12_more.py (not collected by pytest): verdict, replica error against the trained model in
evaluation mode, residual share, ``keep=("train",)`` error against the slow float64 loop reference, that reference's
own quadrature error, seconds, the gradient check's largest mismatch and the first words of a refusal or
warning; then the Trainer runs of tests/test_hf_zoo_round12_more.py (CLIP's InfoNCE through
``explaind.batch_coupled_loss``), named ``trainer:<route>:<accumulation>[:<batch>]``, with the loss scales the
gradient check measured.

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/hf_zoo_round12_table.py [case ...]``
from the repository root. The load average comes first.
"""

from __future__ import annotations

import sys
import tempfile
import time

from _zoo9_kit import run
from _zoo12_cases import CASES
from hf_zoo_round9_table import _short
from hf_zoo_round11_table import print_table, result_row

from explaind.exceptions import ExplaindError

#: Cases run without the reference: Swinv2 (its reference did not finish within 26 minutes at load 9).
NO_REFERENCE = {"swinv2"}


#: The Trainer runs: route, accumulation, micro-batch size (tests/test_hf_zoo_round12_more.py).
TRAINER = [f"trainer:{route}:{acc}" for route in ("callback", "user_by_items", "user_mean", "override")
           for acc in (1, 2)] + [f"trainer:{route}:3:5" for route in ("callback", "user_by_items", "user_mean",
                                                                      "override")]


def trainer_row(name: str) -> str:
    """The table row of the Trainer run ``name``."""
    from test_hf_zoo_round12_more import figures, train

    _, route, acc, *batch = name.split(":")
    start = time.perf_counter()
    try:
        got = figures(*train(tempfile.mkdtemp(), route, int(acc), *map(int, batch)))
    except ExplaindError as exc:
        seconds = time.perf_counter() - start
        return f"| {name} | loud: {type(exc).__name__} | | | | | {seconds:.0f} | {_short(str(exc))} |"
    said = _short(got["warnings"][0]) if got["warnings"] else ""
    verdict = "exact" if got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["train"] <= 1e-9 else "inexact"
    scales = ", ".join(f"{s:.3g}" for s in got["scales"])
    return (f"| {name} | {verdict} | {got['replica']:.2g} | {got['share']:.2g} | {got['train']:.2g} | | "
            f"{time.perf_counter() - start:.0f} | loss scales {scales}; {said} |")


def row(name: str) -> str:
    """The table row of case ``name``."""
    if name.startswith("trainer:"):
        return trainer_row(name)
    start = time.perf_counter()
    try:
        got = run(CASES[name], name not in NO_REFERENCE)
    except (ExplaindError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
        seconds = time.perf_counter() - start
        return f"| {name} | loud: {type(exc).__name__} | | | | | {seconds:.0f} | {_short(str(exc))} |"
    return result_row(name, got, time.perf_counter() - start, f" gradient check {got['check']:.2g};")


def main(names: list[str]) -> None:
    print_table(names or [*CASES, *TRAINER], row)


if __name__ == "__main__":
    main(sys.argv[1:])
