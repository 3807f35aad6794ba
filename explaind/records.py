"""Frozen records returned by the registration hooks.

A plugin registers an entry by returning one of these records from the matching hook
(see :mod:`explaind.hookspecs`). Records are immutable; the registry validates them when a
plugin is loaded, so a malformed plugin fails loudly with its name in the message.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

__all__ = [
    "OptimizerAdapterRecord",
    "ArchitectureRecord",
    "LossRecord",
    "PruningStrategyRecord",
    "KIND_NAMES",
    "RECORD_TYPES",
    "NAME_PATTERN",
]

#: Entry names: lower case, digits, ``_`` and ``-``; starting with a letter.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")


class _EmptyConfig(BaseModel):
    model_config = {"extra": "forbid", "frozen": True}


@dataclass(frozen=True)
class OptimizerAdapterRecord:
    """An optimizer adapter: expresses each update of a torch optimizer as a linear recurrence.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"adamw"``.
    implementation : type
        Class with ``from_optimizer(optimizer)`` returning an adapter instance (see
        :class:`explaind.recurrence.OptimizerAdapter`).
    config : type[pydantic.BaseModel]
        Hyperparameter model of the adapter (stored in trajectory manifests).
    description : str
        One sentence for listings.
    optimizer_classes : tuple[type, ...]
        The ``torch.optim.Optimizer`` classes this adapter handles (exact class match).
    optimizer_class_names : tuple[str, ...]
        Classes this adapter handles, named ``"module.QualifiedName"`` (exact match of an optimizer's
        ``type(optimizer).__module__`` and ``__qualname__``): for an optimizer of an optional dependency, which the
        plugin then need not import to register (``transformers.optimization.Adafactor``). explaind imports such a
        module only where it needs the class itself (replaying a sparse store, the conformance suites), and only
        for names a registered record lists (:func:`explaind.plugins.adapter_optimizer_classes`).
    update_fn : callable, optional
        ``update_fn(hyperparameters) -> PureUpdate``: the optimizer's update as a pure,
        differentiable function of the state and the gradient (:class:`explaind.recurrence.PureUpdate`),
        given the adapter's ``hyperparameters()`` as stored in the trajectory manifest. Needed by
        :class:`explaind.CounterfactualEstimator` (docs/maths.md §9); it raises
        :class:`~explaind.exceptions.ConfigError` for runs it cannot express. ``None``: the
        adapter offers no pure update and counterfactual queries are refused.
    """

    name: str
    implementation: type
    config: type[BaseModel]
    description: str
    optimizer_classes: tuple[type, ...] = ()
    optimizer_class_names: tuple[str, ...] = ()
    update_fn: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class ArchitectureRecord:
    """A model factory: ``implementation(config, seed=...) -> torch.nn.Module``.

    Attributes
    ----------
    example_input : callable
        ``example_input(config, n, generator) -> (inputs, targets)`` producing a small batch the
        conformance suite feeds the model.
    loss : str
        Name of the loss the architecture is usually trained with.
    parameter_count : callable, optional
        ``parameter_count(config) -> int``: the number of parameter and buffer elements
        ``implementation(config)`` allocates, computed without allocating them (e.g. by building
        the module under ``torch.device("meta")``). ``explaind.build_model`` checks it against the
        size limit before building, so a config from a stranger's store cannot allocate
        unbounded memory; without it the size is checked only after building. The conformance
        suite requires it and compares it with the built model.
    """

    name: str
    implementation: Callable[..., Any]
    config: type[BaseModel]
    description: str
    example_input: Callable[..., Any] | None = None
    loss: str = "cross_entropy"
    parameter_count: Callable[[Any], int] | None = None


@dataclass(frozen=True)
class LossRecord:
    r"""A training loss.

    ``implementation(outputs, targets)`` returns per-sample losses of shape ``(n,)``; the
    training loss is their mean (the reduction ``mean`` of torch), so sample weights
    ``w_k = 1/|B|`` reproduce it — or, for a loss with ``counts``, their count-weighted mean.

    Attributes
    ----------
    example : callable, optional
        ``example(n, generator) -> (outputs, targets)``: a small batch in the format the loss
        expects; the conformance suite (:mod:`explaind.testing`) requires it.
    reference : callable, optional
        ``reference(outputs, targets) -> scalar``: the batch loss as the reference library computes
        it (e.g. ``torch.nn.functional.mse_loss``); the suite checks that the mean of the
        per-sample losses equals it.
    counts : callable, optional
        ``counts(targets) -> (n,)``: how many terms each sample adds to a batch loss that averages
        over terms rather than samples (e.g. the non-ignored tokens of a token loss). The batch
        loss is then :math:`\sum_k n_k \ell_k / \sum_k n_k`, so the sample weights are
        :math:`w_k = n_k / \sum_j n_j` (docs/maths.md §1); ``None``: every sample counts once.
    batch_coupled : bool
        ``implementation(outputs, targets)`` returns the loss terms :math:`\ell_k` of a loss whose terms read the
        whole batch's outputs (contrastive losses, batch-hard triplets; built by
        :func:`~explaind.losses.batch_coupled_loss`): the terms are taken on each logged micro-batch as a whole,
        never on a sample alone (docs/maths.md, "Batch-coupled losses").
    """

    name: str
    implementation: Callable[..., Any]
    config: type[BaseModel] = _EmptyConfig
    description: str = ""
    example: Callable[..., Any] | None = None
    reference: Callable[..., Any] | None = None
    counts: Callable[..., Any] | None = None
    batch_coupled: bool = False


@dataclass(frozen=True)
class PruningStrategyRecord:
    """A pruning criterion: an estimator class whose ``fit`` scores every parameter coordinate."""

    name: str
    implementation: type
    config: type[BaseModel]
    description: str
    needs_data: bool = True
    needs_trajectory: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


#: kind name -> human readable kind (used in messages)
KIND_NAMES: dict[str, str] = {
    "optimizer_adapter": "optimizer adapter",
    "architecture": "architecture",
    "loss": "loss",
    "pruning_strategy": "pruning strategy",
}

#: kind name -> record type
RECORD_TYPES: dict[str, type] = {
    "optimizer_adapter": OptimizerAdapterRecord,
    "architecture": ArchitectureRecord,
    "loss": LossRecord,
    "pruning_strategy": PruningStrategyRecord,
}
