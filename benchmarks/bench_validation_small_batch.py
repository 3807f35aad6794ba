"""Why do small batches lower every method's LDS? The candidate causes, separated one at a time.

docs/scores_meaning.md ("Batch norm at small batches") measured the counterfactual's LDS on the batch-norm CNN
falling from 0.88 at batches of 25 to 0.26 at batches of 4 (50% subsets, 100 train / 20 test digits, 4 epochs).
A batch of 4 changes three things at once:

* **more steps at the same learning rate**: 100 steps instead of 16, a longer and more curved path. Separated by
  ``bn_b25_100steps`` (batches of 25 for 25 epochs: the same 100 steps) and ``bn_b4_lr_scaled`` (batches of 4 at
  lr ``0.05 * 4 / 25``: the same learning rate per sample, the linear scaling rule);
* **batch statistics over 4 samples**: separated by ``mlp_b4`` / ``mlp_b25``, the tanh MLP with no batch norm at
  the same sizes;
* **the per-step weight of one sample, 1/B**: removing a sample changes each of its steps' gradients by a quarter
  at B = 4, a 25th at B = 25. Its effect on linearity is the first-order gap of
  ``benchmarks/bench_validation_sensitivity.py`` (the relative gap between ``tau_k`` and the central difference of
  retraining at ``h = 1``), printed for every arm.

Per arm and seed: the counterfactual's and the decomposition's LDS over ``--subsets`` random subsets at each
fraction (weighted retraining, as ``python -m explaind.validation``), ``max |tau|``, the growth of a ``theta_0``
change, and the first-order gap at ``h = 0.1`` and ``h = 1`` over samples 0, 17 and 51 (means over seeds).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_validation_small_batch.py [--arms ...] [--seeds 2] [--subsets 30]``
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from bench_validation_sensitivity import _growth

import explaind
from explaind.validation.benchmark import draw_subsets
from explaind.validation.metrics import lds, subset_predictions
from explaind.validation.settings import make_problem, setting_config

#: label -> (setting, batch size, learning rate, epochs).
ARMS: dict[str, tuple[str, int, float, int]] = {
    "bn_b25": ("batchnorm", 25, 0.05, 4),
    "bn_b25_100steps": ("batchnorm", 25, 0.05, 25),
    "bn_b8": ("batchnorm", 8, 0.05, 4),
    "bn_b4": ("batchnorm", 4, 0.05, 4),
    "bn_b4_lr_scaled": ("batchnorm", 4, 0.05 * 4 / 25, 4),
    "mlp_b25": ("sgd_mlp", 25, 0.05, 4),
    "mlp_b4": ("sgd_mlp", 4, 0.05, 4),
}
SAMPLES = (0, 17, 51)
STEPS = (0.1, 1.0)
FRACTIONS = (0.5, 0.9, 0.99)


def _gaps(problem: Any, tau: torch.Tensor) -> list[float]:
    """Largest relative gap over :data:`SAMPLES` between ``tau[:, k]`` and the central difference at each ``h``."""
    gaps = []
    for h in STEPS:
        worst = 0.0
        for k in SAMPLES:
            up = torch.ones(problem.config.n_train, dtype=torch.float64)
            down = up.clone()
            up[k], down[k] = 1 + h, 1 - h
            fd = (problem.retrain_logits(up) - problem.retrain_logits(down)) / (2 * h)
            worst = max(worst, float((fd - tau[:, k]).abs().max() / tau[:, k].abs().max()))
        gaps.append(worst)
    return gaps


def _arm(label: str, seed: int, subsets: int) -> dict[str, Any]:
    setting, batch, lr, epochs = ARMS[label]
    config = setting_config(setting, settings_size=True, seeds=1, seed=seed, batch_size=batch, lr=lr, epochs=epochs,
                            n_train=100, n_test=20, top_k=10)
    problem = make_problem(config)
    model, trajectory = problem.train(record=True)
    tau = explaind.CounterfactualEstimator(target=problem.targets(), device="cpu").fit(trajectory).transform(
        problem.X_test).values[..., 0]
    psi = explaind.InfluenceEstimator(keep=("train",), target=problem.targets(), device="cpu").fit(
        trajectory).transform(problem.X_test).values[..., 0]
    rng = np.random.default_rng(seed)
    row: dict[str, Any] = {"steps": config.n_steps}
    for f in FRACTIONS:
        masks = draw_subsets(config.n_train, f, subsets, rng)
        actual = np.stack([problem.retrain_logits(torch.as_tensor(m, dtype=torch.float64)).numpy() for m in masks], 1)
        row[f"cf{f}"] = float(lds(subset_predictions(tau.numpy(), masks), actual).mean())
        row[f"ex{f}"] = float(lds(subset_predictions(psi.numpy(), masks), actual).mean())
    row["max_tau"] = float(tau.abs().max())
    row["growth"] = _growth(problem, model)
    row["gaps"] = _gaps(problem, tau)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--subsets", type=int, default=30)
    args = parser.parse_args()
    print(f"{args.seeds} seed(s) from 0, M = {args.subsets} subsets per fraction, digits 100 train / 20 test; means "
          f"over seeds\n")
    print("| arm | setting | batch | lr | steps | counterfactual LDS 50% / 90% / 99% | decomposition LDS 50% / 90% / "
          "99% | max abs tau | growth of a theta_0 change | gap h = 0.1 | gap h = 1 | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label in args.arms:
        start = time.perf_counter()
        rows = [_arm(label, seed, args.subsets) for seed in range(args.seeds)]

        def mean(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return float(np.mean([r[key] for r in rows]))

        setting, batch, lr, _ = ARMS[label]
        cf = " / ".join(f"{mean(f'cf{f}'):+.3f}" for f in FRACTIONS)
        ex = " / ".join(f"{mean(f'ex{f}'):+.3f}" for f in FRACTIONS)
        gaps = [float(np.mean([r["gaps"][i] for r in rows])) for i in range(len(STEPS))]
        print(f"| {label} | {setting} | {batch} | {lr:g} | {rows[0]['steps']} | {cf} | {ex} | {mean('max_tau'):.3g} | "
              f"{mean('growth'):.3g} | {gaps[0]:.2e} | {gaps[1]:.2e} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
