r"""Adapter for :class:`torch.optim.AdamW` (decoupled weight decay, AMSGrad).

In torch 2.x :class:`torch.optim.AdamW` is :class:`torch.optim.Adam` with every group's
``decoupled_weight_decay=True``: the parameter is first scaled by ``1 - lr * wd`` and then takes
the Adam step. In the notation of docs/maths.md §3 the coefficients are those of
:mod:`explaind_optimizers.adam` with ``lambda_c = 0`` and ``lambda_d = lr_s * wd``
(the scale factor torch multiplied with, ``1 - fl(1 - lr_s * wd)``), acting on ``theta_s``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from .adam import AdamAdapter, AdamConfig, AdamGroupConfig

__all__ = ["AdamWAdapter", "AdamWConfig"]


class AdamWConfig(AdamConfig):
    """Hyperparameters of a :class:`torch.optim.AdamW` run (every group has ``decoupled_weight_decay``)."""

    param_groups: list[AdamGroupConfig] = Field(
        default_factory=lambda: [AdamGroupConfig(weight_decay=1e-2, decoupled_weight_decay=True)], min_length=1
    )


class AdamWAdapter(AdamAdapter):
    """Express every :class:`torch.optim.AdamW` step as a :class:`~explaind.recurrence.LinearUpdate`."""

    name = "adamw"
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW
    always_decoupled = True
    config_model = AdamWConfig
