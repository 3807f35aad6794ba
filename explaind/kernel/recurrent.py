r"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) unrolled over time as plain operations.

torch's fused recurrent kernels (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``,
``torch.rnn_relu``) have no ``vmap`` rule that survives batched inputs with unbatched hidden
states, so explaind evaluates them through :func:`unrolled`: matrix products and pointwise gates,
the equations of the torch documentation. With gates ``(i, f, g, o)`` the LSTM is

.. math::

    c_t = \sigma(f_t) \odot c_{t-1} + \sigma(i_t) \odot \tanh(g_t), \qquad
    h_t = \big(\sigma(o_t) \odot \tanh(c_t)\big) W_{hr}^\top \ (\text{with } \texttt{proj\_size}),

the GRU with gates ``(r, z, n)``
:math:`n_t = \tanh(W_{in}x_t + b_{in} + \sigma(r_t) \odot (W_{hn}h_{t-1} + b_{hn}))`,
:math:`h_t = n_t + \sigma(z_t) \odot (h_{t-1} - n_t)`, and the plain RNN
:math:`h_t = \phi(W_{ih}x_t + b_{ih} + W_{hh}h_{t-1} + b_{hh})` with :math:`\phi` = tanh or ReLU.

The input projection :math:`x_t W_{ih}^\top + b` of every time step is one matrix product before
the loop (as torch's own CPU kernel does); only :math:`h_{t-1} W_{hh}^\top` stays inside it.
Everything equals the fused kernels up to float rounding (docs/maths.md, "Recurrent layers").

A layer's time steps are visited in one of three layouts (:class:`Steps`):

* ``padded``: a time-major ``(T, B, F)`` sequence, every row at every step;
* ``packed``: a ``PackedSequence``'s ``data`` ``(N, F)`` with its per-step batch sizes
  :math:`b_0 \ge b_1 \ge \dots`: step ``t`` updates the first :math:`b_t` rows, the others keep
  their state (the reverse direction starts each row at its own last step);
* ``masked``: the same computation on a padded ``(T, B, F)`` sequence with a mask
  :math:`m_{t,b} = [t < L_b]`, :math:`s_t = m_t\,\mathrm{cell}(x_t, s_{t-1}) + (1 - m_t)\,s_{t-1}`
  (a ``where``): the form of a packed sequence whose lengths differ from input to input under
  ``vmap``. Its outputs at padded positions are zero.

Dropout between layers in training mode is drawn as torch's CPU kernel draws it
(``torch.dropout`` on each layer's whole output, in layer order), so a replayed random state gives
the masks of the recorded forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..exceptions import UnsupportedModelError

__all__ = ["Steps", "unrolled", "KINDS"]

State = tuple[Tensor, ...]


@dataclass(frozen=True)
class Steps:
    """How a layer's time steps visit the rows of its input.

    Attributes
    ----------
    layout : {"padded", "packed", "masked"}
    T : int
        Time steps.
    sizes : tuple of int
        ``packed``: rows updated at each step, :math:`b_t` (non-increasing).
    mask : Tensor, optional
        ``masked``: ``(T, B, 1)`` booleans, true where step ``t`` belongs to row ``b``'s sequence.
    """

    layout: str
    T: int
    sizes: tuple[int, ...] = ()
    mask: Tensor | None = None

    def offsets(self) -> list[int]:
        """``packed``: the first data row of each step, :math:`\\sum_{u<t} b_u`."""
        out, acc = [], 0
        for b in self.sizes:
            out.append(acc)
            acc += b
        return out


@dataclass(frozen=True)
class _Weights:
    """One direction of one layer: ``W_hh`` and the biases as each cell reads them, ``W_hr`` or ``None``."""

    w_ih: Tensor
    b_in: Tensor | None   # added to x W_ih^T before the loop
    w_hh: Tensor
    b_hh: Tensor | None   # added to h W_hh^T inside the loop (GRU only)
    w_hr: Tensor | None


def _weights(kind: str, w: Sequence[Tensor], bias: bool) -> _Weights:
    """Split torch's flat weights ``(w_ih, w_hh[, b_ih, b_hh][, w_hr])`` of one direction."""
    w_hr = w[-1] if len(w) == (5 if bias else 3) else None
    if not bias:
        return _Weights(w[0], None, w[1], None, w_hr)
    if kind == "gru":  # b_hn sits inside r * (W_hn h + b_hn)
        return _Weights(w[0], w[2], w[1], w[3], w_hr)
    return _Weights(w[0], w[2] + w[3], w[1], None, w_hr)


def _lstm(gi: Tensor, state: State, w: _Weights) -> State:
    h, c = state
    i, f, g, o = torch.addmm(gi, h, w.w_hh.T).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if w.w_hr is None else h @ w.w_hr.T), c


def _gru(gi: Tensor, state: State, w: _Weights) -> State:
    h = state[0]
    gh = F.linear(h, w.w_hh, w.b_hh)
    H = h.shape[-1]
    r, z = torch.sigmoid(gi[..., :2 * H] + gh[..., :2 * H]).chunk(2, dim=-1)
    n = torch.tanh(gi[..., 2 * H:] + r * gh[..., 2 * H:])
    return (n + z * (h - n),)


def _simple(act: Callable[[Tensor], Tensor]) -> Callable[[Tensor, State, _Weights], State]:
    def cell(gi: Tensor, state: State, w: _Weights) -> State:
        return (act(torch.addmm(gi, state[0], w.w_hh.T)),)

    return cell


#: torch's recurrent kernels by name, and the cell each one unrolls
KINDS: dict[str, Callable[[Tensor, State, _Weights], State]] = {
    "lstm": _lstm, "gru": _gru, "rnn_tanh": _simple(torch.tanh), "rnn_relu": _simple(torch.relu)}


def _direction(kind: str, x: Tensor, state: State, w: _Weights, steps: Steps, reverse: bool) -> tuple[Tensor, State]:
    """One direction of one layer over ``x``; its outputs (``x``'s layout) and final state.

    ``state`` holds the initial state of every row, ``(B, H)`` each (``(b_0, H)`` when packed). The
    input projection of every step is one product, cut into steps by ``unbind``/``split`` (whose
    backward is one ``stack``/``cat``, where indexing step by step would add a full-size zero
    gradient per step).
    """
    cell = KINDS[kind]
    gi = F.linear(x.reshape(-1, x.shape[-1]), w.w_ih, w.b_in)  # (T B, G) or (N, G): one 2-D product
    if steps.layout == "packed":
        return _packed_direction(cell, gi.split(list(steps.sizes)), state, w, steps, reverse)
    gis = gi.reshape(steps.T, -1, gi.shape[-1]).unbind(0)
    masks = steps.mask.unbind(0) if steps.mask is not None else None
    ys: list[Tensor] = list(gis)  # placeholders, each overwritten
    for t in (range(steps.T - 1, -1, -1) if reverse else range(steps.T)):
        new = cell(gis[t], state, w)
        if masks is not None:
            state = tuple(torch.where(masks[t], a, b) for a, b in zip(new, state))
            ys[t] = torch.where(masks[t], new[0], 0.0)
        else:
            state = new
            ys[t] = new[0]
    return torch.stack(ys), state


def _packed_direction(cell: Callable[[Tensor, State, _Weights], State], gis: Sequence[Tensor], state: State,
                      w: _Weights, steps: Steps, reverse: bool) -> tuple[Tensor, State]:
    """:func:`_direction` on packed data, ``gis`` per step: step ``t`` updates rows ``[0, b_t)`` of the state."""
    ys: list[Tensor] = list(gis)
    if not reverse:
        for t in range(steps.T):
            b = steps.sizes[t]
            new = cell(gis[t], tuple(s[:b] for s in state), w)
            state = tuple(torch.cat([a, s[b:]]) if b < s.shape[0] else a for a, s in zip(new, state))
            ys[t] = new[0]
        return torch.cat(ys), state
    initial, cur = state, tuple(s[:steps.sizes[-1]] for s in state)
    for t in range(steps.T - 1, -1, -1):
        b = steps.sizes[t]
        if b > cur[0].shape[0]:  # rows whose sequences end at step t start from their initial state
            cur = tuple(torch.cat([c, s[c.shape[0]:b]]) for c, s in zip(cur, initial))
        cur = cell(gis[t], cur, w)
        ys[t] = cur[0]
    return torch.cat(ys), cur


def _between_layers(x: Tensor, p: float, train: bool, steps: Steps, kind: str) -> Tensor:
    """Dropout on a layer's output before the next layer, drawn as torch's CPU kernel draws it."""
    if not (train and p > 0):
        return x
    if x.device.type != "cpu" or steps.layout == "masked":
        where = ("on CUDA its masks come from cuDNN's own dropout state" if x.device.type != "cpu" else
                 "a packed sequence evaluated one input at a time has another shape than the recorded batch's")
        raise UnsupportedModelError(
            f"torch.{kind} with dropout={p} between its layers in training mode cannot be replayed here: {where}. "
            f"Fix: stack single-layer recurrent modules with nn.Dropout between them (its masks are replayed), "
            f"or set dropout=0.")
    return torch.dropout(x, p, True)


def unrolled(kind: str, x: Tensor, hx: State, params: Sequence[Tensor], bias: bool, layers: int, dropout: float,
             train: bool, bidirectional: bool, steps: Steps) -> tuple[Tensor, ...]:
    """What ``torch.<kind>`` returns, computed by the unrolled cells.

    Parameters
    ----------
    kind : {"lstm", "gru", "rnn_tanh", "rnn_relu"}
    x : Tensor
        ``(T, B, F)`` time-major (``padded``, ``masked``) or packed data ``(N, F)``.
    hx : tuple of Tensor
        ``(h_0,)`` or, for the LSTM, ``(h_0, c_0)``, each ``(layers * directions, B, H)``.
    params : sequence of Tensor
        torch's flat weights, ``layers * directions`` groups in torch's order.
    steps : Steps
        The layout of ``x``.

    Returns
    -------
    tuple of Tensor
        The last layer's outputs (``x``'s layout, ``directions * H`` features), then the final
        states ``h_n`` (and ``c_n``), ``(layers * directions, B, H)``.
    """
    dirs = 2 if bidirectional else 1
    per = len(params) // (layers * dirs)
    finals: list[State] = []
    for layer in range(layers):
        if layer:
            x = _between_layers(x, dropout, train, steps, kind)
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w = _weights(kind, params[k * per:(k + 1) * per], bias)
            y, state = _direction(kind, x, tuple(h[k] for h in hx), w, steps, reverse=d == 1)
            outs.append(y)
            finals.append(state)
        x = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
    return (x, *(torch.stack([f[i] for f in finals]) for i in range(len(hx))))


def run_kernel(kind: str, args: Sequence[Any], packed: Callable[[Tensor, Tensor], Steps]) -> tuple[Tensor, ...]:
    """``torch.<kind>`` from its arguments, padded or packed overload.

    Padded: ``(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)``;
    packed: ``(data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional)``.
    ``packed(data, batch_sizes)`` gives the :class:`Steps` of packed data (masked when the data was packed
    one input at a time).
    """
    hx = lambda h: tuple(h) if isinstance(h, (list, tuple)) else (h,)  # noqa: E731
    if isinstance(args[1], Tensor) and not isinstance(args[3], bool):  # the packed overload
        data, batch_sizes, h0, params, bias, layers, dropout, train, bidir = args
        steps = packed(data, batch_sizes)
        if steps.layout == "masked":
            T, B = steps.T, data.shape[0] // steps.T
            out, *final = unrolled(kind, data.reshape(T, B, -1), hx(h0), params, bias, layers, dropout, train, bidir,
                                   steps)
            return (out.reshape(T * B, -1), *final)
        return unrolled(kind, data, hx(h0), params, bias, layers, dropout, train, bidir, steps)
    x, h0, params, bias, layers, dropout, train, bidir, batch_first = args
    seq = x.transpose(0, 1) if batch_first else x
    out, *final = unrolled(kind, seq, hx(h0), params, bias, layers, dropout, train, bidir,
                           Steps("padded", seq.shape[0]))
    return (out.transpose(0, 1) if batch_first else out, *final)
