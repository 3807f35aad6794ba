r"""Activation checkpointing run as a plain call while explaind evaluates a model, and the input hook it brings.

``torch.utils.checkpoint.checkpoint(fn, *args)`` returns ``fn(*args)``: it changes what autograd
keeps for the backward pass (memory), not the function. Its two implementations cannot run where
explaind evaluates a model: the non-reentrant one installs saved-tensor hooks, which the
``torch.func`` transforms refuse; the reentrant one (``use_reentrant=True``) is an
``autograd.Function`` that refuses ``torch.autograd.grad``/``backward(inputs=...)``. Inside
:func:`plain_checkpoints` both run ``fn`` directly, so a model that checkpoints is evaluated (and
differentiated) as the same function without the user switching checkpointing off.

The dropout masks are unchanged: with ``preserve_rng_state=True`` (torch's default) the training
recomputation draws the masks the forward drew, which are the masks of a plain call from the same
state; with ``preserve_rng_state=False`` the training gradient mixes two draws, which the gradient
check refuses (:mod:`explaind.trajectory._backward_draws`), and that diagnosis runs the real
checkpoint (``call_model(..., plain_checkpoints=False)``).

The switch replaces two module attributes of ``torch.utils.checkpoint`` that ``checkpoint`` looks up
when called (however the user imported it; Hugging Face's ``gradient_checkpointing_enable`` binds
``checkpoint`` itself). It is process-wide while any block is open (a depth counter under a lock, the
originals kept at import), so another thread checkpointing meanwhile computes the same values with
the memory of a plain call. When a torch version lacks either attribute nothing is replaced, and
:func:`~explaind.inputs.checkpoint_error` names the fix as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.checkpoint as _ckpt

__all__ = ["plain_checkpoints", "inert_requires_grad", "PATCHABLE"]

_NAMES = ("_checkpoint_without_reentrant_generator", "CheckpointFunction")
_ORIGINAL = {name: getattr(_ckpt, name, None) for name in _NAMES}
#: Whether this torch exposes both attributes the switch replaces.
PATCHABLE = all(v is not None for v in _ORIGINAL.values())
_lock = threading.Lock()
_depth = 0


def _no_checkpoint(*_args: Any, **_kwargs: Any) -> Iterator[None]:
    """Stands in for the non-reentrant generator: one ``yield`` around the forward, no hooks, no state saved."""
    yield


class _DirectCall:
    """Stands in for the reentrant ``CheckpointFunction``: ``apply(fn, preserve_rng_state, *args)`` is ``fn(*args)``."""

    @staticmethod
    def apply(function: Any, _preserve_rng_state: bool, *args: Any) -> Any:
        return function(*args)


_PLAIN = {"_checkpoint_without_reentrant_generator": _no_checkpoint, "CheckpointFunction": _DirectCall}


@contextlib.contextmanager
def plain_checkpoints() -> Iterator[None]:
    """Inside the block ``torch.utils.checkpoint.checkpoint(fn, *args, **kw)`` returns ``fn(*args, **kw)`` directly.

    Nested and concurrent blocks share one switch: the first to enter replaces the attributes, the last
    to leave restores the originals.
    """
    global _depth
    if not PATCHABLE:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            for name, value in _PLAIN.items():
                setattr(_ckpt, name, value)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name, value in _ORIGINAL.items():
                    setattr(_ckpt, name, value)


_functorch = torch._C._functorch
_TORCH_REQUIRES_GRAD = torch.Tensor.requires_grad_
_OWN_ATTRIBUTE = "requires_grad_" in vars(torch.Tensor)  # whether torch.Tensor itself defines it (it inherits it)
_inert = threading.local()
_inert_lock = threading.Lock()
_inert_depth = 0


def _refused_by_torch_func() -> bool:
    """Whether torch would refuse ``requires_grad_`` here: a ``torch.func`` transform active, in-place not allowed."""
    return _functorch.peek_interpreter_stack() is not None and not _functorch.get_inplace_requires_grad_allowed()


def _requires_grad_(self: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """``Tensor.requires_grad_``: ``self`` unchanged where torch would refuse ``True`` inside this thread's block."""
    if requires_grad and getattr(_inert, "depth", 0) and _refused_by_torch_func():
        return self
    return _TORCH_REQUIRES_GRAD(self, requires_grad)


@contextlib.contextmanager
def inert_requires_grad() -> Iterator[None]:
    """Inside the block, on this thread, ``t.requires_grad_(True)`` under a ``torch.func`` transform returns ``t``.

    Elsewhere (other threads, outside the transforms, ``requires_grad_(False)``) torch's method runs. Nested
    and concurrent blocks share one replacement of ``torch.Tensor.requires_grad_``: the first to enter installs
    it, the last to leave restores torch's.
    """
    global _inert_depth
    with _inert_lock:
        _inert_depth += 1
        if _inert_depth == 1:
            torch.Tensor.requires_grad_ = _requires_grad_  # type: ignore[method-assign]
    _inert.depth = getattr(_inert, "depth", 0) + 1
    try:
        yield
    finally:
        _inert.depth -= 1
        with _inert_lock:
            _inert_depth -= 1
            if _inert_depth == 0:
                if _OWN_ATTRIBUTE:
                    torch.Tensor.requires_grad_ = _TORCH_REQUIRES_GRAD  # type: ignore[method-assign]
                else:
                    del torch.Tensor.requires_grad_
