"""Print the table of tests/test_stranger_round5.py: each case's replica error, residual share, train-score error and
class (exact, or the error or warning a user sees). Not collected by pytest.

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round5_table.py [case ...]

Every case trains as tests/_round5_kit.py does (float64, SGD 0.5 unless the case says otherwise, 3 steps of 4 of 12
samples, adaptive rule at tol 1e-11, 2 held-out inputs) and compares with tests/replay_reference.py. The load
average is printed first; no figure is a timing.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from _round5_kit import CASES

from explaind.exceptions import ExplaindError


def _cut(message: str, limit: int = 160) -> str:
    """The message on one line, its first ``limit`` characters."""
    text = " ".join(message.split()).replace("|", "/")
    return text[:limit] + ("..." if len(text) > limit else "")


def row(name: str) -> str:
    """``| case | replica | share | train vs reference | class |`` for one case of :data:`CASES`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's batching-rule notices; ExplaindWarnings are kept
            got = CASES[name]()
    except ExplaindError as exc:
        return f"| {name} | | | | {type(exc).__name__}: {_cut(str(exc))} |"
    exact = got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["scores"] <= 1e-9 and not got["warnings"]
    verdict = "exact" if exact else ("warns: " + _cut(got["warnings"][0]) if got["warnings"] else "NOT EXACT")
    extra = f" (EMA copy vs replica {got['ema_error']:.2g})" if "ema_error" in got else ""
    return (f"| {name}{extra} | {got['replica']:.1e} | {got['share']:.1e} | {got['scores']:.1e} | {verdict} |")


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print("| case | replica | residual share | train vs reference | class |")
    print("|---|---|---|---|---|")
    for name in names or CASES:
        print(row(name), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
