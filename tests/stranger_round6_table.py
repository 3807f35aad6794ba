"""Print the table of tests/test_stranger_round6.py: each case's replica error, residual share, train-score error,
the slow reference's own quadrature error, and class (exact, or the error or warning a user sees). Not collected by
pytest.

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round6_table.py [case ...]

Every case trains as tests/_round6_kit.py says (float64, SGD 0.5 unless the case says otherwise, 3 steps of 4 of 12
samples, adaptive rule at tol 1e-11, 2 held-out inputs) and compares with tests/replay_reference.py. The load
average is printed first; no figure is a timing.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from _round6_cases import CASES
from _round6_kit import scores_bound
from stranger_round5_table import _cut

from explaind.exceptions import ExplaindError

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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's batching-rule notices; ExplaindWarnings are kept
            got = CASES[name]()
    except ExplaindError as exc:
        return f"| {name} | | | | | {type(exc).__name__}: {_cut(str(exc), KEYS.get(name, ''))} |"
    exact = (got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["scores"] <= scores_bound(got)
             and got["reference_residual"] <= 1e-10 and not got["warnings"])
    verdict = ("exact" if exact else "warns: " + _cut(got["warnings"][0], KEYS.get(name, "")) if got["warnings"]
               else "NOT EXACT")
    return (f"| {name} | {got['replica']:.1e} | {got['share']:.1e} | {got['scores']:.1e} | "
            f"{got['reference_quadrature']:.1e} | {verdict} |")


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print("| case | replica | residual share | train vs reference | reference's own quadrature | class |")
    print("|---|---|---|---|---|---|")
    for name in names or CASES:
        print(row(name), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
