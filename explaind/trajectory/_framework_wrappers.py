"""The torch model and optimizer inside the wrappers of Lightning Fabric and Hugging Face accelerate.

``fabric.setup(model, optimizer)`` returns a ``_FabricModule`` and a ``Fabric<Optimizer>`` (a class made on the
fly that subclasses the wrapped optimizer's class); ``accelerator.prepare(...)`` returns an
``AcceleratedOptimizer`` (and, in one process, the model itself). Both wrappers step the optimizer they wrap,
whose hooks the recorder uses, and the adapters are matched by the exact optimizer class, so the recorder records
the wrapped objects: :func:`framework_originals` returns them. The wrappers are recognised by their class names
and modules, so neither framework is imported here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["framework_originals"]

#: (module, class name) of the wrappers whose wrapped object is the attribute named: optimizers, then models.
_OPTIMIZER_WRAPPERS = {("lightning.fabric.wrappers", "_FabricOptimizer"): "optimizer",
                       ("lightning_fabric.wrappers", "_FabricOptimizer"): "optimizer",
                       ("accelerate.optimizer", "AcceleratedOptimizer"): "optimizer"}
_MODEL_WRAPPERS = {("lightning.fabric.wrappers", "_FabricModule"): "module",
                   ("lightning_fabric.wrappers", "_FabricModule"): "module"}


def _wrapped(obj: Any, wrappers: dict[tuple[str, str], str]) -> Any:
    """The object inside ``obj`` when one of its classes is a wrapper of ``wrappers``; ``obj`` otherwise."""
    for cls in type(obj).__mro__:
        attribute = wrappers.get((cls.__module__, cls.__name__))
        if attribute is not None:
            return _wrapped(getattr(obj, attribute), wrappers)
    return obj


def framework_originals(model: Any, optimizer: Any) -> tuple[Any, Any]:
    """``(model, optimizer)`` with Fabric's and accelerate's wrappers replaced by the objects they wrap.

    Parameters
    ----------
    model : nn.Module
        The model, or the ``_FabricModule`` that ``fabric.setup`` returned.
    optimizer : torch.optim.Optimizer
        The optimizer, or the wrapper that ``fabric.setup`` or ``accelerator.prepare`` returned.

    Returns
    -------
    tuple
        The torch model and optimizer the loop trains through the wrappers.
    """
    return _wrapped(model, _MODEL_WRAPPERS), _wrapped(optimizer, _OPTIMIZER_WRAPPERS)
