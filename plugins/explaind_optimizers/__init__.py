"""First-party explaind plugin: optimizer adapters (uses only the public API of explaind).

Registers ``sgd``, ``adam`` and ``adamw`` for :class:`torch.optim.SGD`, :class:`torch.optim.Adam`
and :class:`torch.optim.AdamW`, ``rmsprop`` and ``adagrad`` for :class:`torch.optim.RMSprop` and
:class:`torch.optim.Adagrad` (exact class match). The coefficient table is in
``docs/optimizers.md``.
"""

from __future__ import annotations

import torch

import explaind
from explaind.records import OptimizerAdapterRecord

from .adagrad import AdagradAdapter, AdagradConfig
from .adam import AdamAdapter, AdamConfig
from .adamw import AdamWAdapter, AdamWConfig
from .pure import adam_update_fn, sgd_update_fn
from .pure_more import adagrad_update_fn, rmsprop_update_fn
from .rmsprop import RMSpropAdapter, RMSpropConfig
from .sgd import SGDAdapter, SGDConfig

__all__ = ["AdagradAdapter", "AdamAdapter", "AdamWAdapter", "RMSpropAdapter", "SGDAdapter",
           "explaind_optimizer_adapters"]


@explaind.hookimpl
def explaind_optimizer_adapters() -> list[OptimizerAdapterRecord]:
    """The built-in optimizer adapters."""
    return [
        OptimizerAdapterRecord(
            name="sgd",
            implementation=SGDAdapter,
            config=SGDConfig,
            description="torch.optim.SGD: momentum, dampening, Nesterov, L2 weight decay, maximize.",
            optimizer_classes=(torch.optim.SGD,),
            update_fn=sgd_update_fn,
        ),
        OptimizerAdapterRecord(
            name="adam",
            implementation=AdamAdapter,
            config=AdamConfig,
            description="torch.optim.Adam: L2 or decoupled weight decay, AMSGrad, maximize (diagonal P).",
            optimizer_classes=(torch.optim.Adam,),
            update_fn=adam_update_fn,
        ),
        OptimizerAdapterRecord(
            name="adamw",
            implementation=AdamWAdapter,
            config=AdamWConfig,
            description="torch.optim.AdamW: decoupled weight decay lambda_d = lr * wd, AMSGrad (diagonal P).",
            optimizer_classes=(torch.optim.AdamW,),
            update_fn=adam_update_fn,
        ),
        OptimizerAdapterRecord(
            name="rmsprop",
            implementation=RMSpropAdapter,
            config=RMSpropConfig,
            description="torch.optim.RMSprop: momentum (tensor gain 1/d), centered, L2 weight decay, maximize "
            "(diagonal P).",
            optimizer_classes=(torch.optim.RMSprop,),
            update_fn=rmsprop_update_fn,
        ),
        OptimizerAdapterRecord(
            name="adagrad",
            implementation=AdagradAdapter,
            config=AdagradConfig,
            description="torch.optim.Adagrad: lr_decay, initial accumulator, L2 weight decay, maximize (diagonal P).",
            optimizer_classes=(torch.optim.Adagrad,),
            update_fn=adagrad_update_fn,
        ),
    ]
