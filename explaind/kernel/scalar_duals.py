r"""Arithmetic between a forward-mode dual tensor and a Python number, split into its primal and tangent.

In forward mode (:mod:`torch.autograd.forward_ad`) an operation between a tensor with a tangent and a Python
number (``x * math.sqrt(d)``, ``s / math.sqrt(d_head)``, ``0 + x``) takes a slow path of torch: the number is
a tensor without a tangent, and torch runs a Python meta kernel for the missing tangent on every call,
a few hundred microseconds whatever the tensor's size. The layer-factored rows
(:meth:`~explaind.kernel.layers.LayerEvaluator.slopes`) evaluate a model once per refinement level of the
adaptive rule, so a model with such operations pays that cost at every level (``docs/engine.md`` section 7,
*where the adaptive rule's time goes*). :class:`ScalarDuals` computes these operations as the primal operation
and the tangent's own linear one (:math:`\dot x` for :math:`x \pm c`, :math:`c\,\dot x` for :math:`c x`,
:math:`\dot x / c` for :math:`x / c`): the values torch's slow path forms, bit for bit (it adds the number's zero
tangent), and rebuilds the dual tensor. Every other operation, and ``c / x``, ``c - x`` or a call with keywords
(``alpha=``), is torch's own.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

__all__ = ["ScalarDuals", "without_scalar_duals"]


def _tangent_same(x: Tensor, t: Tensor, c: Any) -> Tensor:
    return t


def _tangent_mul(x: Tensor, t: Tensor, c: Any) -> Tensor:
    return t * c


def _tangent_div(x: Tensor, t: Tensor, c: Any) -> Tensor:
    return t / c


#: torch function -> (tensor first: tangent rule, number first: tangent rule or ``None`` (torch's own))
_RULES: dict[Any, tuple[Callable[..., Tensor], Callable[..., Tensor] | None]] = {}
for _f in (Tensor.__add__, Tensor.__radd__, Tensor.add, torch.add):
    _RULES[_f] = (_tangent_same, _tangent_same)
for _f in (Tensor.__sub__, Tensor.sub, torch.sub):  # ``number - x`` (``__rsub__``) is fast in torch already
    _RULES[_f] = (_tangent_same, None)
for _f in (Tensor.__mul__, Tensor.__rmul__, Tensor.mul, torch.mul):
    _RULES[_f] = (_tangent_mul, _tangent_mul)
for _f in (Tensor.__truediv__, Tensor.div, torch.div, torch.true_divide, Tensor.true_divide):
    _RULES[_f] = (_tangent_div, None)


def _number(v: Any) -> bool:
    """A real Python number (``bool`` excluded: it is promoted as no float is)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class ScalarDuals(TorchFunctionMode):
    """Inside the block (and a ``forward_ad.dual_level``), ``+ - * /`` between a dual tensor and a Python number
    run as two plain operations, on the primal and on the tangent (see the module docstring).

    Examples
    --------
    >>> import torch.autograd.forward_ad as fwad
    >>> with fwad.dual_level(), ScalarDuals():
    ...     x = fwad.make_dual(torch.tensor([1.0, 2.0]), torch.tensor([1.0, -1.0]))
    ...     y = fwad.unpack_dual(x * 3.0 + 1)
    >>> y.primal.tolist(), y.tangent.tolist()
    ([4.0, 7.0], [3.0, -3.0])
    """

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        rules = _RULES.get(func)
        if rules is None or kwargs or len(args) != 2:
            return func(*args, **(kwargs or {}))
        a, b = args
        if isinstance(a, Tensor) and _number(b):
            x, c, rule = a, b, rules[0]
        elif isinstance(b, Tensor) and _number(a):
            x, c, rule = b, a, rules[1]
        else:
            return func(*args)
        primal, tangent = fwad.unpack_dual(x)
        if rule is None or tangent is None or not x.is_floating_point():
            return func(*args)
        value = func(primal, c) if x is a else func(c, primal)
        return fwad.make_dual(value, rule(primal, tangent, c))


def without_scalar_duals(*tensors: Any) -> contextlib.AbstractContextManager:
    """A block in which torch's functions skip :class:`ScalarDuals` (a layer rule's own arithmetic, all tensors).

    The mode costs a Python call on every torch function run inside it, several hundred per evaluation in
    the layer hooks alone, which have no Python numbers to split. Torch functions are run directly
    (``torch._C.DisableTorchFunction``) only where that changes nothing else: every active mode is a
    :class:`ScalarDuals` and ``tensors`` (the hook's inputs) are plain tensors, not subclasses; otherwise the
    block is a no-op.
    """
    modes = _get_current_function_mode_stack()
    if modes and all(isinstance(m, ScalarDuals) for m in modes) and all(type(t) is Tensor for t in tensors):
        return torch._C.DisableTorchFunction()
    return contextlib.nullcontext()
