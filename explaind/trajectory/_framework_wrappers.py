"""The torch model and optimizer inside the wrappers of Lightning Fabric and Hugging Face accelerate.

``fabric.setup(model, optimizer)`` returns a ``_FabricModule`` and a ``Fabric<Optimizer>`` (a class made on the
fly that subclasses the wrapped optimizer's class); ``accelerator.prepare(...)`` returns an
``AcceleratedOptimizer`` (and, in one process, the model itself). Both wrappers step the optimizer they wrap,
whose hooks the recorder uses, and the adapters are matched by the exact optimizer class, so the recorder records
the wrapped objects: :func:`framework_originals` returns them. The wrappers are recognised by their class names
and modules, so neither framework is imported here. A ``_FabricModule`` of ``Fabric(precision="bf16-true")`` or
``"16-true"`` (half-precision parameters) is refused, as the Lightning callback refuses those precisions.
"""

from __future__ import annotations

from typing import Any

from ..exceptions import ConfigError

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
    refuse_half_precision(model)
    return _wrapped(model, _MODEL_WRAPPERS), _wrapped(optimizer, _OPTIMIZER_WRAPPERS)


def refuse_half_precision(model: Any) -> None:
    """Refuse a Fabric module whose parameters Fabric keeps in bfloat16 or float16 (``precision="bf16-true"``).

    Raises
    ------
    ConfigError
        Naming the precision, the allowed ones and the fix. Before, the recorder's first gradient check failed with
        torch's dtype error (the loop's inputs are converted by Fabric, the recorder's ``train_data`` not).
    """
    if _wrapped(model, _MODEL_WRAPPERS) is model:
        return
    precision = str(getattr(getattr(getattr(model, "_strategy", None), "precision", None), "precision", ""))
    if precision in ("bf16-true", "16-true"):
        raise ConfigError(
            f"Fabric(precision={precision!r}) holds the parameters themselves in "
            f"{'bfloat16' if precision.startswith('bf') else 'float16'}: every update is rounded to 8 or 11 "
            f"significant bits, which no decomposition of the steps over samples reproduces (and Fabric converts the "
            f"loop's inputs, not the recorder's train_data). Allowed: '64-true' (with torch's default dtype float64), "
            f"'32-true', 'bf16-mixed' (autocast with float32 weights, recorded with the autocast tolerance). Fix: "
            f"Fabric(precision='bf16-mixed'), or '32-true' with the model built in float64 for float64 exactness."
        )
