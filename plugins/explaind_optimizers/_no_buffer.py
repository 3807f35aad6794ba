"""Shared base of the adapters whose optimizer keeps no momentum buffer: Adagrad, ASGD, Adadelta and Rprop.

Their updates are ``a = 0``, ``b = 1`` (docs/maths.md §3): ``m_{-1}`` never enters an update, so a recording that
opens on held state (a restored checkpoint, unrecorded steps) needs no start buffer, and whatever state the
optimizer keeps (step sizes, running means) is read from the live optimizer at each step. The base validates the
optimizer the same way for all of them (options outside the recurrence, tensor hyperparameters, complex parameters,
sparse gradients, a fused kernel under a ``GradScaler``) and snapshots the groups before each step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ._common import (
    DIFFERENTIABLE_RULE,
    GroupSnapshot,
    OptionRule,
    check_amp_scaling,
    checked_config,
    collect_group_problems,
    raise_problems,
    snapshot_groups,
    sparse_problems,
)

__all__ = ["NO_BUFFER_RULES", "NoBufferAdapter"]

#: ``differentiable=True`` and ``capturable=True`` refused.
NO_BUFFER_RULES = (
    DIFFERENTIABLE_RULE,
    OptionRule(
        key="capturable",
        allowed=(False,),
        reason="the capturable path is for CUDA graphs, which cannot record per-step coefficients",
        fix="build the optimizer with capturable=False",
    ),
)


class NoBufferAdapter:
    """Base of an adapter without a momentum buffer (subclasses set the class attributes and ``after_step``).

    Attributes
    ----------
    rules : tuple of OptionRule
        Options with a restricted set of values (default: ``differentiable`` and ``capturable`` off).
    float_keys : tuple of str
        Group hyperparameters that must be Python floats.
    complex_why : str
        How the optimizer treats a complex parameter's two parts (the refusal's reason).
    """

    name: ClassVar[str]
    optimizer_class: ClassVar[type[torch.optim.Optimizer]]
    config_model: ClassVar[type]
    group_model: ClassVar[type]
    rules: ClassVar[tuple[OptionRule, ...]] = NO_BUFFER_RULES
    float_keys: ClassVar[tuple[str, ...]]
    complex_why: ClassVar[str]

    def __init__(self, config: Any):
        self._config = config

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> NoBufferAdapter:
        """Validate ``optimizer`` and snapshot its hyperparameters.

        Raises
        ------
        explaind.exceptions.ConfigError
            Listing every option the recurrence cannot express (outside :attr:`rules`, tensor hyperparameters,
            complex parameters, a different class).
        """
        return cls(checked_config(cls, optimizer, cls.rules, cls.float_keys, cls.complex_why))

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters at construction, as JSON-ready data validated by the adapter's config model."""
        return self._config.model_dump(mode="json")

    def start_state(self, optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
        r"""No start buffer: without momentum (``a = 0``) :math:`m_{-1}` never enters an update.

        The optimizer's other state is read from the live optimizer at each step (docs/maths.md §4, "Optimizer
        state at the start").
        """
        return {}

    def checked_groups(self, optimizer: torch.optim.Optimizer) -> list[GroupSnapshot]:
        """Refuse what the recurrence cannot express at this step, then snapshot every group (schedulers and hand
        edits may change the hyperparameters between steps)."""
        check_amp_scaling(self.name, optimizer)
        raise_problems(self.name, optimizer, collect_group_problems(optimizer, self.rules, self.float_keys)
                       + sparse_problems(optimizer))
        return snapshot_groups(optimizer)
