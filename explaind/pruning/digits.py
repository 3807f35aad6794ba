"""The pruning benchmark on scikit-learn's bundled 8x8 digits (no download).

Per seed, a small classifier (registered ``"mlp"`` or ``"cnn"`` architecture) is trained with
mini-batch SGD with momentum, as in the CIFAR-2 setting of the ExPLAIND paper, while a
:class:`explaind.TrajectoryRecorder` records the run. Every registered pruning strategy then
prunes the trained model at every sparsity (the output layer is never pruned, as in the paper)
and the pruned copies are compared with the unpruned model on held-out digits, without
retraining (:func:`explaind.pruning.run_pruning_benchmark`).

The 1797 digits are split once (stratified, fixed seed) into 1000 training, 300 scoring /
evaluation and 497 test images; pixel values are scaled to ``[0, 1]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError
from .harness import DEFAULT_SPARSITIES, PruningBenchmarkResult, run_pruning_benchmark

__all__ = ["load_digits_splits", "train_digits_model", "run_digits_benchmark", "output_layer"]

logger = logging.getLogger(__name__)

_SPLIT = {"train": 1000, "scoring": 300}  # the remaining 497 images are the test split


def load_digits_splits(architecture: Literal["mlp", "cnn"] = "mlp",
                       dtype: torch.dtype = torch.float32) -> dict[str, tuple[Tensor, Tensor]]:
    """The digits as ``{"train", "scoring", "test"}`` -> ``(X, y)`` tensors.

    ``X`` has shape ``(n, 64)`` for ``"mlp"`` and ``(n, 1, 8, 8)`` for ``"cnn"``, values in
    ``[0, 1]``; ``y`` holds class indices (int64). The split is stratified and fixed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X, y = data.data / 16.0, data.target
    X_train, X_rest, y_train, y_rest = train_test_split(X, y, train_size=_SPLIT["train"], stratify=y,
                                                        random_state=0)
    X_score, X_test, y_score, y_test = train_test_split(X_rest, y_rest, train_size=_SPLIT["scoring"],
                                                        stratify=y_rest, random_state=0)
    shape = (-1, 64) if architecture == "mlp" else (-1, 1, 8, 8)

    def pack(a: Any, b: Any) -> tuple[Tensor, Tensor]:
        return torch.as_tensor(a, dtype=dtype).reshape(shape), torch.as_tensor(b, dtype=torch.int64)

    return {"train": pack(X_train, y_train), "scoring": pack(X_score, y_score), "test": pack(X_test, y_test)}


def _build(architecture: str, hidden_sizes: Sequence[int], channels: Sequence[int], seed: int) -> nn.Module:
    from ..models import build_model

    if architecture == "mlp":
        return build_model("mlp", {"in_features": 64, "hidden_sizes": tuple(hidden_sizes), "out_features": 10},
                           seed=seed)
    if architecture == "cnn":
        return build_model("cnn", {"in_channels": 1, "image_size": 8, "channels": tuple(channels),
                                   "out_features": 10}, seed=seed)
    raise ConfigError(f"Unknown digits architecture {architecture!r}. Choose one of: mlp, cnn.")


def train_digits_model(
    architecture: Literal["mlp", "cnn"] = "mlp",
    *,
    seed: int = 0,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    hidden_sizes: Sequence[int] = (64,),
    channels: Sequence[int] = (8, 16),
    splits: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> tuple[nn.Module, Any]:
    """Train a digits classifier with SGD + momentum while recording the run.

    Returns
    -------
    model : torch.nn.Module
        The trained model (float32, eval mode).
    trajectory : explaind.Trajectory
        The in-memory recorded run (``trajectory.params(trajectory.n_steps)`` equals ``model``).
    """
    from ..trajectory import TrajectoryRecorder

    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs ({epochs}) and batch_size ({batch_size}) must be positive integers.")
    splits = splits if splits is not None else load_digits_splits(architecture)
    X, y = splits["train"]
    model = _build(architecture, hidden_sizes, channels, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    recorder = TrajectoryRecorder(model, optimizer, loss="cross_entropy", train_data=(X, y))
    with recorder:
        for _ in range(epochs):
            order = torch.randperm(X.shape[0], generator=gen)
            for start in range(0, X.shape[0], batch_size):
                idx = order[start:start + batch_size]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
                recorder.log_batch(idx)
                optimizer.step()
    model.eval()
    return model, recorder.trajectory


def output_layer(model: nn.Module) -> str:
    """Module prefix of the last trainable parameter (the output layer), e.g. ``"net.4"``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError("the model has no trainable parameters.")
    return names[-1].rpartition(".")[0] or names[-1]


def _scores_rule(quadrature: str, nodes: int | None, tol: float | None) -> dict[str, Any]:
    """The ``explaind`` strategy's path-integral options: ``quadrature``, ``quadrature_nodes``, (adaptive) ``tol``."""
    from ..kernel.quadrature import DEFAULT_NODES
    from ..studies.fidelity import SCORES_RULE, SCORES_TOL

    if quadrature not in DEFAULT_NODES:
        raise ConfigError(f"quadrature={quadrature!r} is not a path-integral rule. Choose one of: "
                          f"{', '.join(DEFAULT_NODES)}.")
    if quadrature != "adaptive":
        return {"quadrature": quadrature, "quadrature_nodes": nodes or DEFAULT_NODES[quadrature]}
    return {"quadrature": quadrature, "quadrature_nodes": nodes or SCORES_RULE.nodes,
            "tol": SCORES_TOL if tol is None else tol}


def run_digits_benchmark(
    out_dir: str | os.PathLike[str],
    *,
    architecture: Literal["mlp", "cnn"] = "mlp",
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    seeds: Sequence[int] = (0, 1, 2),
    strategies: Iterable[str] | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    hidden_sizes: Sequence[int] = (64,),
    channels: Sequence[int] = (8, 16),
    quadrature: str = "adaptive",
    quadrature_nodes: int | None = None,
    tol: float | None = None,
    scores_dtype: Literal["float32", "float64"] | None = "float64",
    explaind_backend: str = "auto",
    scope: str = "global",
    granularity: str = "unstructured",
    progress: bool = False,
) -> PruningBenchmarkResult:
    """Train, record and prune digits classifiers; write the table and the plot to ``out_dir``.

    Parameters
    ----------
    out_dir : path-like
        Receives ``results.json`` (settings, per-seed rows and summary), ``results.csv`` (per-seed
        rows), ``summary.csv`` (mean/std/min/max per strategy and sparsity), ``table.txt`` and
        ``pruning.png`` (accuracy and KL against the fraction kept).
    architecture : {"mlp", "cnn"}
        Registered ``"mlp"`` (64-``hidden_sizes``-10, ReLU) or ``"cnn"`` (``channels`` conv layers).
    sparsities : sequence of float
        Fractions of prunable weights removed (default 70% to 99.9%, eight values).
    seeds : sequence of int
        One trained model (initialisation and batch order) per seed; also each strategy's seed.
    strategies : iterable of str, optional
        Registered strategy names (default: all six first-party ones and any installed plugin's).
    epochs, batch_size, lr, momentum
        SGD with momentum (torch semantics) over the 1000 training digits.
    hidden_sizes, channels
        Widths of the MLP / channels of the CNN.
    quadrature, quadrature_nodes, tol
        The ExPLAIND scores' path-integral rule (``adaptive``, ``gauss-legendre``, ``midpoint`` or ``left``),
        its nodes per step (per panel for ``adaptive``; ``None``: the panel nodes of ``SCORES_RULE`` for
        ``adaptive``, else the rule's default) and the adaptive rule's relative tolerance per step and input
        (``None``: ``SCORES_TOL``; ignored by the other rules). The default is the rule of ``explaind influence``
        (:data:`explaind.studies.fidelity.SCORES_RULE` at :data:`~explaind.studies.fidelity.SCORES_TOL`): a fixed
        rule leaves the error of the steps whose paths cross ReLU kinks, warned about above 0.1% of the explained
        change.
    scores_dtype : {"float32", "float64"} or None
        Dtype the ExPLAIND scores are computed in (``None``: the recorded run's, float32). float64, as
        ``explaind influence`` computes: in float32 the rounding of the path gradients blurs the adaptive
        rule's error estimate on the steps across many kinks, and a (step, input) pair can end just above
        its tolerance (``benchmarks/bench_pruning.py --rules``).
    explaind_backend : {"auto", "path", "engine"}
        Backend of the ``"explaind"`` strategy. With ``"auto"`` this run (SGD with momentum, no
        weight decay, audited residual ~1e-6) uses the direct path integral, which computes the
        engine's parameter-wise scores several times faster (see ``explaind_pruning.ExplaindPruning``).
    scope, granularity
        Thresholding options (see :class:`explaind.pruning.PruningConfig`).
    progress : bool
        Progress bars.

    Returns
    -------
    PruningBenchmarkResult
        All seeds joined (``result.table()`` prints the summary).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_digits_splits(architecture)
    from ..plugins import list_entries

    names = list(strategies) if strategies is not None else list_entries("pruning_strategy")
    rule = _scores_rule(quadrature, quadrature_nodes, tol)
    options = ({"explaind": {**rule, "dtype": scores_dtype, "backend": explaind_backend}}
               if "explaind" in names else {})
    results = []
    for seed in seeds:
        model, trajectory = train_digits_model(architecture, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                                               momentum=momentum, hidden_sizes=hidden_sizes, channels=channels,
                                               splits=splits)
        logger.info("digits: trained %s (seed %d, %d steps)", architecture, seed, trajectory.n_steps)
        results.append(run_pruning_benchmark(
            model, test_data=splits["test"], scoring_data=splits["scoring"], trajectory=trajectory,
            strategies=names, sparsities=sparsities, seeds=(seed,), exclude=(output_layer(model),), scope=scope,
            granularity=granularity, strategy_options=options, progress=progress,
        ))
    result = PruningBenchmarkResult.concat(results)
    result.config.update({
        "dataset": "sklearn digits 8x8 (1000 train / 300 scoring / 497 test)",
        "architecture": architecture, "epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
        "hidden_sizes": list(hidden_sizes), "channels": list(channels), **rule, "scores_dtype": scores_dtype,
        "explaind_backend": explaind_backend,
    })
    result.to_json(out / "results.json")
    result.to_csv(out / "results.csv")
    result.to_csv(out / "summary.csv", summary=True)
    (out / "table.txt").write_text(result.table() + "\n")
    n_seeds = len(list(seeds))
    result.plot(out / "pruning.png", title=f"Pruning without retraining: digits {architecture}, "
                                          f"{n_seeds} seed{'s' if n_seeds != 1 else ''}")
    return result
