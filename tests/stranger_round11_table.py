"""Prints one row per case of tests/_round11_cases.py, the cases of tests/test_stranger_round11.py and
tests/test_stranger_round11_more.py (not collected by pytest), in the columns of tests/stranger_round6_table.py.

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round11_table.py [case ...]``
from the repository root (the models in tests/_round11_models.py). A warned case shows the warning naming its cause,
a refused one the message; the load average comes first, and no figure is a timing.
"""

from __future__ import annotations

import sys

from _round11_cases import CASES
from stranger_round6_table import print_table
from stranger_round7_table import row

#: The phrase of each loud case's message that names its cause (the table shows the message around it).
KEYS = {
    "straight_through_argmax_in_both_modes": "detaches", "vq_vae_codebook_argmin_straight_through": "detaches",
    "prune_remove_after_step_0": "prune.remove", "prune_remove_after_the_run": "prune.remove",
    "functional_batch_norm_with_buffers": "other outputs in evaluation",
    "mixup_inside_forward_training_only": "other outputs in evaluation",
    "special_bessel_j0_k0_no_derivative": "no derivative", "special_zeta_no_forward_derivative": "special_zeta",
    "saved_tensors_hooks_in_forward": "saved-tensor hook", "l2_penalty_in_loss": "L2 penalty",
    "mixup_in_the_loop": "mixup", "packed_lengths_from_batch_positions": "one at a time",
    "global_module_forward_hook_removed_before_explaining": "residual share",
    "relu_bn_cnn_adam_1": "ReLU-dense", "relu_bn_cnn_adam_1_conv_without_bias": "ReLU-dense",
}


def main(names: list[str]) -> None:
    print_table(names, CASES, lambda name: row(name, CASES, KEYS))


if __name__ == "__main__":
    main(sys.argv[1:])
