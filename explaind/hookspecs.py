"""Hook specifications of the ``explaind`` plugin system (pluggy).

Plugins implement these hooks with the :data:`hookimpl` marker. Registration hooks take no
arguments and return a list of frozen records (:mod:`explaind.records`); the registry collects
them from every loaded plugin. Every hook is documented in ``docs/hooks.md``; a test fails when
one is missing there.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT_NAME = "explaind"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marker for hook implementations; re-exported as ``explaind.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def explaind_optimizer_adapters() -> list[Any]:
    """Register optimizer adapters.

    Returns
    -------
    list of OptimizerAdapterRecord
        Each record names the torch optimizer classes it handles.
    """


@hookspec
def explaind_architectures() -> list[Any]:
    """Register model factories.

    Each record's ``parameter_count(config)`` gives the parameter and buffer elements a config
    builds, without allocating them: ``explaind.build_model`` refuses a config over its size limit
    before calling the factory (a spec read from a trajectory store included).

    Returns
    -------
    list of ArchitectureRecord
    """


@hookspec
def explaind_losses() -> list[Any]:
    """Register training losses that can return per-sample values.

    Returns
    -------
    list of LossRecord
    """


@hookspec
def explaind_pruning_strategies() -> list[Any]:
    """Register pruning strategies.

    Returns
    -------
    list of PruningStrategyRecord
    """


@hookspec(firstresult=True)
def explaind_resolve_optimizer_adapter(optimizer: Any) -> Any:
    """Choose the adapter record for a live ``torch.optim.Optimizer``.

    The first non-``None`` result wins. The core's own fallback (registered last, so tried
    after every plugin) matches ``type(optimizer)`` against each record's
    ``optimizer_classes``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer instance the user trains with.

    Returns
    -------
    OptimizerAdapterRecord or None
    """
