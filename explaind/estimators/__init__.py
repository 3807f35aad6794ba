"""scikit-learn style estimators over recorded trajectories."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, tuple[str, str]] = {
    "KernelReplica": ("explaind.estimators.replica", "KernelReplica"),
    "InfluenceEstimator": ("explaind.estimators.influence", "InfluenceEstimator"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'explaind.estimators' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
