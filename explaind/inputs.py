"""Model inputs that are not one tensor: tuples and mappings of tensors (e.g. Hugging Face batches).

A model may take ``model(x)``, ``model(*x)`` for a tuple, or ``model(**x)`` for a mapping such as
``{"input_ids": ..., "attention_mask": ...}``. :class:`Inputs` wraps a tuple or mapping so that
the rest of explaind handles it like a tensor whose first axis is the batch: it is indexed and
sliced along that axis (every tensor at once), reports ``shape[0]``, moves between devices, and
is a ``torch.utils._pytree`` node, so ``torch.func.vmap`` maps over all its tensors together.
:func:`call_model` calls a module with a plain tensor or with the wrapped structure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call

from ._checkpointing import inert_requires_grad as _inert_requires_grad
from ._checkpointing import plain_checkpoints as _plain_checkpoints
from .exceptions import ConfigError, UnsupportedModelError

__all__ = ["Inputs", "as_inputs", "call_model", "batch_size"]


class Inputs:
    """A tuple or mapping of tensors that share their first (batch) axis.

    Parameters
    ----------
    data : tuple or mapping
        The model's positional arguments (tuple) or keyword arguments (mapping). Tensor entries
        share their first axis; other entries (e.g. flags) are passed unchanged.
    """

    def __init__(self, data: tuple[Any, ...] | Mapping[str, Any]):
        self.data: tuple[Any, ...] | dict[str, Any] = dict(data) if isinstance(data, Mapping) else tuple(data)
        sizes = {int(t.shape[0]) for t in self._tensors() if t.dim() > 0}
        if len(sizes) > 1:
            raise ConfigError(f"the input tensors have different first (batch) axes {sorted(sizes)}; every tensor "
                              f"of a tuple or mapping input must hold one row per sample.")

    def _tensors(self) -> list[Tensor]:
        values = self.data.values() if isinstance(self.data, dict) else self.data
        return [v for v in values if isinstance(v, Tensor)]

    def map(self, fn: Callable[[Tensor], Tensor]) -> Inputs:
        """A new :class:`Inputs` with ``fn`` applied to every tensor."""
        def one(v: Any) -> Any:
            return fn(v) if isinstance(v, Tensor) else v

        if isinstance(self.data, dict):
            return Inputs({k: one(v) for k, v in self.data.items()})
        return Inputs(tuple(one(v) for v in self.data))

    def __getitem__(self, idx: Any) -> Inputs:
        return self.map(lambda t: t[idx])

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """``(n,)``: the batch size (the structure has no other common shape)."""
        tensors = self._tensors()
        return (int(tensors[0].shape[0]) if tensors else 0,)

    @property
    def device(self) -> torch.device:
        tensors = self._tensors()
        return tensors[0].device if tensors else torch.device("cpu")

    def dim(self) -> int:
        return 1

    def unsqueeze(self, dim: int) -> Inputs:
        return self.map(lambda t: t.unsqueeze(dim))

    def to(self, *args: Any, **kwargs: Any) -> Inputs:
        return self.map(lambda t: t.to(*args, **kwargs))

    def is_floating_point(self) -> bool:
        return False

    def call(self, fn: Callable[..., Any]) -> Any:
        """``fn(*data)`` or ``fn(**data)``."""
        return fn(**self.data) if isinstance(self.data, dict) else fn(*self.data)

    def __repr__(self) -> str:
        keys = list(self.data) if isinstance(self.data, dict) else f"{len(self.data)} positional"
        return f"Inputs({keys}, batch={self.shape[0]})"


def _flatten(x: Inputs) -> tuple[list[Any], Any]:
    """The tensors are the leaves; the other entries (flags such as ``interpolate_pos_encoding=True``, ``None``)
    ride in the context, so that ``vmap`` maps over the tensors only and passes the flags unchanged.

    Which entries are flags is fixed once per structure (``_fixed``, set again by :func:`_unflatten`): torch
    rebuilds a structure from placeholder leaves (``vmap``'s ``in_dims``), which must count as leaves again.
    """
    kind = "dict" if isinstance(x.data, dict) else "tuple"
    values = list(x.data.values()) if kind == "dict" else list(x.data)
    fixed = getattr(x, "_fixed", None)
    if fixed is None:
        fixed = tuple((i, v) for i, v in enumerate(values) if not isinstance(v, Tensor))
    flags = {i for i, _ in fixed}
    keys = tuple(x.data) if kind == "dict" else len(values)
    return [v for i, v in enumerate(values) if i not in flags], (kind, keys, fixed)


def _unflatten(leaves: Any, context: Any) -> Inputs:
    kind, keys, fixed = context
    given, leaves = dict(fixed), iter(leaves)
    values = [given[i] if i in given else next(leaves) for i in range(len(keys) if kind == "dict" else keys)]
    new = object.__new__(Inputs)  # leaves may be vmap's batched tensors: no shape checks
    new.data = dict(zip(keys, values)) if kind == "dict" else tuple(values)
    new._fixed = fixed
    return new


pytree.register_pytree_node(Inputs, _flatten, _unflatten)


def as_inputs(X: Any) -> Tensor | Inputs:
    """``X`` as a tensor, or a tuple/mapping of tensors as :class:`Inputs` (entries through ``torch.as_tensor``)."""
    if isinstance(X, Inputs | Tensor):
        return X
    if isinstance(X, Mapping):
        return Inputs({k: torch.as_tensor(v) if _array_like(v) else v for k, v in X.items()})
    if isinstance(X, tuple):
        return Inputs(tuple(torch.as_tensor(v) if _array_like(v) else v for v in X))
    return torch.as_tensor(X)


def _array_like(v: Any) -> bool:
    return isinstance(v, Tensor) or hasattr(v, "__array__") or isinstance(v, list)


def batch_size(X: Tensor | Inputs) -> int:
    """Rows along the first axis."""
    return int(X.shape[0])


#: Torch's messages when activation checkpointing runs inside ``torch.func`` or under ``autograd.grad``.
_CHECKPOINT_ERRORS = ("don't yet support saved tensor hooks", "torch.utils.checkpoint is incompatible with .grad()")


def call_model(module: nn.Module, params: Mapping[str, Tensor], x: Tensor | Inputs, *,
               plain_checkpoints: bool = True) -> Any:
    """``functional_call`` of ``module`` with ``params`` on a tensor or on :class:`Inputs` (``*args``/``**kwargs``).

    With ``plain_checkpoints`` (the default) ``torch.utils.checkpoint.checkpoint`` in the forward runs its
    function directly (:func:`explaind._checkpointing.plain_checkpoints`): the same function, which
    ``torch.func`` and ``torch.autograd.grad`` can differentiate.

    Raises
    ------
    UnsupportedModelError
        When the forward still checkpoints activations (another saved-tensor hook such as
        ``torch.autograd.graph.save_on_cpu``, or a torch whose checkpoint internals are unknown), which
        neither ``torch.func`` nor, with ``use_reentrant=True``, ``torch.autograd.grad`` can run; the
        message names the fix.
    """
    try:
        with _plain_checkpoints() if plain_checkpoints else contextlib.nullcontext(), _inert_requires_grad():
            if isinstance(x, Inputs):
                if isinstance(x.data, dict):
                    return functional_call(module, dict(params), (), dict(x.data))
                return functional_call(module, dict(params), tuple(x.data))
            return functional_call(module, dict(params), (x,))
    except RuntimeError as exc:
        refused = checkpoint_error(exc)
        if refused is None:
            raise
        raise refused from exc


def checkpoint_error(exc: RuntimeError) -> UnsupportedModelError | None:
    """The explaind error for torch's activation-checkpointing error ``exc`` (``None`` for any other error)."""
    if not any(m in str(exc) for m in _CHECKPOINT_ERRORS):
        return None
    return UnsupportedModelError(
        "the model's forward checkpoints activations or installs another saved-tensor hook (such as "
        "torch.autograd.graph.save_on_cpu; torch.utils.checkpoint itself runs as a plain call inside explaind "
        "when this torch's checkpoint internals are the known ones), which the torch.func transforms explaind "
        "evaluates the model with cannot run, nor torch.autograd.grad when use_reentrant=True. These hooks do "
        "not change the model's function: switch them off before explaining (a flag on your module; for Hugging "
        "Face models model.gradient_checkpointing_disable())."
    )
