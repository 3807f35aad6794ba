"""First-party explaind plugin: optimizer adapters (uses only the public API of explaind).

Registers ``sgd``, ``adam`` and ``adamw`` for :class:`torch.optim.SGD`, :class:`torch.optim.Adam`
and :class:`torch.optim.AdamW`, ``rmsprop`` and ``adagrad`` for :class:`torch.optim.RMSprop` and
:class:`torch.optim.Adagrad`, and ``nadam``, ``radam`` and ``adamax`` for :class:`torch.optim.NAdam`,
:class:`torch.optim.RAdam` and :class:`torch.optim.Adamax`, and ``asgd``, ``adadelta`` and ``rprop`` for
:class:`torch.optim.ASGD`, :class:`torch.optim.Adadelta` and :class:`torch.optim.Rprop` (exact class match). The
coefficient table is in ``docs/optimizers.md``.
"""

from __future__ import annotations

import torch

import explaind
from explaind.records import OptimizerAdapterRecord

from .adadelta import AdadeltaAdapter, AdadeltaConfig
from .adafactor import AdafactorAdapter, AdafactorConfig
from .adagrad import AdagradAdapter, AdagradConfig
from .adam import AdamAdapter, AdamConfig
from .adamax import AdamaxAdapter, AdamaxConfig
from .adamw import AdamWAdapter, AdamWConfig
from .asgd import ASGDAdapter, ASGDConfig
from .hf_adafactor import HANDLED, HFAdafactorAdapter, HFAdafactorConfig
from .nadam import NAdamAdapter, NAdamConfig
from .pure import adam_update_fn, sgd_update_fn
from .pure_adadelta import adadelta_update_fn
from .pure_adafactor import adafactor_update_fn, hf_adafactor_update_fn
from .pure_adam_family import adamax_update_fn, nadam_update_fn, radam_update_fn
from .pure_more import adagrad_update_fn, rmsprop_update_fn
from .radam import RAdamAdapter, RAdamConfig
from .rmsprop import RMSpropAdapter, RMSpropConfig
from .rprop import RpropAdapter, RpropConfig
from .sgd import SGDAdapter, SGDConfig

__all__ = ["ASGDAdapter", "AdadeltaAdapter", "AdafactorAdapter", "AdagradAdapter", "AdamAdapter", "AdamWAdapter",
           "AdamaxAdapter", "HFAdafactorAdapter", "NAdamAdapter", "RAdamAdapter", "RMSpropAdapter", "RpropAdapter",
           "SGDAdapter", "explaind_optimizer_adapters"]


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
        OptimizerAdapterRecord(
            name="nadam",
            implementation=NAdamAdapter,
            config=NAdamConfig,
            description="torch.optim.NAdam: momentum decay, L2 or decoupled weight decay, maximize (diagonal P, "
            "scalar q and n).",
            optimizer_classes=(torch.optim.NAdam,),
            update_fn=nadam_update_fn,
        ),
        OptimizerAdapterRecord(
            name="radam",
            implementation=RAdamAdapter,
            config=RAdamConfig,
            description="torch.optim.RAdam: rectification (rho_t <= 5: momentum step), L2 or decoupled weight "
            "decay, maximize.",
            optimizer_classes=(torch.optim.RAdam,),
            update_fn=radam_update_fn,
        ),
        OptimizerAdapterRecord(
            name="adamax",
            implementation=AdamaxAdapter,
            config=AdamaxConfig,
            description="torch.optim.Adamax: infinity-norm denominator as a diagonal P, L2 weight decay, maximize.",
            optimizer_classes=(torch.optim.Adamax,),
            update_fn=adamax_update_fn,
        ),
        OptimizerAdapterRecord(
            name="adadelta",
            implementation=AdadeltaAdapter,
            config=AdadeltaConfig,
            description="torch.optim.Adadelta: running averages of squared gradients and updates as a diagonal P, "
            "L2 weight decay, maximize.",
            optimizer_classes=(torch.optim.Adadelta,),
            update_fn=adadelta_update_fn,
        ),
        OptimizerAdapterRecord(
            name="rprop",
            implementation=RpropAdapter,
            config=RpropConfig,
            description="torch.optim.Rprop: per-entry step sizes moved by sign, as the diagonal P = step_size / |g| "
            "(0 where the sign flipped), maximize.",
            optimizer_classes=(torch.optim.Rprop,),
        ),
        OptimizerAdapterRecord(
            name="asgd",
            implementation=ASGDAdapter,
            config=ASGDConfig,
            description="torch.optim.ASGD: decaying step size eta, decay term lambd, L2 weight decay, maximize "
            "(explains the iterate, not the average ax).",
            optimizer_classes=(torch.optim.ASGD,),
            update_fn=sgd_update_fn,  # its coefficients do not depend on the gradient: the linear update is its own
        ),
        OptimizerAdapterRecord(
            name="adafactor",
            implementation=AdafactorAdapter,
            config=AdafactorConfig,
            description="torch.optim.Adafactor: factored second moment, relative step size, update clipping, "
            "decoupled weight decay, maximize (diagonal P).",
            optimizer_classes=(torch.optim.Adafactor,),
            update_fn=adafactor_update_fn,
        ),
        OptimizerAdapterRecord(
            name="hf_adafactor",
            implementation=HFAdafactorAdapter,
            config=HFAdafactorConfig,
            description="transformers' Adafactor (TrainingArguments(optim='adafactor')): factored second moment, "
            "relative step, parameter scaling, clipping, first moment, decoupled weight decay (diagonal P).",
            optimizer_class_names=(".".join(HANDLED),),
            update_fn=hf_adafactor_update_fn,
        ),
    ]
