"""Figures of tests/test_gaps_round14.py: ``python tests/gaps_round14_table.py [counterfactual] [steps] [compiled]``.

Run from the repository root with ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests``; on an older checkout
put that checkout first on the path (``PYTHONPATH=../before:../before/plugins:$PWD/tests``) to measure its library
with the same runs (tests/_gaps14_kit.py uses the public API only).

* ``counterfactual``: DANN with the reversal as a custom ``torch.autograd.Function`` and as a tensor hook, under SGD
  momentum and Adam: the largest difference between ``CounterfactualEstimator`` and central differences of float64
  retraining, relative to the largest reference value, and the replay residual;
* ``steps``: the Function under Adam against central differences with ``h`` = 1e-4, 1e-5 and 1e-6: the difference
  falls as ``h**2``, the differences' own truncation error, not the estimator's;
* ``compiled``: a dropout model called from ``torch.compile(lambda x: model(x))`` (inductor drawing its own masks)
  recorded with the gradient check off: the recorder's refusal, or the residual share and the replica's miss of the
  trained model.
"""

from __future__ import annotations

import sys
import warnings

import torch
from _gaps14_kit import OPTIMIZERS, M, X, compile_data, compile_net, dann_train, record_unchecked, retrained_differences
from _round9_functions import GradientReversal, HookReversal

import explaind


def counterfactual() -> None:
    print("| reversal | optimizer | error vs retraining | replay residual |")
    print("|---|---|---|---|")
    for build, label in ((GradientReversal, "autograd.Function"), (HookReversal, "Tensor.register_hook")):
        for optimizer in sorted(OPTIMIZERS):
            _, traj = dann_train(build, optimizer, record=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = explaind.CounterfactualEstimator(device="cpu").fit(traj)
                att = est.transform(X[M:])
            ref = retrained_differences(build, optimizer)
            err = float((att.values - ref).abs().max() / ref.abs().max())
            print(f"| {label} | {optimizer} | {err:.2g} | {est.replay_residual_:.2g} |")


def steps() -> None:
    import _gaps14_kit

    _, traj = dann_train(GradientReversal, "adam", record=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        att = explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(X[M:])
    print("| h | error vs retraining |")
    print("|---|---|")
    for h in (1e-4, 1e-5, 1e-6):
        _gaps14_kit.H = h
        ref = retrained_differences(GradientReversal, "adam")
        print(f"| {h:g} | {float((att.values - ref).abs().max() / ref.abs().max()):.2g} |")


def compiled() -> None:
    import torch._inductor.config as inductor_config

    model = compile_net(0.3)
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=False), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            traj = record_unchecked(model, torch.compile(lambda x: model(x)))
        except Exception as exc:  # noqa: BLE001 - the table reports the refusal
            print(f"refused: {type(exc).__name__}: {str(exc)[:200]}")
            return
        Xc, _ = compile_data()
        est = explaind.InfluenceEstimator(keep=(), quadrature="adaptive", tol=1e-11, device="cpu")
        att = est.fit(traj).transform(Xc[:4])
    with torch.no_grad():
        truth = model.eval()(Xc[:4])
    miss = float((torch.as_tensor(att.total()) - truth).abs().max() / truth.abs().max())
    said = [str(w.message)[:120] for w in seen if issubclass(w.category, explaind.exceptions.ExplaindWarning)]
    print(f"recorded: residual share {att.meta.get('residual_share')}, replica miss {miss:.2g}; warnings: {said}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:] or ["counterfactual", "compiled"]:
        {"counterfactual": counterfactual, "steps": steps, "compiled": compiled}[name]()
