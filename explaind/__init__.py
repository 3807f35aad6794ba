"""explaind: exact path-kernel replicas and additive influence scores for recorded training runs.

Importing the package is cheap: it touches no CUDA device, scans no entry points and imports no
plugin. Registries load on the first look-up (:func:`get_plugins`, :func:`get_entry`), and the
heavier public names below are imported on first attribute access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from . import exceptions
from .hookspecs import hookimpl

__version__ = "0.1.0"


def _lazy_exports(package: str, exports: Mapping[str, str],
                  namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` (PEP 562) that import public names on first access.

    The one lazy-export helper of explaind: this package and its subpackages (``explaind.pruning``,
    ``explaind.testing``, ...) use it. It lives here, not in a module of its own, so that
    ``import explaind`` loads no module beyond :mod:`explaind.exceptions` and :mod:`explaind.hookspecs`.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    exports : mapping of str to str
        Each public name -> the submodule (relative to ``package``, dotted) that defines it under
        the same name.
    namespace : dict
        The package's ``globals()``; the first access caches the value there.

    Returns
    -------
    __getattr__, __dir__ : callable
        To assign at module level. ``__getattr__`` raises ``AttributeError`` naming the package for
        an unknown name.
    """

    def __getattr__(name: str) -> Any:
        try:
            submodule = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


#: public name -> submodule of ``explaind`` defining it
_EXPORTS: dict[str, str] = {
    "get_plugins": "plugins",
    "get_entry": "plugins",
    "list_entries": "plugins",
    "register_plugin": "plugins",
    "build_model": "models",
    "reset_plugins": "plugins",
    "LinearUpdate": "recurrence",
    "OptimizerAdapterRecord": "records",
    "ArchitectureRecord": "records",
    "LossRecord": "records",
    "batch_coupled_loss": "losses",
    "PruningStrategyRecord": "records",
    "Trajectory": "trajectory",
    "TrajectoryRecorder": "trajectory",
    "KernelReplica": "estimators",
    "InfluenceEstimator": "estimators",
    "CounterfactualEstimator": "estimators",
    "Attribution": "kernel.attribution",
}

__all__ = ["__version__", "exceptions", "hookimpl", *sorted(_EXPORTS)]

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
