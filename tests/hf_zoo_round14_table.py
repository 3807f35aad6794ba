"""Prints one row per case of tests/_zoo14_cases.py, the runs of tests/test_hf_zoo_round14.py and
tests/test_hf_zoo_round14_more.py (not collected by pytest): verdict, replica error against the trained model in
evaluation mode, residual share, ``keep=("train",)`` error against the slow float64 loop reference, that
reference's own quadrature error, seconds, the gradient check's largest mismatch, the conversions to float32 found
and the first words of a refusal or warning.

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/hf_zoo_round14_table.py [case ...]``
from the repository root. The load average comes first.
"""

from __future__ import annotations

import sys
import time

from _zoo9_kit import run
from _zoo14_cases import CASES
from hf_zoo_round9_table import _short
from hf_zoo_round11_table import print_table, result_row

from explaind.exceptions import ExplaindError

#: Cases run without the reference: the loud ones whose explaind figures already fail.
NO_REFERENCE: set[str] = set()


def row(name: str) -> str:
    """The table row of case ``name``."""
    start = time.perf_counter()
    try:
        got = run(CASES[name], name not in NO_REFERENCE)
    except (ExplaindError, RuntimeError, TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        seconds = time.perf_counter() - start
        return f"| {name} | loud: {type(exc).__name__} | | | | | {seconds:.0f} | {_short(str(exc))} |"
    return result_row(name, got, time.perf_counter() - start,
                      f" gradient check {got['check']:.2g}; float32 casts {got['casts']};")


def main(names: list[str]) -> None:
    print_table(names or list(CASES), row)


if __name__ == "__main__":
    main(sys.argv[1:])
