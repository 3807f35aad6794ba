"""explaind: exact path-kernel replicas and additive influence scores for recorded training runs.

Importing the package is cheap: it touches no CUDA device, scans no entry points and imports no
plugin. Registries load on the first look-up (:func:`get_plugins`, :func:`get_entry`), and the
heavier public names below are imported on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import exceptions
from .hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY: dict[str, tuple[str, str]] = {
    "get_plugins": ("explaind.plugins", "get_plugins"),
    "get_entry": ("explaind.plugins", "get_entry"),
    "list_entries": ("explaind.plugins", "list_entries"),
    "register_plugin": ("explaind.plugins", "register_plugin"),
    "build_model": ("explaind.models", "build_model"),
    "reset_plugins": ("explaind.plugins", "reset_plugins"),
    "LinearUpdate": ("explaind.recurrence", "LinearUpdate"),
    "OptimizerAdapterRecord": ("explaind.records", "OptimizerAdapterRecord"),
    "ArchitectureRecord": ("explaind.records", "ArchitectureRecord"),
    "LossRecord": ("explaind.records", "LossRecord"),
    "PruningStrategyRecord": ("explaind.records", "PruningStrategyRecord"),
    "Trajectory": ("explaind.trajectory", "Trajectory"),
    "TrajectoryRecorder": ("explaind.trajectory", "TrajectoryRecorder"),
    "KernelReplica": ("explaind.estimators", "KernelReplica"),
    "InfluenceEstimator": ("explaind.estimators", "InfluenceEstimator"),
    "Attribution": ("explaind.kernel.attribution", "Attribution"),
}

__all__ = ["__version__", "exceptions", "hookimpl", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'explaind' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
