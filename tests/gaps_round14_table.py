"""Figures of tests/test_gaps_round14.py: ``python tests/gaps_round14_table.py counterfactual``.

``counterfactual``: for DANN with the reversal as a custom ``torch.autograd.Function`` and as a tensor hook, under
SGD momentum and Adam, the largest difference between ``CounterfactualEstimator`` and central differences of float64
retraining, relative to the largest reference value, and the replay residual. Run it from the repository root with
``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests``; on an older checkout put that checkout first on the
path to measure its library with the same reference.
"""

from __future__ import annotations

import sys
import warnings

import torch
from _round9_functions import GradientReversal, HookReversal
from test_gaps_round14 import OPTIMIZERS, M, X, _dann_train, _retrained_differences

import explaind


def counterfactual() -> None:
    print("| reversal | optimizer | error vs retraining | replay residual |")
    print("|---|---|---|---|")
    for build, label in ((GradientReversal, "autograd.Function"), (HookReversal, "Tensor.register_hook")):
        for optimizer in sorted(OPTIMIZERS):
            _, traj = _dann_train(build, optimizer, record=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = explaind.CounterfactualEstimator(device="cpu").fit(traj)
                att = est.transform(X[M:])
            ref = _retrained_differences(build, optimizer)
            err = float((att.values - ref).abs().max() / ref.abs().max())
            print(f"| {label} | {optimizer} | {err:.2g} | {est.replay_residual_:.2g} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:] or ["counterfactual"]:
        globals()[name]()
