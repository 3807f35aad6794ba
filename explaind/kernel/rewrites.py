r"""Plain-operation forms of the fused torch kernels that ``torch.func`` cannot transform.

explaind evaluates models under :func:`torch.func.jvp` (forward mode), and one input at a time
under :func:`torch.func.vmap`. Two families of fused kernels break there:

* ``torch._weight_norm`` (``torch.nn.utils.parametrizations.weight_norm`` and the older
  ``torch.nn.utils.weight_norm``) dispatches on the CPU to ``_weight_norm_interface``, which has no
  forward-mode derivative. Its value is
  :math:`w = g \, v / \|v\|_{\text{except dim}}`, written here with ``torch.linalg.vector_norm``.
* ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh`` and ``torch.rnn_relu`` (``nn.LSTM``, ``nn.GRU``,
  ``nn.RNN``) have no ``vmap`` rule that survives batched inputs with unbatched hidden states.
  Here they are unrolled over time with matrix products and pointwise gates, the equations of the
  torch documentation: for the LSTM with gates ``(i, f, g, o)``,
  :math:`c_t = \sigma(f) c_{t-1} + \sigma(i)\tanh(g)`, :math:`h_t = \sigma(o)\tanh(c_t)` (times
  ``weight_hr`` with ``proj_size``); for the GRU with gates ``(r, z, n)``,
  :math:`n_t = \tanh(W_{in}x + b_{in} + \sigma(r)(W_{hn}h + b_{hn}))`,
  :math:`h_t = (1-\sigma(z)) n_t + \sigma(z) h_{t-1}`.

Both forms equal the fused kernels up to float rounding. :class:`FusedKernelRewrite` is a
``TorchFunctionMode`` that swaps them in; :func:`needs_rewrite` says whether a model holds such a
module, so models without one run with no mode at all. Packed sequences and dropout between
recurrent layers in training mode are refused (:class:`~explaind.exceptions.UnsupportedModelError`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..exceptions import UnsupportedModelError

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


def _lstm_cell(x: Tensor, state: tuple[Tensor, Tensor], w: Sequence[Tensor], bias: bool) -> tuple[Tensor, Tensor]:
    h, c = state
    gates = x @ w[0].T + h @ w[1].T
    if bias:
        gates = gates + w[2] + w[3]
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if len(w) == (5 if bias else 3):  # proj_size > 0: weight_hr last
        h = h @ w[-1].T
    return h, c


def _gru_cell(x: Tensor, h: Tensor, w: Sequence[Tensor], bias: bool) -> Tensor:
    gi = x @ w[0].T + (w[2] if bias else 0)
    gh = h @ w[1].T + (w[3] if bias else 0)
    ir, iz, in_ = gi.chunk(3, dim=-1)
    hr, hz, hn = gh.chunk(3, dim=-1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return (1 - z) * n + z * h


def _simple_cell(act: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    def cell(x: Tensor, h: Tensor, w: Sequence[Tensor], bias: bool) -> Tensor:
        pre = x @ w[0].T + h @ w[1].T
        return act(pre + w[2] + w[3] if bias else pre)

    return cell


_CELLS: dict[str, Callable[..., Any]] = {"lstm": _lstm_cell, "gru": _gru_cell,
                                         "rnn_tanh": _simple_cell(torch.tanh), "rnn_relu": _simple_cell(torch.relu)}


def _unrolled(kind: str, args: Sequence[Any]) -> tuple[Tensor, ...]:
    """``torch.<kind>(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)``."""
    if len(args) != 9 or not isinstance(args[3], bool):  # the packed overload: (data, batch_sizes, hx, params, ...)
        raise UnsupportedModelError(
            f"a packed sequence reached torch.{kind}: explaind evaluates recurrent layers unrolled over time and "
            f"does not unroll packed sequences. Fix: pad the sequences to one length (and mask the padded "
            f"positions in the loss or the head) instead of torch.nn.utils.rnn.pack_padded_sequence.")
    x, hx, params, bias, layers, dropout, train, bidirectional, batch_first = args
    if train and dropout > 0 and layers > 1:
        raise UnsupportedModelError(
            f"torch.{kind} with dropout={dropout} between its {layers} layers in training mode draws its masks "
            f"inside a fused kernel that explaind cannot replay. Fix: stack single-layer recurrent modules with "
            f"nn.Dropout between them (its masks are replayed), or set dropout=0.")
    cell = _CELLS[kind]
    dirs = 2 if bidirectional else 1
    per = len(params) // (layers * dirs)
    seq = x.transpose(0, 1) if batch_first else x  # (T, B, F)
    is_lstm = kind == "lstm"
    h0 = hx[0] if is_lstm else hx
    finals_h, finals_c = [], []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w = params[k * per:(k + 1) * per]
            state: Any = (h0[k], hx[1][k]) if is_lstm else h0[k]
            steps = range(seq.shape[0] - 1, -1, -1) if d == 1 else range(seq.shape[0])
            ys: list[Tensor] = [None] * seq.shape[0]  # type: ignore[list-item]
            for t in steps:
                state = cell(seq[t], state, w, bias)
                ys[t] = state[0] if is_lstm else state
            outs.append(torch.stack(ys))
            finals_h.append(state[0] if is_lstm else state)
            if is_lstm:
                finals_c.append(state[1])
        seq = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
    out = seq.transpose(0, 1) if batch_first else seq
    if is_lstm:
        return out, torch.stack(finals_h), torch.stack(finals_c)
    return out, torch.stack(finals_h)


class FusedKernelRewrite(TorchFunctionMode):
    """Inside the block, weight norm and the recurrent kernels run as the plain operations of this module."""

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func is torch._weight_norm:
            return _weight_norm(*args, **kwargs)
        if name in _CELLS and getattr(torch, name, None) is func:
            return _unrolled(name, list(args) + list(kwargs.values()))
        return func(*args, **kwargs)
