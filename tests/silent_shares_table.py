"""Figures of tests/test_silent_shares.py: ``python tests/silent_shares_table.py [autocast] [cases]``.

Run from the repository root with ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests``.

* ``autocast``: the dropout MLP of tests/_real_loop_testkit.py trained under float16 autocast with a GradScaler and
  under bfloat16 autocast, by SGD momentum, Adam and centred RMSprop with momentum (tests/
  test_optimizer_mixed_precision_five.py's settings), for 4 to 32 steps of 8 samples: the residual share and its
  ratio to the autocast dtype's unit roundoff (the order ``residual_tol="auto"`` states), and the verdict of the
  warning (within or beyond ``AUTOCAST_UNITS`` of those units);
* ``cases``: the residual share of each silent case of the test and of a representative exact case per family,
  with the tolerance ``"auto"`` resolved to and whether the estimators warn at the default.
"""

from __future__ import annotations

import sys
import warnings

import torch
from _batch_coupled_kit import SHOWN
from _real_loop_testkit import MLP_QUAD, record_autocast_mlp
from _round13_cases import CASES as ROUND13
from _stranger_loops_kit import QUAD, data

import explaind
from explaind.estimators._residual_tol import AUTOCAST_UNITS
from explaind.exceptions import ExplaindWarning

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
}


def explain(traj, X, y=None, **kwargs) -> tuple[dict, bool]:
    """The attribution's ``meta`` at the default ``residual_tol`` and whether a residual warning came."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), **{"device": "cpu", **kwargs}).fit(traj).transform(X, y)
    return att.meta, any("residual share" in str(w.message) for w in caught)


def autocast() -> None:
    print("| autocast | optimizer | steps | residual share | share / unit roundoff | verdict |")
    print("|---|---|---|---|---|---|")
    for precision in ("float16", "bfloat16"):
        unit = float(torch.finfo(getattr(torch, precision)).eps) / 2
        for name, optimizer in OPTIMIZERS.items():
            for steps in (4, 8, 16, 32):
                _, traj, X_test = record_autocast_mlp(precision, optimizer, steps, 8)
                meta, _ = explain(traj, X_test, **MLP_QUAD)
                share = meta["residual_share"]
                verdict = "within" if share <= AUTOCAST_UNITS * unit else "beyond"
                print(f"| {precision} | {name} | {steps} | {share:.2g} | {share / unit:.2g} | {verdict} |")


def cases() -> None:
    from _zoo9_kit import record
    from _zoo12_cases import CASES as ZOO12

    print("| case | residual share | residual_tol (auto) | warns |")
    print("|---|---|---|---|")
    rows = []
    for name in ("loss_weight_bump_between_checks", "loss_weight_bump_checked_every_step"):
        rows.append((name, *explain(ROUND13[name]()[1], data()[2], **QUAD)))
    for name in ("moonshine_audio", "moonshine_audio_float64_loss", "olmo2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, traj, X_test, y_test = record(ZOO12[name])
        rows.append((name, *explain(traj, X_test, y_test, tol=ZOO12[name].tol, target=ZOO12[name].target)))
    for precision in ("float16", "bfloat16", "float32"):
        _, traj, X_test = record_autocast_mlp(precision, OPTIMIZERS["sgd"], 6, 8)
        rows.append((f"dropout MLP, {precision}" + (" autocast" if precision != "float32" else ""),
                     *explain(traj, X_test, **MLP_QUAD)))
    run = SHOWN["batch_hard_triplet_adam_dropout_head_bias"]()
    rows.append(("batch-hard triplets, Adam, head bias kept", *explain(run.traj, run.X_test, **QUAD)))
    for name, meta, warned in rows:
        print(f"| {name} | {meta['residual_share']:.2g} | {meta['residual_tol']:g} | {'yes' if warned else 'no'} |")


if __name__ == "__main__":
    chosen = sys.argv[1:] or ["autocast", "cases"]
    for part in chosen:
        {"autocast": autocast, "cases": cases}[part]()
