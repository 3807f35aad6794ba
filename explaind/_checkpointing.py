r"""Activation checkpointing run as a plain call while explaind evaluates a model.

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

import torch.utils.checkpoint as _ckpt

__all__ = ["plain_checkpoints", "PATCHABLE"]

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
