"""Prints one row per case of tests/_round12_cases.py, the cases of tests/test_stranger_round12.py and
tests/test_stranger_round12_more.py (not collected by pytest), in the columns of tests/stranger_round6_table.py.

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round12_table.py [case ...]``
from the repository root (the models in tests/_round12_models.py). A warned case shows the warning naming its cause,
a refused one the message; the load average comes first, and no figure is a timing.
"""

from __future__ import annotations

import sys

from _round12_cases import CASES
from stranger_round6_table import print_table
from stranger_round7_table import row

#: The phrase of each loud case's message that names its cause (the table shows the message around it).
KEYS = {
    "lru_cache_parameter_derived_weight": "functools.lru_cache", "key_cache_kept_in_an_attribute": "keeps state",
    "module_level_call_counter": "keeps state", "module_level_call_counter_check_off": "keeps state",
    "branch_on_batch_of_one": "one at a time", "environment_variable_changed_before_explaining": "os.environ",
    "deep_narrow_leaky_relu_50x4": "ReLU-dense",
    "inplace_mul_index_put_masked_fill_on_params": "in place", "relu_units_over_their_norm_at_zero": "x.norm()",
    "log_of_softmax_underflow": "torch.log(torch.softmax", "autograd_function_once_differentiable": "old style",
    "requires_grad_toggled_in_forward": "requires_grad", "float16_cast_inside_float64_model": "16-bit",
}


def main(names: list[str]) -> None:
    print_table(names, CASES, lambda name: row(name, CASES, KEYS))


if __name__ == "__main__":
    main(sys.argv[1:])
