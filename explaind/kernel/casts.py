r"""Casts in a model's forward that lower floating tensors below the replay dtype: found, and kept at it.

Many models compute part of their forward in a fixed dtype whatever their own: Hugging Face's RMS
norms convert the hidden states to ``torch.float32`` and back, softmax upcasts pass ``dtype=``. In a
float64 replay such a cast rounds :math:`g(\theta_s + t\Delta\theta_s, x)` to about 1e-7 relative, so the
integrand of :math:`\varphi_s(x)\Delta\theta_s` (docs/maths.md §2) is noisy at that level and the
adaptive quadrature cannot reach a smaller tolerance (docs/maths.md, "Casts below the replay dtype").

* :func:`find_casts` runs the forward once on one input, as written, and records every call that
  converts to a floating dtype of lower precision than the replay dtype (``Tensor.to``, ``.float()``,
  ``.half()``, ``.bfloat16()``, ``.type()``, ``.type_as()``, any ``dtype`` argument such as
  ``softmax(..., dtype=torch.float32)``), attributed to the innermost module running (forward pre/post
  hooks), and whether the converted tensor depends on the trainable parameters.
* :class:`KeepReplayDtype` is the ``torch.overrides.TorchFunctionMode`` that evaluates the same calls
  in the replay dtype: every such dtype becomes the replay dtype. The mode acts above the
  dispatcher, so it composes with ``torch.func.jvp``/``vmap``/``grad``/``jacrev`` and forward-mode AD.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["CastSite", "KeepReplayDtype", "find_casts", "lowers", "sites_text"]

#: Methods that convert to a fixed dtype without naming it.
_NAMED_CASTS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}
#: ``Tensor.type`` strings of floating dtypes.
_TYPE_NAMES = {"FloatTensor": torch.float32, "HalfTensor": torch.float16, "BFloat16Tensor": torch.bfloat16,
               "DoubleTensor": torch.float64}
#: Calls whose dtype argument is not a conversion target (a reinterpretation of the bits, a query).
_NOT_CASTS = frozenset({"view", "can_cast", "promote_types", "result_type", "is_floating_point"})


def lowers(dtype: Any, replay: torch.dtype) -> bool:
    """Whether ``dtype`` is a floating dtype of lower precision (larger epsilon) than ``replay``."""
    return (isinstance(dtype, torch.dtype) and dtype.is_floating_point and not dtype.is_complex
            and torch.finfo(dtype).eps > torch.finfo(replay).eps)


def _type_dtype(value: Any) -> Any:
    """The dtype a ``Tensor.type`` argument names (a dtype, or a string such as ``"torch.FloatTensor"``)."""
    if isinstance(value, str):
        return _TYPE_NAMES.get(value.rpartition(".")[2], value)
    return value


def _targets(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], replay: torch.dtype) -> list[tuple[str, Any]]:
    """The lowering dtypes one call converts to: ``(where, dtype)`` with ``where`` a position, a keyword or ``""``.

    ``""`` is a conversion the call implies (``.float()``) or one given by another tensor (``.to(other)``,
    ``.type_as(other)``, at position 1).
    """
    name = getattr(func, "__name__", "")
    if name in _NOT_CASTS:
        return []
    self_is_tensor = bool(args) and isinstance(args[0], Tensor)
    if name in _NAMED_CASTS and self_is_tensor and len(args) == 1:
        return [("", _NAMED_CASTS[name])] if lowers(_NAMED_CASTS[name], replay) else []
    found = []
    if name in ("to", "type_as") and self_is_tensor and len(args) > 1 and isinstance(args[1], Tensor):
        if args[1].is_floating_point() and lowers(args[1].dtype, replay):
            found.append(("other", args[1].dtype))
    for i, value in enumerate(args):
        value = _type_dtype(value) if name == "type" else value
        if lowers(value, replay):
            found.append((str(i), value))
    for key, value in kwargs.items():
        value = _type_dtype(value) if name == "type" else value
        if lowers(value, replay):
            found.append((key, value))
    return found


def _promote(args: tuple[Any, ...], kwargs: dict[str, Any], targets: list[tuple[str, Any]],
             replay: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args``/``kwargs`` with every lowering dtype of ``targets`` replaced by ``replay``."""
    args, kwargs = list(args), dict(kwargs)
    for where, _ in targets:
        if where == "other":  # .to(other) / .type_as(other): the replay dtype on other's device
            args[1] = args[1].to(replay) if args[1].is_floating_point() else args[1]
        elif where.isdigit():
            args[int(where)] = replay
        else:
            kwargs[where] = replay
    return tuple(args), kwargs


class KeepReplayDtype(TorchFunctionMode):
    """Inside the block, conversions below ``replay`` convert to ``replay`` (see the module docstring).

    Parameters
    ----------
    replay : torch.dtype
        The replay (compute) dtype.
    record : callable, optional
        Called as ``record(func, args, targets)`` for each lowering call instead of changing it: the
        call then runs as written (what :func:`find_casts` uses).
    """

    def __init__(self, replay: torch.dtype, record: Callable[[Any, tuple[Any, ...], list[Any]], None] | None = None):
        super().__init__()
        self.replay = replay
        self.record = record

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        targets = _targets(func, args, kwargs, self.replay)
        if not targets:
            return func(*args, **kwargs)
        if self.record is not None:
            self.record(func, args, targets)
            return func(*args, **kwargs)
        if targets[0][0] == "" and getattr(func, "__name__", "") in _NAMED_CASTS:
            return args[0].to(self.replay)
        args, kwargs = _promote(args, kwargs, targets, self.replay)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class CastSite:
    """Calls of one kind in one module that convert below the replay dtype.

    Attributes
    ----------
    module : str
        Path of the innermost module whose forward made the call (``""``: the root).
    cls : str
        Its class name.
    op : str
        The call (``"Tensor.to"``, ``"softmax"``, ...).
    dtype : str
        The lowering dtype it converts to (``"torch.float32"``).
    moving : bool
        The converted tensor depends on the trainable parameters (its rounding moves along the path;
        a cast of constants or inputs only does not make the integrand noisy).
    count : int
        How many such calls one forward makes there.
    """

    module: str
    cls: str
    op: str
    dtype: str
    moving: bool
    count: int

    def describe(self) -> str:
        """``"model.norm (LlamaRMSNorm): Tensor.to -> float32"`` (``" x2"`` when twice)."""
        times = f" x{self.count}" if self.count > 1 else ""
        return f"{self.module or '<root>'} ({self.cls}): {self.op} -> {self.dtype.removeprefix('torch.')}{times}"


def sites_text(sites: tuple[CastSite, ...], limit: int = 6) -> str:
    """The sites as one line (the first ``limit``, then how many more)."""
    shown = "; ".join(s.describe() for s in sites[:limit])
    return shown + (f"; and {len(sites) - limit} more" if len(sites) > limit else "")


@contextlib.contextmanager
def _module_stack(root: nn.Module) -> Iterator[list[tuple[str, str]]]:
    """The ``(path, class)`` of the modules whose forward is running, innermost last (hooks removed on exit)."""
    stack: list[tuple[str, str]] = [("", type(root).__name__)]
    handles = []

    def enter(path: str) -> Callable[..., None]:
        def pre(module: nn.Module, args: Any) -> None:
            stack.append((path, type(module).__name__))
        return pre

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        if len(stack) > 1:
            stack.pop()

    try:
        for path, module in root.named_modules():
            if path:
                handles.append(module.register_forward_pre_hook(enter(path)))
                handles.append(module.register_forward_hook(leave, always_call=True))
        yield stack
    finally:
        for h in handles:
            h.remove()


def _call_name(func: Any) -> str:
    """``"Tensor.to"``, ``"torch.softmax"``, ``"torch.nn.functional.softmax"``: how the forward spelled the call."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    owner, _, short = name.rpartition(".")
    if owner in ("Tensor", "TensorBase"):
        return f"Tensor.{short}"
    if owner == "_VariableFunctionsClass":
        return f"torch.{short}"
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module and not owner else name


def find_casts(root: nn.Module, forward: Callable[[dict[str, Tensor]], Any], params: dict[str, Tensor],
               trainable: tuple[str, ...], replay: torch.dtype) -> tuple[CastSite, ...]:
    """The calls below ``replay`` that one forward makes, by module and kind (parameter-dependent ones first).

    Parameters
    ----------
    root : nn.Module
        The module ``forward`` runs (its submodules get temporary hooks).
    forward : callable
        ``forward(params)`` runs the model once on one input.
    params : dict
        Parameters and buffers to run at; ``trainable`` ones are made leaves that require grad.
    trainable : tuple of str
        Names of the trainable parameters (a converted tensor that requires grad depends on them).
    replay : torch.dtype
        The replay dtype.
    """
    counts: Counter[tuple[str, str, str, str, bool]] = Counter()
    with _module_stack(root) as stack:
        def record(func: Any, args: tuple[Any, ...], targets: list[Any]) -> None:
            path, cls = stack[-1]
            moving = any(isinstance(a, Tensor) and a.requires_grad for a in args)
            op = _call_name(func)
            for _, dtype in targets:
                counts[(path, cls, op, str(dtype), moving)] += 1

        point = {n: v.detach().requires_grad_(n in trainable and v.is_floating_point()) for n, v in params.items()}
        with torch.enable_grad(), KeepReplayDtype(replay, record=record):
            forward(point)
    sites = [CastSite(*key, count=n) for key, n in counts.items()]
    return tuple(sorted(sites, key=lambda s: (not s.moving, s.module)))
