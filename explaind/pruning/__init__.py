"""Pruning by scores: strategies' base class, masks, applying them, and the benchmark harness.

* :class:`PruningStrategy` — base class of the registered strategies
  (``explaind.get_entry("pruning_strategy", name)``; see :func:`get_strategy`);
* :func:`scores_to_masks` — global / per-layer thresholds, exclusion, neuron granularity;
* :func:`apply_masks`, :func:`export_to_torch_prune`, :func:`prune_global_by_scores`,
  :func:`save_pruned`, :func:`load_pruned` — using masks;
* :func:`run_pruning_benchmark`, :func:`run_digits_benchmark` — accuracy, agreement and KL to the
  unpruned model over sparsities, strategies and seeds.

Names are imported on first access, so importing this package stays cheap.
"""

from __future__ import annotations

from .. import _lazy_exports

_EXPORTS: dict[str, str] = {
    "PruningConfig": "base",
    "PruningStrategy": "base",
    "as_batch": "base",
    "check_sparsity": "base",
    "copy_model": "base",
    "resolve_loss": "base",
    "scores_to_masks": "masks",
    "prunable_names": "masks",
    "mask_sparsity": "masks",
    "kept_fraction": "masks",
    "apply_masks": "apply",
    "export_to_torch_prune": "apply",
    "prune_global_by_scores": "apply",
    "masks_from_torch_prune": "apply",
    "remove_torch_prune": "apply",
    "save_pruned": "apply",
    "load_pruned": "apply",
    "get_strategy": "harness",
    "evaluate_pruned": "harness",
    "run_pruning_benchmark": "harness",
    "PruningBenchmarkResult": "harness",
    "run_digits_benchmark": "digits",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
