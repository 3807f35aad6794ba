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
from collections.abc import Callable
from typing import Any

import torch
from _round5_cases import CASES

from explaind.exceptions import ExplaindError

#: The phrase of each loud case's message that names its cause (the table shows the message around it).
KEYS = {
    "rrelu": "nn.RReLU", "rrelu_captured": "nn.RReLU", "mc_dropout": "capture_random=True",
    "mc_dropout_captured": "evaluation mode",
    "complex_parameter": "complex tensors", "float32_layer_in_float64_model": "several dtypes",
    "uncertainty_weighted_loss": "['log_var'] got", "aux_load_balancing_loss": "more than its logits",
    "noise_augmentation_in_loop": "augmented inside", "noise_augmentation_check_off": "data augmentation",
    "tbptt_hidden_state_carried": "largest differences", "ema_copy_explained": "EMA",
    "labels_overwritten_in_place": "y was changed", "labels_overwritten_in_place_check_off": "y was changed",
    "inputs_normalised_in_place": "X was changed",
    "vae_rsample": "['s.weight'", "multi_task_heads_as_a_tuple": "['reg.weight'",
    "sharpness_aware_minimisation": "gradients were taken",
    "weight_renormalised_in_place_in_forward": "changed outside",
}
#: Cases whose loop rounds its gradients to float32: their residual share is that rounding, not an error.
FLOAT32 = ("float32_layer_cast_to_its_weight_dtype", "float32_loss_of_float64_model")


def _cut(message: str, key: str = "", limit: int = 170) -> str:
    """The message on one line, ``limit`` characters from a little before ``key`` (its start without one)."""
    text = " ".join(message.split()).replace("|", "/")
    at = max(text.find(key) - 30, 0) if key and key in text else 0
    return ("..." if at else "") + text[at:at + limit] + ("..." if len(text) > at + limit else "")


def run_case(run: Callable[[], dict[str, Any]], key: str) -> dict[str, Any] | str:
    """``run()``'s figures, or the class column of the explaind error it raised, cut around ``key``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's batching-rule notices; ExplaindWarnings are kept
            return run()
    except ExplaindError as exc:
        return f"{type(exc).__name__}: {_cut(str(exc), key)}"


def row(name: str) -> str:
    """``| case | replica | share | train vs reference | class |`` for one case of :data:`CASES`."""
    got = run_case(CASES[name], KEYS.get(name, ""))
    if isinstance(got, str):
        return f"| {name} | | | | {got} |"
    share = 1e-6 if name in FLOAT32 else 1e-9
    exact = got["replica"] <= 1e-6 and got["share"] <= share and got["scores"] <= 1e-9 and not got["warnings"]
    verdict = ("exact" + (" up to the loop's float32 rounding" if name in FLOAT32 else "") if exact else
               "warns: " + _cut(got["warnings"][0], KEYS.get(name, "")) if got["warnings"] else "NOT EXACT")
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
