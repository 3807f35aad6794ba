r"""Run the validation benchmark: LDS over random subsets and top-k removal, both against real retraining.

:func:`run_validation` records one digits run (:class:`~explaind.validation.problem.ValidationProblem`),
scores it with every method of :mod:`explaind.validation.methods`, and then retrains:

1. **LDS.** For each fraction ``p``, ``M`` subsets of ``round(p * n_train)`` samples are drawn
   uniformly without replacement; each is retrained with weight 0 on the samples outside it (the
   recorded loop, same :math:`\theta_0` and batches, see the problem module). Per test point, the
   LDS is the Spearman correlation across the ``M`` subsets of the method's prediction
   :math:`\sum_{k \in S} \tau_k` and the retrained true-class logit; the table gives its mean over
   test points and the standard deviation of that mean over bootstrap resamples of the test points.
   With several seeds (independent runs: data split, initialisation, batches and subsets) the mean
   pools every (seed, test point) and the bootstrap draws seeds, then test points within each.
2. **Top-k removal.** For each test point and each method of :data:`REMOVAL_METHODS` that was scored, the
   ``top_k`` proponents (largest scores for that point) are removed and the run retrained; the
   fraction of test points whose true-class logit went down is reported, with the mean actual
   change and the mean first-order prediction :math:`-\sum_{k \text{ removed}} \tau_k`.

With ``config.leave_out`` both are measured a second time against *leave-out* retraining, the
removed samples taken out of their batches (:mod:`explaind.validation.leave_out`): the same
subsets, the same scores, the same removed proponents.

Methods of optional packages that are not installed are listed in
:attr:`ValidationResult.unavailable` and shown as "not installed".
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..exceptions import ConfigError
from . import external
from .leave_out import leave_out_logits
from .methods import METHODS, OPTIONAL_METHODS, compute_scores
from .metrics import bootstrap_mean, lds, subset_predictions
from .problem import ValidationConfig, ValidationProblem
from .settings import make_problem, setting_methods

__all__ = ["ValidationResult", "run_validation", "draw_subsets", "REMOVAL_METHODS", "retrainings"]

logger = logging.getLogger(__name__)

#: Methods whose top-k proponents are removed (``leave_out_grad`` where it is computed).
REMOVAL_METHODS: tuple[str, ...] = ("counterfactual", "explaind", "leave_out_grad")


@dataclass
class ValidationResult:
    """Everything one validation run measured (pooled over its seeds).

    Attributes
    ----------
    config : dict
        The settings (:meth:`ValidationConfig.as_dict`).
    lds : dict
        ``lds[method][fraction] = (mean, bootstrap std)`` over seeds and test points.
    lds_per_test : dict
        ``lds_per_test[method][fraction]``: the per-test-point LDS values, one list per seed.
    removal : dict
        ``removal[method]`` with ``fraction_lowered`` (and its bootstrap ``fraction_lowered_std``),
        ``mean_change`` and ``mean_predicted_change``, pooled over seeds and test points.
    seconds : dict
        Wall time of each method's scores (mean over seeds), of recording the run and of all retraining.
    checks : dict
        ``full_retrain_max_abs_diff``: largest difference of the test logits between retraining
        on the full set and the recorded run, over seeds (0 when the retrain loop is the recorded loop).
    unavailable : dict
        Optional methods that were asked for but whose package is not installed: method -> package.
    lds_leave_out, removal_leave_out : dict
        With ``config["leave_out"]``: :attr:`lds` and :attr:`removal` measured against leave-out
        retraining (:mod:`explaind.validation.leave_out`); empty otherwise. ``checks`` then also holds
        ``leave_out_full_max_abs_diff`` (leave-out with every sample kept against the recorded run).
    """

    config: dict[str, Any]
    lds: dict[str, dict[float, tuple[float, float]]]
    lds_per_test: dict[str, dict[float, list[list[float]]]]
    removal: dict[str, dict[str, float]]
    seconds: dict[str, float]
    checks: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    lds_leave_out: dict[str, dict[float, tuple[float, float]]] = field(default_factory=dict)
    removal_leave_out: dict[str, dict[str, float]] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown tables: LDS per method and fraction (± bootstrap std, with score time), then removal.

        With leave-out retraining measured, the same two tables follow for it, under a heading line.
        """
        text = self._tables(self.lds, self.removal)
        if self.lds_leave_out:
            text += ("\n\nagainst leave-out retraining (the removed samples taken out of their batches):\n\n"
                     + self._tables(self.lds_leave_out, self.removal_leave_out, unavailable=False))
        return text

    def _tables(self, lds_table: dict[str, dict[float, tuple[float, float]]],
                removal: dict[str, dict[str, float]], unavailable: bool = True) -> str:
        fractions = [float(f) for f in self.config["fractions"]]
        head = "| method | score time (s) | " + " | ".join(f"LDS {100 * f:g}%" for f in fractions) + " |"
        lines = [head, "|" + "---|" * (2 + len(fractions))]
        for method, row in lds_table.items():
            cells = " | ".join(f"{row[f][0]:+.3f} ± {row[f][1]:.3f}" for f in fractions)
            lines.append(f"| {method} | {self.seconds[method]:.2f} | {cells} |")
        for method, package in (self.unavailable.items() if unavailable else ()):
            cells = " | ".join("—" for _ in fractions)
            lines.append(f"| {method} | not installed ({package}; pip install 'explaind[validation]') | {cells} |")
        k = self.config["top_k"]
        lines += ["", f"| top-{k} proponents removed | test points whose logit went down | mean Δ logit "
                  f"(retrained) | mean predicted Δ (first order) |", "|---|---|---|---|"]
        for method, r in removal.items():
            lines.append(f"| {method} | {100 * r['fraction_lowered']:.1f}% ± {100 * r['fraction_lowered_std']:.1f}% | "
                         f"{r['mean_change']:+.4f} | {r['mean_predicted_change']:+.4f} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (fractions as string keys)."""
        return {"config": self.config,
                "lds": {m: {str(f): list(v) for f, v in row.items()} for m, row in self.lds.items()},
                "lds_per_test": {m: {str(f): v for f, v in row.items()} for m, row in self.lds_per_test.items()},
                "removal": self.removal, "seconds": self.seconds, "checks": self.checks,
                "unavailable": self.unavailable,
                "lds_leave_out": {m: {str(f): list(v) for f, v in row.items()}
                                  for m, row in self.lds_leave_out.items()},
                "removal_leave_out": self.removal_leave_out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationResult:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(config=data["config"],
                       lds={m: {float(f): (float(v[0]), float(v[1])) for f, v in row.items()}
                            for m, row in data["lds"].items()},
                       lds_per_test={m: {float(f): v for f, v in row.items()}
                                     for m, row in data["lds_per_test"].items()},
                       removal=data["removal"], seconds=data["seconds"], checks=data.get("checks", {}),
                       unavailable=data.get("unavailable", {}),
                       lds_leave_out={m: {float(f): (float(v[0]), float(v[1])) for f, v in row.items()}
                                      for m, row in data.get("lds_leave_out", {}).items()},
                       removal_leave_out=data.get("removal_leave_out", {}))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ConfigError(f"ValidationResult.from_dict: not a validation result ({type(exc).__name__}: {exc}); "
                              f"write one with 'explaind validate --out DIR'.") from None

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=1, allow_nan=True)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> ValidationResult:
        """Read a result written by :meth:`to_json`."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"ValidationResult.from_json: cannot read {str(path)!r} ({exc}).") from None
        return cls.from_dict(data)

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write one row per method and fraction: ``method, fraction, lds_mean, lds_std, seconds``."""
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["method", "fraction", "lds_mean", "lds_std", "seconds"])
            for method, row in self.lds.items():
                for f, (mean, std) in row.items():
                    writer.writerow([method, f, mean, std, self.seconds[method]])

    def plot(self, path: str | os.PathLike[str]) -> Any:
        """Bar chart of the LDS per method and fraction with the bootstrap error bars (a PNG at ``path``)."""
        from ..viz import lds_bars

        c = self.config
        setting = "" if c.get("setting", "sgd_mlp") == "sgd_mlp" else f"{c['setting']}, "
        return lds_bars(self.lds, [float(f) for f in c["fractions"]], path,
                        title=f"LDS ({setting}{c['activation']}, {c['seeds']} seed{'s' if c['seeds'] != 1 else ''}, "
                              f"M = {c['n_subsets']})")


def draw_subsets(n_train: int, fraction: float, n_subsets: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean masks ``(n_subsets, n_train)`` of uniform random subsets of ``round(fraction * n_train)`` samples."""
    size = int(round(fraction * n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for m in range(n_subsets):
        masks[m, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def _retrained(problem: ValidationProblem, keep: np.ndarray, leave_out: bool) -> torch.Tensor:
    """Explained test outputs ``(T,)`` after retraining on the samples ``keep`` (weight 0 or left out otherwise)."""
    if leave_out:
        return leave_out_logits(problem, torch.as_tensor(keep, dtype=torch.bool))
    return problem.retrain_logits(torch.as_tensor(keep, dtype=torch.float64))


def _retrain_masks(problem: ValidationProblem, masks: np.ndarray, leave_out: bool = False) -> np.ndarray:
    """True-class test logits ``(T, M)`` after retraining on each subset (weight 0 outside it, or left out)."""
    return np.stack([_retrained(problem, mask, leave_out).numpy() for mask in masks], 1)


def _removal(problem: ValidationProblem, scores: np.ndarray, base: np.ndarray, k: int,
             leave_out: bool = False) -> dict[str, np.ndarray]:
    """Per test point: the retrained change of its logit and the predicted change, after removing its top ``k``."""
    changes, predicted = [], []
    for t in range(problem.config.n_test):
        removed = np.argsort(-scores[t], kind="stable")[:k]
        keep = np.ones(problem.config.n_train, dtype=bool)
        keep[removed] = False
        logit = float(_retrained(problem, keep, leave_out)[t])
        changes.append(logit - base[t])
        predicted.append(-float(scores[t, removed].sum()))
    return {"change": np.asarray(changes), "predicted": np.asarray(predicted)}


@dataclass
class _SeedRun:
    """What one seed measured: per-test LDS ``(T,)`` per method and fraction, removal arrays, timings."""

    lds: dict[str, dict[float, np.ndarray]]
    removal: dict[str, dict[str, np.ndarray]]
    seconds: dict[str, float]
    checks: dict[str, float]
    lds_leave_out: dict[str, dict[float, np.ndarray]]
    removal_leave_out: dict[str, dict[str, np.ndarray]]


def _run_seed(config: ValidationConfig, methods: tuple[str, ...], bar: Any) -> _SeedRun:
    problem = make_problem(config)
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
    ways = (False, True) if config.leave_out else (False,)
    if config.leave_out:
        checks["leave_out_full_max_abs_diff"] = float(np.abs(leave_out_logits(problem).numpy() - base).max())
    rng = np.random.default_rng(config.seed)
    per_test: dict[bool, dict[str, dict[float, np.ndarray]]] = {way: {m: {} for m in scores} for way in ways}
    for fraction in config.fractions:
        masks = draw_subsets(config.n_train, fraction, config.n_subsets, rng)
        for way in ways:
            actual = _retrain_masks(problem, masks, way)
            logger.info("validation: seed %d, retrained %d subsets at fraction %g%s", config.seed, len(masks),
                        fraction, " (left out)" if way else "")
            for method, values in scores.items():
                per_test[way][method][float(fraction)] = lds(subset_predictions(values, masks), actual)
        bar.update()
    seconds["retrain_subsets"] = time.perf_counter() - start

    start = time.perf_counter()
    removal = {way: {m: _removal(problem, scores[m], base, config.top_k, way) for m in REMOVAL_METHODS if m in scores}
               for way in ways}
    seconds["retrain_removal"] = time.perf_counter() - start
    bar.update()
    return _SeedRun(per_test[False], removal[False], seconds, checks, per_test.get(True, {}), removal.get(True, {}))


def retrainings(config: ValidationConfig, methods: tuple[str, ...] | None = None) -> int:
    """Training runs that :func:`run_validation` makes after recording (its cost, announced up front).

    Per seed: the full set once, ``n_subsets`` subsets for each fraction, and ``n_test`` top-k
    removals for each method of :data:`REMOVAL_METHODS` that the setting computes; twice that with
    ``config.leave_out``. ``methods`` are those compared (default: every method of the setting).
    """
    if methods is None:
        methods = METHODS if config.setting == "sgd_mlp" else setting_methods(config.setting)
    removing = [m for m in REMOVAL_METHODS if m in methods]
    per_seed = 1 + len(config.fractions) * config.n_subsets + config.n_test * len(removing)
    return config.seeds * per_seed * (2 if config.leave_out else 1)


def run_validation(config: ValidationConfig | None = None,
                   methods: tuple[str, ...] | None = None,
                   progress: bool = False) -> ValidationResult:
    """Record a digits run per seed, score it with each method and measure LDS and top-k removal by retraining.

    Parameters
    ----------
    config : ValidationConfig, optional
        Settings (default: the full benchmark, ``ValidationConfig()``); its ``seeds`` runs use the
        seeds ``config.seed, config.seed + 1, ...``.
    methods : tuple of str, optional
        Methods to compare (names from :data:`~explaind.validation.methods.METHODS` and
        :data:`~explaind.validation.methods.OPTIONAL_METHODS`; default all of them for the SGD MLP, and
        :func:`~explaind.validation.settings.setting_methods` for the other settings); the removal test
        runs for those of :data:`REMOVAL_METHODS` among them. Optional methods whose package is missing are listed in
        :attr:`ValidationResult.unavailable`.
    progress : bool
        A progress bar over the stages on stderr.

    Returns
    -------
    ValidationResult
    """
    from tqdm.auto import tqdm

    config = config if config is not None else ValidationConfig()
    allowed = METHODS + OPTIONAL_METHODS if config.setting == "sgd_mlp" else setting_methods(config.setting)
    if methods is None:
        methods = allowed
    elif bad := [m for m in methods if m not in allowed]:
        why = ("Captum's and TRAK's output functions read one class per input, not one token per position"
               if config.setting == "tiny_lm" else
               "they are written for a per-sample cross-entropy loss; InfoNCE couples the samples of a batch")
        raise ConfigError(f"run_validation: method(s) {bad!r} are not run on the setting {config.setting!r} ({why}). "
                          f"Allowed there: {', '.join(allowed)}.")
    unavailable = {m: pkg for m in methods if m in OPTIONAL_METHODS and (pkg := external.missing(m)) is not None}
    scored = tuple(m for m in methods if m not in unavailable)
    # stages per seed: recording, scores, one per fraction of retrained subsets, top-k removal
    bar = tqdm(total=config.seeds * (3 + len(config.fractions)), desc="validate", unit="stage",
               disable=not progress, leave=False)
    runs = [_run_seed(replace(config, seed=config.seed + i), scored, bar) for i in range(config.seeds)]
    bar.close()

    table, per_test = _pool_lds([run.lds for run in runs], config)
    seconds = {key: float(np.mean([run.seconds[key] for run in runs])) for key in runs[0].seconds}
    for key in ("record", "retrain_subsets", "retrain_removal"):
        seconds[key] = float(sum(run.seconds[key] for run in runs))  # totals over seeds
    checks = {key: max(run.checks[key] for run in runs) for key in runs[0].checks}
    return ValidationResult(config=config.as_dict(), lds=table, lds_per_test=per_test,
                            removal=_pool_removal([run.removal for run in runs], config), seconds=seconds,
                            checks=checks, unavailable=unavailable,
                            lds_leave_out=_pool_lds([run.lds_leave_out for run in runs], config)[0],
                            removal_leave_out=_pool_removal([run.removal_leave_out for run in runs], config))


def _pool_lds(runs: list[dict[str, dict[float, np.ndarray]]], config: ValidationConfig
              ) -> tuple[dict[str, dict[float, tuple[float, float]]], dict[str, dict[float, list[list[float]]]]]:
    """Per method and fraction: the two-level bootstrap mean and std over the seeds' per-test LDS, and the values."""
    table: dict[str, dict[float, tuple[float, float]]] = {}
    per_test: dict[str, dict[float, list[list[float]]]] = {}
    for method in runs[0]:
        table[method], per_test[method] = {}, {}
        for fraction in runs[0][method]:
            values = np.stack([run[method][fraction] for run in runs])  # (S, T)
            per_test[method][fraction] = values.tolist()
            table[method][fraction] = bootstrap_mean(values, config.n_bootstrap, config.seed)
    return table, per_test


def _pool_removal(runs: list[dict[str, dict[str, np.ndarray]]],
                  config: ValidationConfig) -> dict[str, dict[str, float]]:
    """Per method: the fraction of lowered outputs (with its bootstrap std), the mean change and prediction."""
    removal = {}
    for method in runs[0]:
        change = np.stack([run[method]["change"] for run in runs])
        predicted = np.stack([run[method]["predicted"] for run in runs])
        lowered, lowered_std = bootstrap_mean((change < 0).astype(np.float64), config.n_bootstrap, config.seed)
        removal[method] = {"fraction_lowered": lowered, "fraction_lowered_std": lowered_std,
                           "mean_change": float(change.mean()), "mean_predicted_change": float(predicted.mean())}
    return removal
