"""Prints one row per case of tests/_round9_cases.py, the cases of tests/test_stranger_round9.py and
tests/test_stranger_round9_more.py (not collected by pytest), in the columns of tests/stranger_round6_table.py.

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round9_table.py [case ...]``
from the repository root (the models in tests/_round9_models.py). A warned case shows the warning naming its cause,
a refused one the message; the load average comes first, and no figure is a timing.
"""

from __future__ import annotations

import sys

from _round9_cases import CASES
from stranger_round6_table import print_table
from stranger_round7_table import row

#: The phrase of each loud case's message that names its cause (the table shows the message around it).
KEYS = {
    "gat_segment_softmax_amax_index_add_inplace": "index_add_", "fno2d_rfft2_irfft2_slice_assignment": "in place",
    "energy_gradient_autograd_grad": "torch.autograd.grad", "gradient_reversal_dann": "custom torch.autograd",
    "gradient_reversal_jvp_mirrors_backward": "custom torch.autograd", "straight_through_round_function": "can jump",
    "gradient_reversal_by_tensor_hook": "register_hook", "jacobian_features_autograd_functional": "autograd.grad",
    "torch_cond_learned_gate": "torch.cond", "where_unused_branch_nan": "torch.where",
    "bucketize_embedding": "can jump", "atan2_hypot_polar_sgd_5": "can jump", "weight_data_in_forward": "Tensor.data",
    "gcn_sparse_adjacency_sparse_mm": "sparse", "numpy_round_trip_in_forward": "memory",
    "retain_grad_in_forward": "retain_grad", "complex_outputs": "complex",
    "hand_written_norm_of_a_zero_vector": "sqrt at 0",
    "module_level_global_temperature": "module-level global",
}


def main(names: list[str]) -> None:
    print_table(names, CASES, lambda name: row(name, CASES, KEYS))


if __name__ == "__main__":
    main(sys.argv[1:])
