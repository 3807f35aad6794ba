r"""The pruning benchmark: every strategy at every sparsity over several seeds, without retraining.

For a trained classifier :math:`f` (logits), a pruned copy :math:`\tilde f` and the test set
:math:`\{(x_i, y_i)\}_{i=1}^n`, three numbers are measured:

* accuracy :math:`\frac1n\sum_i [\arg\max \tilde f(x_i) = y_i]`;
* agreement with the unpruned model :math:`\frac1n\sum_i [\arg\max \tilde f(x_i) = \arg\max f(x_i)]`;
* mean KL divergence to the unpruned model
  :math:`\frac1n\sum_i \mathrm{KL}\big(\mathrm{softmax} f(x_i) \,\|\, \mathrm{softmax} \tilde f(x_i)\big)`
  (float64, from log-softmax).

Seeds set each strategy's ``random_state`` and, with ``scoring_size``, which scoring samples are
drawn. Results come as a :class:`PruningBenchmarkResult`: one row per (strategy, sparsity, seed),
a mean/std summary, a text table, JSON/CSV files and a plot.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..exceptions import ConfigError
from .apply import apply_masks
from .base import PruningStrategy, as_batch, check_sparsity
from .masks import mask_sparsity

__all__ = [
    "DEFAULT_SPARSITIES",
    "METRICS",
    "get_strategy",
    "evaluate_pruned",
    "run_pruning_benchmark",
    "PruningBenchmarkResult",
]

logger = logging.getLogger(__name__)

#: Sparsities of the benchmark (fraction of prunable coordinates removed).
DEFAULT_SPARSITIES: tuple[float, ...] = (0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
#: Measured quantities, in table order.
METRICS: tuple[str, ...] = ("accuracy", "agreement", "kl")
_FORMAT = "explaind.pruning-benchmark"


def get_strategy(name: str, **options: Any) -> PruningStrategy:
    """Instantiate the registered pruning strategy ``name`` with ``options``.

    Raises
    ------
    UnknownEntryError
        For an unknown name (the message lists the registered strategies).
    """
    from ..plugins import get_entry

    return get_entry("pruning_strategy", name).implementation(**options)


@torch.no_grad()
def _logits(model: nn.Module, X: Tensor, batch_size: int = 2048) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        parts = [model(X[i:i + batch_size]) for i in range(0, X.shape[0], batch_size)]
    finally:
        model.train(was_training)
    out = torch.cat(parts)
    return out.reshape(out.shape[0], -1).to(torch.float64)


def evaluate_pruned(pruned_logits: Tensor, reference_logits: Tensor, targets: Tensor) -> dict[str, float]:
    """Accuracy, agreement and mean KL(reference || pruned) from logits of shape ``(n, O)``.

    A row with non-finite pruned logits counts as wrong and disagreeing, with KL ``inf``.
    """
    ref_logp = torch.log_softmax(reference_logits.to(torch.float64), dim=1)
    logp = torch.log_softmax(pruned_logits.to(torch.float64), dim=1)
    finite = torch.isfinite(pruned_logits).all(dim=1)
    pred = pruned_logits.argmax(dim=1)
    accuracy = float(((pred == targets.to(pred.device)) & finite).double().mean())
    agreement = float(((pred == reference_logits.argmax(dim=1)) & finite).double().mean())
    kl_rows = (ref_logp.exp() * (ref_logp - logp)).sum(dim=1)
    kl_rows = torch.where(finite, kl_rows, torch.full_like(kl_rows, math.inf))
    return {"accuracy": accuracy, "agreement": agreement, "kl": float(kl_rows.mean())}


def _resolve_strategies(strategies: Any, trajectory: Any) -> list[str]:
    from ..plugins import get_entry, list_entries

    if strategies is None:
        names = []
        for name in list_entries("pruning_strategy"):
            if get_entry("pruning_strategy", name).needs_trajectory and trajectory is None:
                logger.info("pruning benchmark: skipping %r (needs a trajectory; none given)", name)
                continue
            names.append(name)
        return names
    if isinstance(strategies, str):
        strategies = [strategies]
    names = list(strategies)
    for name in names:
        record = get_entry("pruning_strategy", name)
        if record.needs_trajectory and trajectory is None:
            raise ConfigError(
                f"pruning strategy {name!r} needs the recorded trajectory of the model; pass trajectory=... or "
                f"leave {name!r} out of strategies."
            )
    if not names:
        raise ConfigError("strategies is empty; pass registered names, e.g. ['magnitude', 'snip'].")
    return names


def run_pruning_benchmark(
    model: nn.Module,
    *,
    test_data: Any,
    scoring_data: Any = None,
    trajectory: Any = None,
    strategies: Iterable[str] | None = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    seeds: Sequence[int] = (0, 1, 2),
    exclude: Iterable[str] = (),
    scope: str = "global",
    granularity: str = "unstructured",
    prune_biases: bool = False,
    scoring_size: int | None = None,
    strategy_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = False,
) -> PruningBenchmarkResult:
    """Prune ``model`` with every strategy at every sparsity and seed, and measure the pruned copies.

    Parameters
    ----------
    model : torch.nn.Module
        Trained classifier returning logits ``(n, O)``; never modified.
    test_data : (X, y)
        Where accuracy, agreement and KL are measured.
    scoring_data : (X, y), optional
        The scoring / evaluation split: the batch of SNIP and GraSP and the evaluation set of the
        ExPLAIND scores. Required by strategies that need data.
    trajectory : explaind.Trajectory, optional
        The recorded training run of ``model`` (for ``"explaind"``).
    strategies : iterable of str, optional
        Registered strategy names (default: all registered, less those needing a missing trajectory).
    sparsities : sequence of float
        Fractions of prunable coordinates removed, each in ``[0, 1)``.
    seeds : sequence of int
        Each seed is every strategy's ``random_state`` and draws the scoring subsample.
    exclude, scope, granularity, prune_biases
        Thresholding options passed to every strategy (:class:`explaind.pruning.PruningConfig`).
    scoring_size : int, optional
        Draw this many scoring samples per seed (default: the whole scoring split).
    strategy_options : mapping, optional
        Extra options per strategy name, e.g. ``{"synflow": {"n_iterations": 50}}``.
    progress : bool
        Show a progress bar (tqdm).

    Returns
    -------
    PruningBenchmarkResult
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    sparsities = [check_sparsity(s, "run_pruning_benchmark") for s in sparsities]
    if not sparsities:
        raise ConfigError("sparsities is empty; pass e.g. (0.9, 0.95, 0.99).")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("seeds is empty; pass e.g. (0, 1, 2).")
    names = _resolve_strategies(strategies, trajectory)
    options = {k: dict(v) for k, v in (strategy_options or {}).items()}
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ConfigError(f"strategy_options names strategies not benchmarked: {unknown}; benchmarked: {names}.")
    first = next(model.parameters())
    X_test, y_test = as_batch(test_data, needs_targets=True, owner="run_pruning_benchmark(test_data)",
                              device=first.device, dtype=first.dtype)
    scoring = None
    if scoring_data is not None:
        scoring = as_batch(scoring_data, needs_targets=False, owner="run_pruning_benchmark(scoring_data)",
                           device=first.device, dtype=first.dtype)
    reference = _logits(model, X_test)
    base_metrics = evaluate_pruned(reference, reference, y_test)
    exclude = tuple(exclude)

    rows: list[dict[str, Any]] = []
    baseline = [{"seed": seed, **base_metrics} for seed in seeds]
    jobs = [(seed, name) for seed in seeds for name in names]
    bar = _progress(len(jobs) * len(sparsities), progress)
    for seed, name in jobs:
        data = _scoring_for(scoring, scoring_size, seed, name)
        strategy = get_strategy(name, exclude=exclude, scope=scope, granularity=granularity,
                                prune_biases=prune_biases, random_state=seed, sparsity=sparsities[0],
                                **options.get(name, {}))
        if strategy.needs_data and data is None:
            raise ConfigError(f"pruning strategy {name!r} needs scoring data; pass scoring_data=(X, y).")
        start = time.perf_counter()
        strategy.fit(model, data, trajectory)
        fit_seconds = time.perf_counter() - start
        logger.info("pruning benchmark: fitted %r (seed %d) in %.2fs", name, seed, fit_seconds)
        for sparsity in sparsities:
            masks = strategy.masks(sparsity)
            pruned = apply_masks(model, masks)
            metrics = evaluate_pruned(_logits(pruned, X_test), reference, y_test)
            rows.append({
                "strategy": name,
                "sparsity": sparsity,
                "kept_fraction": 1.0 - sparsity,
                "achieved_sparsity": mask_sparsity(masks, strategy.prunable_),
                "seed": seed,
                **metrics,
                "fit_seconds": fit_seconds,
            })
            bar.update(1)
    bar.close()
    config = {
        "strategies": names,
        "sparsities": sparsities,
        "seeds": seeds,
        "exclude": list(exclude),
        "scope": scope,
        "granularity": granularity,
        "prune_biases": prune_biases,
        "scoring_size": scoring_size,
        "n_test": int(X_test.shape[0]),
        "n_scoring": None if scoring is None else int(scoring[0].shape[0]),
        "strategy_options": {k: {kk: repr(vv) for kk, vv in v.items()} for k, v in options.items()},
    }
    return PruningBenchmarkResult(rows=rows, baseline=baseline, config=config)


def _scoring_for(scoring: tuple | None, size: int | None, seed: int, name: str) -> Any:
    if scoring is None:
        return None
    X, y = scoring
    if size is None or size >= X.shape[0]:
        return (X, y) if y is not None else X
    if size <= 0:
        raise ConfigError(f"scoring_size must be positive; got {size}.")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(X.shape[0], generator=gen)[:size].to(X.device)
    return (X[idx], y[idx]) if y is not None else X[idx]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="pruning benchmark", unit="mask")


@dataclass
class PruningBenchmarkResult:
    """Measurements of :func:`run_pruning_benchmark`.

    Attributes
    ----------
    rows : list of dict
        One per (strategy, sparsity, seed): ``strategy``, ``sparsity``, ``kept_fraction``,
        ``achieved_sparsity``, ``seed``, ``accuracy``, ``agreement``, ``kl``, ``fit_seconds``.
    baseline : list of dict
        The unpruned model per seed: ``seed``, ``accuracy``, ``agreement`` (1), ``kl`` (0).
    config : dict
        The benchmark's settings.
    """

    rows: list[dict[str, Any]]
    baseline: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ aggregation
    @property
    def strategies(self) -> list[str]:
        """Strategy names in first-seen order."""
        return list(dict.fromkeys(r["strategy"] for r in self.rows))

    @property
    def sparsities(self) -> list[float]:
        """Sparsities, sorted."""
        return sorted({float(r["sparsity"]) for r in self.rows})

    def summary(self) -> list[dict[str, Any]]:
        """Mean, standard deviation (ddof 0), min and max of each metric per (strategy, sparsity)."""
        out = []
        for name in self.strategies:
            for sparsity in self.sparsities:
                group = [r for r in self.rows if r["strategy"] == name and float(r["sparsity"]) == sparsity]
                if not group:
                    continue
                entry: dict[str, Any] = {"strategy": name, "sparsity": sparsity, "kept_fraction": 1.0 - sparsity,
                                         "n_seeds": len(group)}
                for metric in (*METRICS, "achieved_sparsity"):
                    values = np.array([float(r[metric]) for r in group], dtype=np.float64)
                    entry[f"{metric}_mean"] = float(values.mean())
                    entry[f"{metric}_std"] = float(values.std())
                    entry[f"{metric}_min"] = float(values.min())
                    entry[f"{metric}_max"] = float(values.max())
                out.append(entry)
        return out

    def table(self, sparsities: Iterable[float] | None = None, metrics: Sequence[str] = METRICS) -> str:
        """A plain-text table: one line per (sparsity, strategy), ``mean ± std`` over seeds."""
        wanted = self.sparsities if sparsities is None else [float(s) for s in sparsities]
        missing = [s for s in wanted if s not in self.sparsities]
        if missing:
            raise ConfigError(f"table: sparsities {missing} were not measured; measured: {self.sparsities}.")
        base = self.baseline[0] if self.baseline else None
        header = f"{'sparsity':>9}  {'strategy':<10}" + "".join(f"  {m:>21}" for m in metrics)
        lines = [header, "-" * len(header)]
        if base is not None:
            acc = np.mean([b["accuracy"] for b in self.baseline])
            lines.append(f"{'0':>9}  {'unpruned':<10}  {acc:>21.4f}")
        summary = self.summary()
        for sparsity in wanted:
            for entry in (e for e in summary if e["sparsity"] == sparsity):
                cells = "".join(
                    f"  {entry[f'{m}_mean']:>11.4g} ± {entry[f'{m}_std']:<7.2g}" for m in metrics
                )
                lines.append(f"{sparsity:>9.4g}  {entry['strategy']:<10}{cells}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``format``, ``version``, ``config``, ``baseline``, ``rows``, ``summary``."""
        return {"format": _FORMAT, "version": 1, "config": self.config, "baseline": self.baseline,
                "rows": self.rows, "summary": self.summary()}

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON (non-finite numbers as ``Infinity``/``NaN``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> PruningBenchmarkResult:
        """Read a file written by :meth:`to_json`."""
        payload = json.loads(Path(path).read_text())
        if payload.get("format") != _FORMAT:
            raise ConfigError(f"{str(path)!r} is not a pruning benchmark result (format {payload.get('format')!r}).")
        return cls(rows=payload["rows"], baseline=payload.get("baseline", []), config=payload.get("config", {}))

    def to_csv(self, path: str | os.PathLike[str], *, summary: bool = False) -> Path:
        """Write the per-seed rows (or the summary) as CSV."""
        records = self.summary() if summary else self.rows
        if not records:
            raise ConfigError("to_csv: the result holds no rows.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        return path

    @classmethod
    def concat(cls, results: Sequence[PruningBenchmarkResult]) -> PruningBenchmarkResult:
        """Join results of separate runs (e.g. one trained model per seed); configs are kept per run."""
        if not results:
            raise ConfigError("concat needs at least one result.")
        rows = [r for res in results for r in res.rows]
        baseline = [b for res in results for b in res.baseline]
        config = dict(results[0].config)
        config["seeds"] = sorted({int(r["seed"]) for r in rows})
        config["runs"] = [res.config for res in results]
        return cls(rows=rows, baseline=baseline, config=config)

    def plot(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """Accuracy and KL to the unpruned model against the fraction kept (log axis), PNG via Agg.

        One line per strategy (mean over seeds); ``random`` has a min–max band over seeds. The
        unpruned accuracy is a dashed line.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4.2))
        FigureCanvasAgg(fig)
        ax_acc, ax_kl = fig.subplots(1, 2)
        summary = self.summary()
        for name in self.strategies:
            entries = sorted((e for e in summary if e["strategy"] == name), key=lambda e: e["kept_fraction"])
            kept = [e["kept_fraction"] for e in entries]
            for ax, metric in ((ax_acc, "accuracy"), (ax_kl, "kl")):
                mean = np.array([e[f"{metric}_mean"] for e in entries])
                (line,) = ax.plot(kept, mean, marker="o", ms=3, label=name)
                if name == "random":
                    lo = np.array([e[f"{metric}_min"] for e in entries])
                    hi = np.array([e[f"{metric}_max"] for e in entries])
                    ax.fill_between(kept, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        if self.baseline:
            ax_acc.axhline(float(np.mean([b["accuracy"] for b in self.baseline])), color="k", ls="--", lw=1,
                           label="unpruned")
        ax_acc.set(xscale="log", xlabel="fraction of weights kept", ylabel="test accuracy")
        kl_values = [float(r["kl"]) for r in self.rows if math.isfinite(float(r["kl"]))]
        ax_kl.set(xscale="log", yscale="log" if kl_values and min(kl_values) > 0 else "symlog",
                  xlabel="fraction of weights kept", ylabel="mean KL(unpruned || pruned)")
        from matplotlib.ticker import FixedLocator, NullFormatter

        ticks = sorted({float(e["kept_fraction"]) for e in summary})
        for ax in (ax_acc, ax_kl):
            ax.invert_xaxis()
            ax.grid(True, which="both", alpha=0.3)
            # one labelled tick per measured fraction, none of the log axis' minor labels (they overlapped)
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.set_xticks(ticks, labels=[f"{t:.3g}" for t in ticks], rotation=45, ha="right", fontsize=8)
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax_acc.legend(fontsize=8, title="strategy", title_fontsize=8)
        ax_kl.legend(fontsize=8, title="strategy", title_fontsize=8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        return path
