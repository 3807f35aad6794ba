"""Prints one row per case of tests/_round7_cases.py, the cases of tests/test_stranger_round7.py and
tests/test_stranger_round7_more.py (not collected by pytest), in the columns of tests/stranger_round6_table.py.

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round7_table.py [case ...]``
from the repository root (set-up: tests/_round7_kit.py). A warned case shows the warning naming its cause; the load
average comes first, and no figure is a timing.
"""

from __future__ import annotations

import sys

from _round7_cases import CASES
from _round7_kit import classify
from stranger_round5_table import _cut, run_case
from stranger_round6_table import print_table

#: The phrase of each loud case's message that names its cause (the table shows the message around it).
KEYS = {
    "ohem_topk_hardest": "fails on a batch", "ohem_topk_hardest_check_off": "fails on a batch",
    "fractional_max_pool": "FractionalMaxPool2d", "fractional_max_pool_captured": "FractionalMaxPool2d",
    "probabilities_in_eval_mode": "other outputs in evaluation", "detached_weight_norm": "detaches",
    "autoencoder_loop_loss_with_zero_gradient": "gradient is zero", "vae_kl_kept_on_the_model": "keeps tensors",
    "embedding_max_norm": "max_norm", "nll_class_weights_ignore_index": "sum to nan",
    "batch_hard_triplet": "sum to", "supervised_contrastive": "sum to", "soft_f1_batch_metric": "sum to",
    "two_views_summed": "augmented inside", "batchnorm_statistics_frozen_mid_run": "evaluation mode",
    "batchnorm_batch_statistics_in_eval": "track_running_stats", "frozen_parameter_moved_in_forward": "frozen",
    "plain_tensor_moved_in_forward": "plain tensor", "optimizer_step_in_backward_hooks": "changed outside",
}


def row(name: str, cases: dict | None = None, keys: dict | None = None) -> str:
    """``| case | replica | share | train vs reference | reference's quadrature | class |`` for one case of ``cases``
    (default: this round's), with the phrases ``keys`` (default :data:`KEYS`)."""
    cases, keys = cases or CASES, keys or KEYS
    got = run_case(cases[name], keys.get(name, ""))
    if isinstance(got, str):
        return f"| {name} | | | | | {got} |"
    verdict = classify(got)
    if verdict == "warns":
        key = keys.get(name, "residual share")
        shown = next((w for w in got["warnings"] if key in w), got["warnings"][0])
        verdict = "warns: " + _cut(shown, key)
    return (f"| {name} | {got['replica']:.1e} | {got['share']:.1e} | {got['scores']:.1e} | "
            f"{got['reference_quadrature']:.1e} | {verdict} |")


def main(names: list[str]) -> None:
    print_table(names, CASES, row)


if __name__ == "__main__":
    main(sys.argv[1:])
