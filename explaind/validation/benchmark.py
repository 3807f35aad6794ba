r"""Run the validation benchmark: LDS over random subsets and top-k removal, both against real retraining.

:func:`run_validation` records one digits run (:class:`~explaind.validation.problem.ValidationProblem`),
scores it with every method of :mod:`explaind.validation.methods`, and then retrains:

1. **LDS.** For each fraction ``p``, ``M`` subsets of ``round(p * n_train)`` samples are drawn
   uniformly without replacement; each is retrained with weight 0 on the samples outside it (the
   recorded loop, same :math:`\theta_0` and batches, see the problem module). Per test point, the
   LDS is the Spearman correlation across the ``M`` subsets of the method's prediction
   :math:`\sum_{k \in S} \tau_k` and the retrained true-class logit; the table gives its mean over
   test points and the standard deviation of that mean over bootstrap resamples of the test points.
2. **Top-k removal.** For each test point and for ``counterfactual`` and ``explaind``, the
   ``top_k`` proponents (largest scores for that point) are removed and the run retrained; the
   fraction of test points whose true-class logit went down is reported, with the mean actual
   change and the mean first-order prediction :math:`-\sum_{k \text{ removed}} \tau_k`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .methods import METHODS, compute_scores
from .metrics import bootstrap_mean, lds, subset_predictions
from .problem import ValidationConfig, ValidationProblem

__all__ = ["ValidationResult", "run_validation", "draw_subsets", "REMOVAL_METHODS"]

logger = logging.getLogger(__name__)

#: Methods whose top-k proponents are removed.
REMOVAL_METHODS: tuple[str, ...] = ("counterfactual", "explaind")


@dataclass
class ValidationResult:
    """Everything one validation run measured.

    Attributes
    ----------
    config : dict
        The settings (:meth:`ValidationConfig.as_dict`).
    lds : dict
        ``lds[method][fraction] = (mean, bootstrap std)`` over test points.
    lds_per_test : dict
        ``lds_per_test[method][fraction]``: the per-test-point LDS values.
    removal : dict
        ``removal[method]`` with ``fraction_lowered``, ``mean_change`` and ``mean_predicted_change``.
    seconds : dict
        Wall time of each method's scores, of recording the run and of all retraining.
    checks : dict
        ``full_retrain_max_abs_diff``: largest difference of the test logits between retraining
        on the full set and the recorded run (0 when the retrain loop is the recorded loop).
    """

    config: dict[str, Any]
    lds: dict[str, dict[float, tuple[float, float]]]
    lds_per_test: dict[str, dict[float, list[float]]]
    removal: dict[str, dict[str, float]]
    seconds: dict[str, float]
    checks: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown tables: LDS per method and fraction (± bootstrap std, with score time), then removal."""
        fractions = [float(f) for f in self.config["fractions"]]
        head = "| method | score time (s) | " + " | ".join(f"LDS {100 * f:g}%" for f in fractions) + " |"
        lines = [head, "|" + "---|" * (2 + len(fractions))]
        for method, row in self.lds.items():
            cells = " | ".join(f"{row[f][0]:+.3f} ± {row[f][1]:.3f}" for f in fractions)
            lines.append(f"| {method} | {self.seconds[method]:.2f} | {cells} |")
        k = self.config["top_k"]
        lines += ["", f"| top-{k} proponents removed | test points whose logit went down | mean Δ logit "
                  f"(retrained) | mean predicted Δ (first order) |", "|---|---|---|---|"]
        for method, r in self.removal.items():
            lines.append(f"| {method} | {100 * r['fraction_lowered']:.1f}% | {r['mean_change']:+.4f} | "
                         f"{r['mean_predicted_change']:+.4f} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (fractions as string keys)."""
        return {"config": self.config,
                "lds": {m: {str(f): list(v) for f, v in row.items()} for m, row in self.lds.items()},
                "lds_per_test": {m: {str(f): v for f, v in row.items()} for m, row in self.lds_per_test.items()},
                "removal": self.removal, "seconds": self.seconds, "checks": self.checks}

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=1, allow_nan=True)

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write one row per method and fraction: ``method, fraction, lds_mean, lds_std, seconds``."""
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["method", "fraction", "lds_mean", "lds_std", "seconds"])
            for method, row in self.lds.items():
                for f, (mean, std) in row.items():
                    writer.writerow([method, f, mean, std, self.seconds[method]])


def draw_subsets(n_train: int, fraction: float, n_subsets: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean masks ``(n_subsets, n_train)`` of uniform random subsets of ``round(fraction * n_train)`` samples."""
    size = int(round(fraction * n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for m in range(n_subsets):
        masks[m, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def _retrain_masks(problem: ValidationProblem, masks: np.ndarray) -> np.ndarray:
    """True-class test logits ``(T, M)`` after retraining on each subset (weight 0 outside it)."""
    out = [problem.retrain_logits(torch.as_tensor(mask, dtype=torch.float64)).numpy() for mask in masks]
    return np.stack(out, 1)


def _removal(problem: ValidationProblem, scores: np.ndarray, base: np.ndarray, k: int) -> dict[str, float]:
    changes, predicted = [], []
    for t in range(problem.config.n_test):
        removed = np.argsort(-scores[t], kind="stable")[:k]
        weights = torch.ones(problem.config.n_train, dtype=torch.float64)
        weights[torch.as_tensor(removed)] = 0.0
        logit = float(problem.true_logits(problem.train(weights)[0], rows=[t])[0])
        changes.append(logit - base[t])
        predicted.append(-float(scores[t, removed].sum()))
    changes_arr = np.asarray(changes)
    return {"fraction_lowered": float((changes_arr < 0).mean()), "mean_change": float(changes_arr.mean()),
            "mean_predicted_change": float(np.mean(predicted))}


def run_validation(config: ValidationConfig | None = None, methods: tuple[str, ...] = METHODS,
                   progress: bool = False) -> ValidationResult:
    """Record a digits run, score it with each method and measure LDS and top-k removal by retraining.

    Parameters
    ----------
    config : ValidationConfig, optional
        Settings (default: the full benchmark, ``ValidationConfig()``).
    methods : tuple of str
        Methods to compare (names from :data:`~explaind.validation.methods.METHODS`); the removal
        test runs for those of :data:`REMOVAL_METHODS` among them.

    Returns
    -------
    ValidationResult
    """
    from tqdm.auto import tqdm

    config = config if config is not None else ValidationConfig()
    problem = ValidationProblem(config)
    # stages: recording, scores, one per fraction of retrained subsets, top-k removal
    bar = tqdm(total=3 + len(config.fractions), desc="validate", unit="stage", disable=not progress, leave=False)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    model, trajectory = problem.train(record=True)
    seconds["record"] = time.perf_counter() - start
    bar.update()
    base = problem.true_logits(model).numpy()
    scores, score_seconds = compute_scores(problem, trajectory, model, methods)
    seconds.update(score_seconds)
    bar.update()

    start = time.perf_counter()
    full = problem.retrain_logits().numpy()
    checks = {"full_retrain_max_abs_diff": float(np.abs(full - base).max())}
    rng = np.random.default_rng(config.seed)
    table: dict[str, dict[float, tuple[float, float]]] = {m: {} for m in methods}
    per_test: dict[str, dict[float, list[float]]] = {m: {} for m in methods}
    for fraction in config.fractions:
        masks = draw_subsets(config.n_train, fraction, config.n_subsets, rng)
        actual = _retrain_masks(problem, masks)
        logger.info("validation: retrained %d subsets at fraction %g", len(masks), fraction)
        for method in methods:
            values = lds(subset_predictions(scores[method], masks), actual)
            per_test[method][float(fraction)] = values.tolist()
            table[method][float(fraction)] = bootstrap_mean(values, config.n_bootstrap, config.seed)
        bar.update()
    seconds["retrain_subsets"] = time.perf_counter() - start

    start = time.perf_counter()
    removal = {m: _removal(problem, scores[m], base, config.top_k) for m in REMOVAL_METHODS if m in methods}
    seconds["retrain_removal"] = time.perf_counter() - start
    bar.update()
    bar.close()
    return ValidationResult(config=config.as_dict(), lds=table, lds_per_test=per_test, removal=removal,
                            seconds=seconds, checks=checks)
