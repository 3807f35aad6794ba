"""Prints one row per case of tests/_round8_cases.py, the cases of tests/test_stranger_round8.py and
tests/test_stranger_round8_more.py (not collected by pytest), in the columns of tests/stranger_round6_table.py.

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round8_table.py [case ...]``
from the repository root (set-up: tests/_round8_kit.py). A warned case shows the warning naming its cause; the load
average comes first, and no figure is a timing.
"""

from __future__ import annotations

import sys

from _round8_cases import CASES
from stranger_round6_table import print_table
from stranger_round7_table import row

#: The phrase of each loud case's message that names its cause (the table shows the message around it).
KEYS = {
    "lazy_linear_before_the_first_forward": "uninitialised", "cross_map_lrn2d": "CrossMapLRN2d",
    "prune_again_between_steps": "prune masks", "remainder_sawtooth": "can jump", "functional_hardshrink": "can jump",
    "integer_cast_bucket_embedding": "can jump", "max_indices_router": "can jump",
    "max_indices_router_switching": "can jump", "realnvp_flow_slogdet_nll": "log|det|",
    "deq_fixed_point_until_converged": "bool(tensor)", "sparse_embedding_sgd": "sparse=True",
    "loss_module_with_a_learned_temperature": "not parameters",
    "segmentation_nll_ignore_index_counts_differ": "counted positions", "dice_over_the_batch": "coupling",
    "label_smoothing_class_weights": "class-weighted",
}


def main(names: list[str]) -> None:
    print_table(names, CASES, lambda name: row(name, CASES, KEYS))


if __name__ == "__main__":
    main(sys.argv[1:])
