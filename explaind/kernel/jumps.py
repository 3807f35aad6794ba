r"""Calls in a model's forward whose output can jump as the parameters move: found, so a warning can name them.

The replica integrates :math:`\nabla_\theta g` along each step's segment (docs/maths.md §2). Where the forward is
discontinuous in :math:`\theta` the gradient has no term for the jump, so no quadrature rule integrates across it:
the jump stays in ``quadrature_error``, and the adaptive rule spends evaluations on it to no avail. Modules with a
jump (``nn.Hardshrink``, ``nn.Threshold``, max unpooling, ``nn.Softplus`` with a low ``threshold``) are found by
type (explaind/kernel/planning.py); this module finds the ones computed inside ``forward``:

* rounding and signs: ``torch.sign``, ``round``, ``floor``, ``ceil``, ``trunc``, ``frac``, ``heaviside``, the
  periodic ``torch.remainder``/``fmod`` (``h % 1.0``) and ``floor_divide`` (``h // 1``), and casts to an integer or
  boolean dtype (``h.long()``, ``h.to(torch.int64)``: truncation, used to bucket or index);
* ``F.hardshrink`` and ``F.threshold`` called as functions (their modules are found by type);
* angles, ``torch.atan2(y, x)`` and ``torch.angle``: :math:`\pm\pi` on either side of the negative x axis, so a pair
  ``(x, y)`` that crosses it jumps by :math:`2\pi` (polar features of hidden units);
* selections: ``argmax``/``argmin``, the indices of ``topk`` and ``sort``, and those of ``torch.max(h, dim)`` (``min``,
  ``kthvalue``, ``mode``, ``median``) when a later call reads them, used to gather (a route that switches, as
  in top-k mixture-of-experts gating), ``F.gumbel_softmax(hard=True)``;
* comparisons (``h > 0``, ``torch.where`` conditions, masks);
* ``F.softplus`` with a ``threshold`` low enough that its switch to the identity jumps by more than
  :data:`SOFTPLUS_JUMP` (``log(1 + exp(-threshold)) / beta``);
* logarithms of determinants, ``torch.slogdet``/``logdet`` (:data:`SINGULAR`): :math:`\log|\det W|` is
  :math:`-\infty` where ``W`` turns singular, so a segment along which the determinant changes sign (a normalizing
  flow's mixing matrix under a large step) has no finite path integral; :func:`singular_sites` picks them out;
* stops of the gradient, ``Tensor.detach`` and ``Tensor.data`` (:data:`STOPS`): the output moves with the detached
  tensor while the path derivative does not (a weight divided by its detached norm), so no integral of the gradient
  reproduces that part of the change either; :func:`stop_sites` picks them out, for their own hint;
* calls on a parameter-dependent tensor with the gradient switched off (:data:`NO_GRAD`: a ``torch.no_grad()`` or
  ``torch.set_grad_enabled(False)`` block, a function decorated with ``@torch.no_grad()``; :data:`INFERENCE`:
  ``torch.inference_mode()``), which leave no call to name, so the site is the line of the user's code that made
  the call (the first frame outside torch and explaind's engine: ``"<root> (Net): Tensor.norm under no_grad
  (Net.forward, net.py:12)"``); :func:`grad_off_sites` picks them out. The two differ for the engine
  (docs/maths.md, "Stop-gradients inside the forward"): forward-mode derivatives run through ``no_grad`` (the
  replica and the JVP path of :class:`~explaind.InfluenceEstimator` are exact), reverse-mode Jacobians stop there
  as the training gradient did; ``inference_mode`` stops both, like ``.detach()``. A ``torch.enable_grad()`` block
  nested inside turns the gradient on again and is no site. Inside the ``forward`` of a custom
  ``torch.autograd.Function`` (run by torch with the gradient off) the site is named as that Function's
  (:func:`function_sites`): forward-mode derivatives follow its ``jvp``, reverse-mode ones its ``backward``, and a
  backward that is not the derivative of the forward (a gradient reversal layer) makes the two differ;
* calls torch gives no derivative at all (:data:`NO_DERIVATIVE`): a floating output that does not require grad
  although a tensor argument does, with the gradient on (``torch.special.bessel_j0``, ``modified_bessel_k0``,
  ``airy_ai``, the orthogonal polynomials, ``torch.histc``): a silent stop of the gradient, both in training and in
  the path derivatives, named with the stops by :func:`stop_sites`;
* gradient hooks registered in ``forward``, ``Tensor.register_hook`` (:data:`HOOKS`; :func:`hook_sites`): the
  backward, and so the reverse-mode Jacobians, follow a hook that changes gradients (``lambda g: -g``, a gradient
  reversal layer), the output does not.

:func:`find_jumps` runs the forward once on one input under a ``TorchFunctionMode`` that records these calls when
a tensor argument depends on the trainable parameters, attributed to the innermost module running. A straight-
through estimator (``x + (q(x) - x).detach()``) is found too: its ``q`` reads a parameter-dependent tensor.

:func:`watch_jumps` can also list the calls with a *kink* (:data:`KINKED_CALLS`: ``F.relu``, ``F.leaky_relu``,
``clamp``, ``torch.maximum``, ``abs``, ``F.max_pool2d``, ...) applied to parameter-dependent tensors: no jump, the
quadrature integrates across them, but each one a path crosses costs the adaptive rule evaluations, so the cost
notices name them (a model written with ``F.relu`` holds no ``nn.ReLU`` module to find by type).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .casts import _call_name, _module_stack

__all__ = ["FUNCTION", "HOOKS", "INFERENCE", "KINKED_CALLS", "NO_DERIVATIVE", "NO_GRAD", "SINGULAR", "SOFTPLUS_JUMP",
           "STOPS", "find_jumps", "function_sites", "grad_off_sites", "hook_sites", "no_derivative_hint",
           "no_derivative_sites", "singular_sites", "softplus_jump", "stop_sites", "watch_jumps"]

#: Calls whose output is piecewise constant in their tensor input (rounding, signs, selections, comparisons).
_JUMPING = frozenset({
    "sign", "sgn", "round", "floor", "ceil", "trunc", "fix", "frac", "heaviside", "argmax", "argmin", "topk", "sort",
    "argsort", "gt", "lt", "ge", "le", "greater", "less", "greater_equal", "less_equal", "__gt__", "__lt__",
    "__ge__", "__le__", "bucketize", "searchsorted", "gumbel_softmax", "remainder", "fmod", "__mod__", "__rmod__",
    "floor_divide", "__floordiv__", "__rfloordiv__", "long", "int", "short", "byte", "char", "bool",
    "atan2", "arctan2", "angle",
})
#: Reductions whose indices jump (recorded when the indices are read: :class:`_Record`).
_INDEXED = frozenset({"max", "min", "kthvalue", "mode", "median", "nanmedian"})
#: Conversions that jump only when they convert to an integer or boolean dtype (``h.to(torch.int64)``).
_CONVERSIONS = frozenset({"to", "type"})
#: ``Tensor.data`` read as a property (its getter is what a ``TorchFunctionMode`` sees), named ``Tensor.data``.
_DATA_GET = torch.Tensor.data.__get__


def _data(*args: Any) -> None:
    """Stands for a read of ``Tensor.data`` (a detached view) in the sites: named ``Tensor.data``."""


_data.__qualname__ = "Tensor.data"
#: Calls that register a gradient hook on a tensor that depends on the parameters (:func:`hook_sites`).
HOOKS = frozenset({"register_hook"})
#: Calls that stop the gradient of a tensor that depends on the parameters (named as :func:`stop_sites` finds them).
STOPS = frozenset({"detach", "detach_", "data"})
#: Calls with a singularity where their matrix argument turns singular (named as :func:`singular_sites` finds them).
SINGULAR = frozenset({"slogdet", "logdet", "linalg_slogdet"})
#: How a call with the gradient switched off is named: ``no_grad``/``set_grad_enabled(False)``, ``inference_mode``.
NO_GRAD, INFERENCE = "under no_grad", "under inference_mode"
#: How a call whose floating output torch gives no derivative (it does not require grad) is named after the call.
NO_DERIVATIVE = " (torch gives it no derivative)"
#: How a site inside the ``forward`` of a custom ``torch.autograd.Function`` begins its user line.
FUNCTION = "custom torch.autograd.Function "
#: torch's file whose ``Function.apply`` calls a custom Function's ``forward``.
_FUNCTION_APPLY = str(Path(torch.autograd.function.__file__))
#: Calls whose result does not read the values of their tensor argument (no stop of a gradient).
_VALUE_FREE = frozenset({"torch.zeros_like", "torch.ones_like", "torch.empty_like", "torch.full_like",
                         "torch.rand_like", "torch.randn_like", "Tensor.new_zeros", "Tensor.new_ones",
                         "Tensor.new_empty", "Tensor.new_full", "Tensor.new_tensor"})
#: Frames skipped when looking for the user's line: torch's and this package's engine (its modes and wrappers).
_LIBRARY = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
#: Calls whose output has a kink in a tensor argument (piecewise smooth, continuous): listed by :func:`watch_jumps`
#: when asked, for the cost notices. ``max``/``min`` are here for their values (a maximum over points is a kink).
KINKED_CALLS = frozenset({
    "relu", "relu_", "leaky_relu", "leaky_relu_", "relu6", "hardtanh", "hardtanh_", "elu", "elu_", "celu", "celu_",
    "selu", "selu_", "prelu", "rrelu", "rrelu_", "hardswish", "hardsigmoid", "softshrink", "clamp", "clamp_", "clip",
    "clip_", "clamp_min", "clamp_max", "maximum", "minimum", "fmax", "fmin", "abs", "abs_", "max", "min", "amax",
    "amin", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
})
#: Smallest jump of ``F.softplus`` at its threshold that is named (float64 rounding is far below).
SOFTPLUS_JUMP = 1e-10


def softplus_jump(beta: float, threshold: float) -> float:
    """The jump of ``softplus(x, beta, threshold)`` where ``beta x`` crosses ``threshold``:
    ``log(1 + exp(-threshold)) / beta``."""
    return math.log1p(math.exp(-threshold)) / beta


def _jumps(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], dependent: bool = False) -> bool:
    """Whether one call can jump in a tensor argument that requires grad (any tensor argument when ``dependent``:
    inside a custom Function's forward, which torch runs with the gradient off, on parameter-dependent inputs)."""
    if not any(isinstance(a, Tensor) and (dependent or a.requires_grad) for a in args):
        return False
    name = getattr(func, "__name__", "")
    if name == "softplus":
        beta = kwargs.get("beta", args[1] if len(args) > 1 else 1.0)
        threshold = kwargs.get("threshold", args[2] if len(args) > 2 else 20.0)
        return softplus_jump(float(beta), float(threshold)) > SOFTPLUS_JUMP
    if name == "gumbel_softmax":
        return bool(kwargs.get("hard", args[2] if len(args) > 2 else False))
    if name == "hardshrink":  # F.hardshrink(x, lambd=0.5): from 0 to +-lambd
        return float(kwargs.get("lambd", args[1] if len(args) > 1 else 0.5)) != 0
    if name in ("threshold", "_threshold"):  # F.threshold(x, threshold, value): from value to threshold
        threshold = kwargs["threshold"] if "threshold" in kwargs else args[1]
        return float(threshold) != float(kwargs["value"] if "value" in kwargs else args[2])
    if name in _CONVERSIONS:
        return any(isinstance(a, torch.dtype) and not a.is_floating_point and not a.is_complex
                   for a in (*args, *kwargs.values()))
    return name in _JUMPING or name in STOPS or name in SINGULAR or name in HOOKS


def _grad_off(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """:data:`NO_GRAD` or :data:`INFERENCE` when the gradient is off and a tensor argument (or one in a list)
    requires grad, else ``""``."""
    if torch.is_grad_enabled():
        return ""
    flat = [*args, *kwargs.values()]
    flat += [t for a in flat if isinstance(a, list | tuple) for t in a]
    if not any(isinstance(a, Tensor) and a.requires_grad for a in flat):
        return ""
    return INFERENCE if torch.is_inference_mode_enabled() else NO_GRAD


def _user_frame() -> Any:
    """The innermost frame outside torch and this package, or ``None``."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY):
        frame = frame.f_back
    return frame


def _in_function(frame: Any) -> bool:
    """Whether ``frame`` is the ``forward`` of a custom ``torch.autograd.Function``, called by torch's
    ``Function.apply``, which runs it with the gradient off."""
    caller = frame.f_back
    return (frame.f_code.co_name == "forward" and caller is not None
            and caller.f_code.co_filename == _FUNCTION_APPLY and caller.f_code.co_name == "apply")


def _user_line(frame: Any) -> str:
    """``"Class.method, file.py:12"`` of ``frame`` (``""`` when ``None``), prefixed by :data:`FUNCTION` when it is the
    ``forward`` of a custom ``torch.autograd.Function``."""
    if frame is None:
        return ""
    prefix = FUNCTION if _in_function(frame) else ""
    return f"{prefix}{frame.f_code.co_qualname}, {frame.f_code.co_filename}:{frame.f_lineno}"


def function_sites(sites: tuple[str, ...] | list[str]) -> list[str]:
    """The sites of :func:`find_jumps` inside the ``forward`` of a custom ``torch.autograd.Function``: its backward,
    which reverse-mode derivatives follow, need not be the derivative of that forward (a gradient reversal layer)."""
    return [site for site in sites if f" {NO_GRAD} ({FUNCTION}" in site]


def grad_off_sites(sites: tuple[str, ...] | list[str], kind: str = NO_GRAD) -> list[str]:
    """The sites of :func:`find_jumps` where a call read a parameter-dependent tensor with the gradient off
    (``kind``: :data:`NO_GRAD` or :data:`INFERENCE`)."""
    return [site for site in sites if f" {kind} (" in site]


def _call_of(site: str) -> str:
    """The bare name of a site's call: ``"path (Class): Tensor.detach x2"`` -> ``"detach"``."""
    return site.rsplit(": ", 1)[-1].split(" x")[0].rsplit(".", 1)[-1]


def stop_sites(sites: tuple[str, ...] | list[str]) -> list[str]:
    """The sites of :func:`find_jumps` that detach a parameter-dependent tensor (``"path (Class): Tensor.detach"``),
    or apply a call torch gives no derivative to one (:func:`no_derivative_sites`)."""
    return [site for site in sites if _call_of(site) in STOPS or NO_DERIVATIVE in site]


def no_derivative_sites(sites: tuple[str, ...] | list[str]) -> list[str]:
    """The sites of :func:`find_jumps` whose call torch gives no derivative (``"path (Class):
    torch.special.special_bessel_j0 (torch gives it no derivative)"``)."""
    return [site for site in sites if NO_DERIVATIVE in site]


def no_derivative_hint(sites: list[str]) -> str:
    """The cause and fix for calls torch gives no derivative (:func:`no_derivative_sites`), for the quadrature
    warnings."""
    return (f"the model's forward applies functions torch gives no derivative to tensors that depend on the "
            f"parameters ({'; '.join(sites[:6])}): their outputs do not require grad, so training's gradient and the "
            f"path derivatives both stop there while the output moves with them, and no quadrature rule reproduces "
            f"that part of the change; it stays in quadrature_error. Fix: compute them from differentiable torch "
            f"operations (an integral or series form; for Bessel functions torch.special.i0, i1, i0e and i1e have "
            f"derivatives) for the run you want explained")


def hook_sites(sites: tuple[str, ...] | list[str]) -> list[str]:
    """The sites of :func:`find_jumps` that register a gradient hook on a parameter-dependent tensor in the forward
    (``"path (Class): Tensor.register_hook"``): the backward, and the reverse-mode derivatives, follow the hook, the
    output and its forward-mode derivatives do not."""
    return [site for site in sites if _call_of(site) in HOOKS]


def singular_sites(sites: tuple[str, ...] | list[str]) -> list[str]:
    """The sites of :func:`find_jumps` that take the log-determinant of a parameter-dependent matrix
    (``"path (Class): torch.slogdet"``)."""
    return [site for site in sites if _call_of(site) in SINGULAR]


def _tensors(values: Any) -> Iterator[Tensor]:
    """The tensors among ``values`` and inside its tuples and lists (one level: indexing takes a tuple)."""
    for v in values:
        if isinstance(v, Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from (t for t in v if isinstance(t, Tensor))


class _Record(TorchFunctionMode):
    """Runs every call unchanged; calls ``record(func, "")`` for one that can jump (:func:`_jumps`) and
    ``record(func, " under no_grad (Class.method, file.py:12)")`` for one that reads a parameter-dependent tensor with
    the gradient off (:func:`_grad_off`) into a floating tensor, made by the user's code (:func:`_user_line`).

    The indices a reduction with ``dim`` returns (``torch.max(h, dim)``, ``min``, ``kthvalue``, ``mode``, ``median``)
    jump where the extreme changes place; their values do not (a max over points is a kink). Such a call is recorded
    only when a later call reads its indices (a gather, an index: a route that switches)."""

    def __init__(self, record: Callable[[Any, str], None], kink: Callable[[Any], None] | None = None) -> None:
        super().__init__()
        self.record, self.kink = record, kink
        self.indices: dict[int, tuple[Tensor, Any]] = {}  # id -> (the indices, kept alive; the call that made them)
        self.functions: list[Any] = []  # frames of custom Function forwards that read a parameter-dependent tensor

    def _dependent(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this call runs in a custom Function's forward that was given a parameter-dependent tensor: its
        own results do not require grad there (torch runs it under no_grad), so any tensor argument counts."""
        if torch.is_grad_enabled():
            return False
        frame = _user_frame()
        if frame is None or not _in_function(frame):
            return False
        if not any(f is frame for f in self.functions) and _grad_off(args, kwargs):
            self.functions.append(frame)
        return any(f is frame for f in self.functions)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _jumps(func, args, kwargs, self._dependent(args, kwargs)):
            self.record(func, "")
        elif func == _DATA_GET and args and isinstance(args[0], Tensor) and args[0].requires_grad:
            self.record(_data, "")  # w.data: a detached view, read as a property
        elif (self.kink is not None and getattr(func, "__name__", "") in KINKED_CALLS
              and any(t.requires_grad for t in _tensors(args))):
            self.kink(func)
        for t in _tensors((*args, *kwargs.values())):
            made = self.indices.pop(id(t), None)
            if made is not None and made[0] is t:
                self.record(made[1], "")
        off = _grad_off(args, kwargs)
        out = func(*args, **kwargs)
        if (getattr(func, "__name__", "") in _INDEXED and isinstance(out, tuple) and len(out) == 2
                and isinstance(out[1], Tensor) and not out[1].is_floating_point()
                and any(isinstance(a, Tensor) and a.requires_grad for a in args)):
            self.indices[id(out[1])] = (out[1], func)
        if (not off and torch.is_grad_enabled() and isinstance(out, Tensor) and out.is_floating_point()
                and not out.requires_grad and _call_name(func) not in _VALUE_FREE
                and getattr(func, "__name__", "") not in STOPS
                and any(t.requires_grad for t in _tensors((*args, *kwargs.values())))):
            self.record(func, NO_DERIVATIVE)  # torch.special.bessel_j0(h): a stop no call names as one
        # a value read (not x.device, x.shape, zeros_like(x)) from the user's code (not torch's or the engine's own)
        if off and isinstance(out, Tensor) and out.is_floating_point() and _call_name(func) not in _VALUE_FREE:
            where = _user_line(_user_frame())
            if where:
                self.record(func, f" {off} ({where})")
        return out


@contextlib.contextmanager
def watch_jumps(root: nn.Module, kinks: list[str] | None = None) -> Iterator[list[str]]:
    """Inside the block, every forward of ``root`` records the calls that can jump in the parameters (a call on a
    tensor that requires grad depends on them); on exit the list holds one description per (module, call),
    ``"path (Class): torch.sign x2"``, in the order first seen (empty when none). Given a list ``kinks``, the calls
    with a kink (:data:`KINKED_CALLS`) are appended to it on exit, described the same way.

    Wrapped around :func:`~explaind.kernel.casts.find_casts`, which runs the forward once with the trainable
    parameters as leaves that require grad, it finds both in one forward (a second probe forward of a
    ``torch.compile``d model changes what dynamo caches).
    """
    counts: Counter[tuple[str, str, str]] = Counter()
    kinked: Counter[tuple[str, str, str]] = Counter()
    found: list[str] = []
    with _module_stack(root) as stack:
        def record(func: Any, how: str, into: Counter[tuple[str, str, str]] = counts) -> None:
            path, cls = stack[-1]
            into[(path, cls, _call_name(func).replace("torch._C._nn.", "torch.nn.functional.")
                 .replace("torch._C._special.special_", "torch.special.") + how)] += 1

        with _Record(record, None if kinks is None else lambda func: record(func, "", kinked)):
            yield found
    found.extend(_described(counts))
    if kinks is not None:
        kinks.extend(_described(kinked))


def _described(counts: Counter[tuple[str, str, str]]) -> list[str]:
    """``"path (Class): op xn"`` per (module, call), in the order first seen."""
    return [f"{path or '<root>'} ({cls}): {op}{f' x{n}' if n > 1 else ''}" for (path, cls, op), n in counts.items()]


def find_jumps(root: nn.Module, forward: Callable[[dict[str, Tensor]], Any], params: dict[str, Tensor],
               trainable: tuple[str, ...]) -> tuple[str, ...]:
    """:func:`watch_jumps` around one forward: the arguments are those of :func:`~explaind.kernel.casts.find_casts`
    without ``replay`` (``forward(params)`` runs ``root`` once on one input, the ``trainable`` entries of ``params``
    made leaves that require grad)."""
    point = {n: v.detach().requires_grad_(n in trainable and v.is_floating_point()) for n, v in params.items()}
    with torch.enable_grad(), watch_jumps(root) as found:
        forward(point)
    return tuple(found)
