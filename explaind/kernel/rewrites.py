r"""Plain-operation forms of the fused torch kernels that ``torch.func`` cannot transform.

explaind evaluates models under :func:`torch.func.jvp` (forward mode), and one input at a time
under :func:`torch.func.vmap`. Two families of fused kernels break there:

* ``torch._weight_norm`` (``torch.nn.utils.parametrizations.weight_norm`` and the older
  ``torch.nn.utils.weight_norm``) dispatches on the CPU to ``_weight_norm_interface``, which has no
  forward-mode derivative. Its value is
  :math:`w = g \, v / \|v\|_{\text{except dim}}`, written here with ``torch.linalg.vector_norm``.
* ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh`` and ``torch.rnn_relu`` (``nn.LSTM``, ``nn.GRU``,
  ``nn.RNN``) have no ``vmap`` rule that survives batched inputs with unbatched hidden states.
  They run unrolled over time (:mod:`~explaind.kernel.recurrent`), packed sequences included:
  ``pack_padded_sequence`` and ``pad_packed_sequence`` run as plain indexing
  (:mod:`~explaind.kernel.packing`), masked where ``vmap`` gives each input its own length.

Every form equals the fused kernel up to float rounding. :class:`FusedKernelRewrite` is a
``TorchFunctionMode`` that swaps them in; :func:`needs_rewrite` says whether a model holds such a
module, so models without one run with no mode at all. Dropout between recurrent layers in
training mode is drawn as torch's CPU kernel draws it; on CUDA it is refused
(:class:`~explaind.exceptions.UnsupportedModelError`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .packing import Packing
from .recurrent import KINDS, run_kernel

__all__ = ["FusedKernelRewrite", "needs_rewrite"]


def needs_rewrite(module: nn.Module) -> bool:
    """Whether ``module`` holds a recurrent layer or a weight norm (either implementation)."""
    for m in module.modules():
        if isinstance(m, nn.RNNBase):
            return True
        if type(m).__name__ == "_WeightNorm":  # torch.nn.utils.parametrizations.weight_norm
            return True
        if any(type(h).__name__ == "WeightNorm" for h in m._forward_pre_hooks.values()):  # torch.nn.utils.weight_norm
            return True
    return False


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """:math:`g \\, v / \\|v\\|` with the norm over every axis except ``dim`` (``-1``: over all axes)."""
    if dim == -1:
        return v * (g / torch.linalg.vector_norm(v))
    axes = [a for a in range(v.dim()) if a != dim % v.dim()]
    return v * (g / torch.linalg.vector_norm(v, dim=axes, keepdim=True))


class FusedKernelRewrite(TorchFunctionMode):
    """Inside the block, weight norm, the recurrent kernels and sequence packing run as plain operations."""

    def __init__(self) -> None:
        super().__init__()
        self.packing = Packing()

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func is torch._weight_norm:
            return _weight_norm(*args, **kwargs)
        if name in KINDS and getattr(torch, name, None) is func:
            return run_kernel(name, list(args) + list(kwargs.values()), self.packing.steps)
        if func is torch._pack_padded_sequence:
            return self.packing.pack(*args, **kwargs)
        if func is torch._pad_packed_sequence:
            return self.packing.pad(*args, **kwargs)
        if func is Tensor.scatter_:  # pack_padded_sequence(enforce_sorted=False) inverts its permutation so
            with warnings.catch_warnings():  # under vmap: torch's exact fallback warns of its speed only
                warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
                return func(*args, **kwargs)
        return func(*args, **kwargs)
