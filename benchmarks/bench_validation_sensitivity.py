"""Why does the counterfactual predict the contrastive run's retraining so poorly? How sensitive each run is.

``benchmarks/bench_validation_linearity.py`` shows that on the contrastive setting (InfoNCE, SGD lr 0.1) the
counterfactual is an exact derivative (central differences agree to 1e-9) but the run is far from linear in the
sample weights. This script measures, for a setting at its measured size (seed 0) and a list of run lengths
(``--epochs``), how fast the run amplifies small changes, which sets the range of weights over which any
first-order score can hold:

* ``max |tau|`` and ``median |tau|``: ``CounterfactualEstimator``'s derivative of the explained outputs in the
  sample weights;
* ``growth of a theta_0 change``: the run retrained from ``theta_0 + 1e-7 u`` (``u`` a fixed standard normal
  direction, scaled to unit norm), ``|theta_N' - theta_N| / |theta_0' - theta_0|``: how much the loop amplifies
  a change of its state (above 1: amplified; the exponential rate over steps is a Lyapunov exponent);
* ``rel. error h``: the largest relative gap between ``tau_k`` and the central difference of the retraining
  ``(f(w_k = 1 + h) - f(w_k = 1 - h)) / 2h`` over samples 0, 17 and 101 (as the linearity script): at
  ``h = 1`` (removing a sample against doubling it) the regime of the LDS.

Run: ``python benchmarks/bench_validation_sensitivity.py [--setting contrastive] [--lr 0.1] [--activation relu]
[--epochs 1 2 4 8]``
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_validation_linearity import first_order_gaps

import explaind
from explaind.validation.problem import SETTINGS
from explaind.validation.settings import make_problem, setting_config

STEPS = (1e-2, 1e-1, 1.0)
EPS = 1e-7


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _growth(problem: explaind.validation.ValidationProblem, model: torch.nn.Module) -> float:
    """|theta_N' - theta_N| / |theta_0' - theta_0| for theta_0' = theta_0 + EPS u, |u| = 1."""
    build = problem.build_model
    theta0 = _flat(build())
    u = torch.randn(theta0.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u /= u.norm()

    def perturbed() -> torch.nn.Module:
        net = build()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta0 + EPS * u, net.parameters())
        return net

    problem.build_model = perturbed  # type: ignore[method-assign]
    try:
        other = problem.train()[0]
    finally:
        problem.build_model = build  # type: ignore[method-assign]
    return float((_flat(other) - _flat(model)).norm()) / EPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=SETTINGS, nargs="+", default=["sgd_mlp", "contrastive"])
    parser.add_argument("--lr", type=float, default=None, help="replace the settings' learning rate")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--activation", choices=("tanh", "relu"), default=None,
                        help="replace the settings' activation (default tanh; relu_untuned is always relu)")
    args = parser.parse_args()
    print("| setting | epochs | max abs tau | median abs tau | growth of a theta_0 change | rel. error h = "
          + " | rel. error h = ".join(f"{h:g}" for h in STEPS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(STEPS))
    for setting in args.setting:
        for epochs in args.epochs:
            start = time.perf_counter()
            changes = {"epochs": epochs} if args.lr is None else {"epochs": epochs, "lr": args.lr}
            if args.activation is not None:
                changes["activation"] = args.activation
            config = setting_config(setting, settings_size=True, seeds=1, **changes)
            problem = make_problem(config)
            model, trajectory = problem.train(record=True)
            est = explaind.CounterfactualEstimator(target=problem.targets(), device="cpu")
            tau = est.fit(trajectory).transform(problem.X_test).values[..., 0]
            errors = first_order_gaps(problem, tau, STEPS)
            label = f"{setting} ({config.activation}, lr {config.lr:g})"
            print(f"| {label} | {epochs} | {float(tau.abs().max()):.3g} | {float(tau.abs().median()):.3g} | "
                  f"{_growth(problem, model):.3g} | " + " | ".join(f"{e:.1e}" for e in errors)
                  + f" |  <!-- {time.perf_counter() - start:.0f}s -->", flush=True)


if __name__ == "__main__":
    main()
