"""The table of tests/test_stranger_round6.py, one row per case of tests/_round6_cases.py (not collected by pytest):
replica error, residual share, train-score error, the reference's own quadrature error, and the class (exact, or
the message a user sees, cut around the phrase naming its cause).

``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round6_table.py [case ...]`` from
the repository root; the set-up is tests/_round6_kit.py's. The first line is the load average; no figure is a timing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from _round6_cases import CASES
from _round6_kit import scores_bound
from stranger_round5_table import _cut, run_case

#: The phrase of each loud case's message that names its cause (the table shows the message around it).
KEYS = {
    "where_with_two_branches": "can jump", "softplus_threshold_switch": "can jump",
    "binaryconnect_sign_weights": "can jump", "top1_moe_argmax_route_switches": "can jump",
    "top2_moe_topk_route_switches": "can jump", "fake_quantize_qat": "fake_quantize",
    "manual_sgd_without_optimizer": "p -= lr", "l1_penalty_in_loss": "L1 penalty",
    "input_gradient_penalty_double_backward": "input gradients", "importance_weighted_mean_not_logged": "weighted mean",
    "lookahead_by_hand": "changed outside", "dp_sgd_by_hand": "global factor",
    "dp_sgd_by_hand_check_off": "global factor", "gradient_centralisation": "global factor",
    "gradient_centralisation_check_off": "global factor", "l1_penalty_in_loss_check_off": "residual share",
    "input_gradient_penalty_check_off": "residual share",
    "importance_weighted_mean_not_logged_check_off": "residual share",
}


def row(name: str) -> str:
    """``| case | replica | share | train vs reference | reference's quadrature | class |`` for one case."""
    got = run_case(CASES[name], KEYS.get(name, ""))
    if isinstance(got, str):
        return f"| {name} | | | | | {got} |"
    exact = (got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["scores"] <= scores_bound(got)
             and got["reference_residual"] <= 1e-10 and not got["warnings"])
    verdict = ("exact" if exact else "warns: " + _cut(got["warnings"][0], KEYS.get(name, "")) if got["warnings"]
               else "NOT EXACT")
    return (f"| {name} | {got['replica']:.1e} | {got['share']:.1e} | {got['scores']:.1e} | "
            f"{got['reference_quadrature']:.1e} | {verdict} |")


def print_table(names: list[str], cases: Any, row_of: Callable[[str], str]) -> None:
    """The load average, the header, and ``row_of(name)`` for each of ``names`` (every case of ``cases`` when empty),
    on one thread (tests/stranger_round7_table.py prints its round through it too)."""
    torch.set_num_threads(1)
    header = ("case", "replica", "residual share", "train vs reference", "reference's own quadrature", "class")
    lines = [f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}", "| " + " | ".join(header) + " |",
             "|---" * len(header) + "|"]
    print("\n".join(lines))
    for name in names or cases:
        print(row_of(name), flush=True)


def main(names: list[str]) -> None:
    print_table(names, CASES, row)


if __name__ == "__main__":
    main(sys.argv[1:])
