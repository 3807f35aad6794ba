"""How linear is each validation run in the sample weights? The counterfactual against finite changes of retraining.

For each setting of ``python -m explaind.validation --setting ...`` at its measured size (seed 0; ``sgd_mlp`` at
the settings' size, their baseline), records the run, computes ``CounterfactualEstimator``'s
``tau_k = d f(x_t) / d eps_k`` and compares it with the central difference of the settings' own retraining,
``(f(w_k = 1 + h) - f(w_k = 1 - h)) / (2 h)``, for a few samples ``k`` and steps ``h``: ``h = 1e-5`` checks the
derivative (exact: the error is the finite-difference floor), ``h = 0.1`` and ``h = 1`` (removing ``k`` against
doubling it) show how far a finite change stays linear, which is what the LDS and the removal test ask of a
first-order prediction. The last two columns check the decomposition ``InfluenceEstimator(keep=("train",))`` on
the same run: its total against the trained model and its residual, both relative to the largest change of the
explained output over training, ``max_t |f(x_t; theta_N) - f(x_t; theta_0)|``.

Run: ``python benchmarks/bench_validation_linearity.py [--setting adamw ...] [--lr LR]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch

import explaind
from explaind.validation.problem import SETTINGS
from explaind.validation.settings import make_problem, setting_config

SAMPLES = (0, 17, 101)
STEPS = (1e-5, 1e-1, 1.0)


def first_order_gaps(problem: Any, tau: torch.Tensor, steps: Sequence[float]) -> list[float]:
    """Per step ``h``: the largest relative gap over :data:`SAMPLES` between ``tau[:, k]`` and the central
    difference ``(f(w_k = 1 + h) - f(w_k = 1 - h)) / (2 h)`` of ``problem``'s retraining."""
    errors = []
    for h in steps:
        worst = 0.0
        for k in SAMPLES:
            up, down = (torch.ones(problem.config.n_train, dtype=torch.float64) for _ in range(2))
            up[k], down[k] = 1 + h, 1 - h
            fd = (problem.retrain_logits(up) - problem.retrain_logits(down)) / (2 * h)
            worst = max(worst, float((tau[:, k] - fd).abs().max() / fd.abs().max()))
        errors.append(worst)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=SETTINGS, nargs="+", default=list(SETTINGS))
    parser.add_argument("--lr", type=float, default=None, help="replace the settings' learning rate")
    args = parser.parse_args()
    print("| setting | max abs tau | rel. error h = " + " | rel. error h = ".join(f"{h:g}" for h in STEPS)
          + " | decomposition: total vs trained | residual share |")
    print("|---|---|" + "---|" * (len(STEPS) + 2))
    for setting in args.setting:
        start = time.perf_counter()
        changes = {} if args.lr is None else {"lr": args.lr}
        problem = make_problem(setting_config(setting, settings_size=True, seeds=1, **changes))
        model, trajectory = problem.train(record=True)
        att = explaind.InfluenceEstimator(keep=("train",), target=problem.targets(), device="cpu").fit(
            trajectory).transform(problem.X_test)
        trained = problem.true_logits(model)
        moved = float((trained - att.initial[:, 0]).abs().max())
        replica = float((att.total()[:, 0] - trained).abs().max()) / moved
        residual = float(att.residual.reshape(len(trained), -1).sum(1).abs().max()) / moved
        est = explaind.CounterfactualEstimator(target=problem.targets(), device="cpu")
        tau = est.fit(trajectory).transform(problem.X_test).values[..., 0]
        errors = first_order_gaps(problem, tau, STEPS)
        label = setting if args.lr is None else f"{setting} (lr {args.lr:g})"
        print(f"| {label} | {float(tau.abs().max()):.3g} | " + " | ".join(f"{e:.1e}" for e in errors)
              + f" | {replica:.1e} | {residual:.1e} |  <!-- {time.perf_counter() - start:.0f}s -->", flush=True)


if __name__ == "__main__":
    main()
