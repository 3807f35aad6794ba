"""Print the table of docs/guide_own_model.md, "Round 8": optimizers, schedulers, loops and numerics a new user brings.

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_loops_round8_table.py [NAME ...]

Each row records a case of tests/_loops8_kit.py (float64, 6 steps of 6 samples of a small tanh model unless the
case names another) and prints the replica's relative error against the trained model in evaluation mode, the
residual share, the train scores' relative error against the slow float64 loop reference (tests/reference.py) and
that reference's own largest per-step residual relative to its largest update, and the class: ``exact``
(replica <= 1e-6, share <= 1e-9, scores <= 1e-9, reference residual <= 1e-12, no warning), ``loud`` (an
ExplaindWarning, or an error: its type and first sentence) or ``SILENT``. The load average is printed first: the
figures do not depend on it (no timings).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from _loops8_kit import CASES
from _stranger_loops_kit import measure


def classify(got: dict[str, Any]) -> str:
    """``exact``, ``loud`` (warned) or ``SILENT``."""
    if (got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["scores"] <= 1e-9
            and got["reference_residual"] <= 1e-12 and not got["warnings"]):
        return "exact"
    return "loud: " + got["warnings"][0][:150] if got["warnings"] else "SILENT"


def row(name: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model, traj = CASES[name]()
        got = measure(model, traj)
    except Exception as exc:  # the table shows what a user sees
        message = " ".join(str(exc).split())
        return f"| {name} | | | | | loud: {type(exc).__name__}: {message[:220]} |"
    return (f"| {name} | {got['replica']:.1e} | {got['share']:.1e} | {got['scores']:.1e} | "
            f"{got['reference_residual']:.1e} | {classify(got)} |")


def main() -> None:
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print("| case | replica | residual share | scores vs reference | reference residual | class |")
    print("|---|---|---|---|---|---|")
    for name in sys.argv[1:] or CASES:
        print(row(name), flush=True)


if __name__ == "__main__":
    main()
