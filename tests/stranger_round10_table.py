"""Prints one row per case of tests/_round10_cases.py, the cases of tests/test_stranger_round10.py and
tests/test_stranger_round10_more.py (not collected by pytest), in the columns of tests/stranger_round6_table.py.

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round10_table.py [case ...]``
from the repository root (the models in tests/_round10_models.py). A warned case shows the warning naming its cause,
a refused one the message; the load average comes first, and no figure is a timing.
"""

from __future__ import annotations

import sys

from _round10_cases import CASES
from stranger_round6_table import print_table
from stranger_round7_table import row

#: The phrase of each loud case's message that names its cause (the table shows the message around it).
KEYS = {
    "rotary_complex_buffer": "complex tensors", "parameter_hook_clamps_in_init": "gradient hooks",
    "parameter_hook_clamps_unchecked": "gradient hooks", "full_backward_hook_clips_grad_input": "gradient hooks",
    "full_backward_hook_clips_unchecked": "gradient hooks", "siren_fourier_features": "stopped at the cap",
    "relu_cnn_maxpool_sgd_5": "ReLU-dense", "scatter_into_zeros_inplace": "in-place",
    "index_copy_into_zeros_inplace": "in-place", "masked_scatter_into_zeros_inplace": "in-place",
    "add_into_a_zeros_slice_inplace": "in place",
}


def main(names: list[str]) -> None:
    print_table(names, CASES, lambda name: row(name, CASES, KEYS))


if __name__ == "__main__":
    main(sys.argv[1:])
