"""scikit-learn style estimators over recorded trajectories."""

from __future__ import annotations

from .. import _lazy_exports

_EXPORTS = {"KernelReplica": "replica", "InfluenceEstimator": "influence", "CounterfactualEstimator": "counterfactual"}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
