r"""Forward hooks that put every row of a batch at its own point of a segment (layer-factored evaluator).

:class:`SegmentRows` (one step): each covered layer returns
:math:`z(\theta_s) + t_e\, z(\Delta\theta_s) + \epsilon` with a fresh zero offset :math:`\epsilon` that requires
grad, and keeps its input, so one backward pass gives every row's output gradients.
:class:`StepRows` (stacked steps): each covered layer returns its output at the row's own step,
:math:`z(\theta_{s_e}) + t_e\, z(\Delta\theta_{s_e})`, from stacked parameters. The layer-specific parts
are the rules of :mod:`~explaind.kernel.layer_rules`. A composite rule (an attention block, whose
output is not affine in its parameters) recomputes the layer's output itself and passes each affine
map inside it through :meth:`SegmentRows.affine` / :meth:`StepRows.affine`, its *sites*.

Rows ride on the batch axis, which must come first, except in the layers that a sequence-first
``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer`` (``batch_first=False``) applies to its
``(length, batch, features)`` activations: there the batch axis is the second (:func:`batch_axes`), and
the hooks swap it to the front for the rule and back for the output (the layers act per position, so
the swap changes nothing but the layout).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn

from .explained import Params
from .layer_rules import linear_at_steps, linear_moved
from .scalar_duals import without_scalar_duals

__all__ = ["LayerHooks", "SegmentRows", "StepRows", "batch_axes", "step_blocks", "BLOCK_ROWS"]

#: What one more block costs in :func:`step_blocks`, in rows (its weights are gathered, its matrices multiplied).
BLOCK_ROWS = 4

#: Blocks that hand their own (non-composite) layers ``(length, batch, features)`` when built sequence first.
SEQUENCE_FIRST_BLOCKS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def batch_axes(root: nn.Module, prefixes: list[str]) -> dict[str, int]:
    """The batch axis of each layer's input and output: ``1`` for a direct child of a sequence-first block.

    A sequence-first block is one of :data:`SEQUENCE_FIRST_BLOCKS` whose attention was built with
    ``batch_first=False``; its feed-forward ``nn.Linear`` layers and ``nn.LayerNorm`` layers see
    ``(length, batch, features)``. Every other layer keeps the batch axis first (``0``); its attention
    block's composite rule handles either layout itself.
    """
    out = {}
    for prefix in prefixes:
        parent = root.get_submodule(prefix.rpartition(".")[0]) if prefix else None
        seq_first = isinstance(parent, SEQUENCE_FIRST_BLOCKS) and not parent.self_attn.batch_first
        out[prefix] = 1 if seq_first else 0
    return out


def step_blocks(sidx: Tensor) -> tuple[Tensor, int, Tensor, Tensor]:
    """Rows sorted by step laid out in blocks of ``C`` rows of one step each, for one ``bmm`` per layer.

    Step ``s`` with ``n_s`` rows gets ``ceil(n_s / C)`` blocks; ``C`` minimises the padded rows plus
    :data:`BLOCK_ROWS` per block (among every size up to 64 and 256 sizes spaced evenly in log up to
    the largest ``n_s``). A padding slot repeats the first row of its step (it is computed and
    dropped).

    Parameters
    ----------
    sidx : Tensor
        The step of each row ``(E,)``, sorted.

    Returns
    -------
    block_step : Tensor
        The step of each block ``(B,)``.
    C : int
        Rows per block.
    pad : Tensor
        The row at each of the ``B C`` slots ``(B C,)``.
    slot : Tensor
        The slot of each row ``(E,)``: ``pad[slot]`` is ``arange(E)``.
    """
    E = sidx.shape[0]
    steps, counts = torch.unique_consecutive(sidx, return_counts=True)
    top = int(counts.max())  # candidates: every size up to 64, then about 3% apart
    sizes = torch.unique(torch.cat([torch.arange(1, min(top, 64) + 1, dtype=torch.float64),
                                    torch.logspace(0, math.log10(top), 256, dtype=torch.float64).ceil()]))
    sizes = sizes.to(device=sidx.device, dtype=torch.long)
    n_blocks = -(-counts[None, :] // sizes[:, None])  # (candidate C, step)
    cost = n_blocks.sum(1) * (sizes + BLOCK_ROWS)
    C = int(sizes[int(torch.argmin(cost))])
    n_blocks = -(-counts // C)
    block_step = torch.repeat_interleave(steps, n_blocks)
    first_block = torch.cumsum(n_blocks, 0) - n_blocks
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.repeat_interleave(torch.arange(steps.shape[0], device=sidx.device), counts)
    rank = torch.arange(E, device=sidx.device) - starts[pos]
    slot = (first_block[pos] + rank // C) * C + rank % C
    pad = torch.repeat_interleave(starts, n_blocks * C)
    pad[slot] = torch.arange(E, device=sidx.device)
    return block_step, C, pad, slot


class LayerHooks:
    """Forward hooks on the covered layers, active inside a ``with`` block; rows ride on a per-row ``t``."""

    def __init__(self, layers: Mapping[str, nn.Module], rules: Mapping[str, Any],
                 axes: Mapping[str, int] | None = None):
        self.layers = dict(layers)
        self.rules = dict(rules)
        #: the batch axis of each layer (:func:`batch_axes`; absent: 0)
        self.axes = dict(axes or {})
        self.t: Tensor | None = None

    def __enter__(self) -> LayerHooks:
        self._handles = [m.register_forward_hook(self._composite(p), with_kwargs=True) if self.composite(p)
                         else m.register_forward_hook(self._hook(p)) for p, m in self.layers.items()]
        return self

    def composite(self, prefix: str) -> bool:
        """Whether layer ``prefix`` has a composite rule (one that defines ``forward``)."""
        return callable(getattr(self.rules[prefix], "forward", None))

    def _composite(self, prefix: str) -> Any:
        """The hook of a composite rule: its ``forward`` with this object's :meth:`affine` as the sites."""
        rule, site = self.rules[prefix], functools.partial(self.affine, prefix)

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            return rule.forward(mod, args, kwargs, site)

        return hook

    def affine(self, prefix: str, site: str, a: Tensor, W: Tensor, b: Tensor | None, roles: tuple[str, str],
               part: slice | None = None) -> Tensor:
        """The affine map ``a W[part]^T + b[part]`` of a composite layer at the rows' points (``roles``: of W, b)."""
        raise NotImplementedError

    def _batch_first(self, prefix: str, a: Tensor) -> Tensor:
        """``t (E,)`` shaped to broadcast against ``a``'s affine image; ``a`` must hold one row per row of ``t``."""
        n = self.t.shape[0]
        if a.dim() < 2 or a.shape[0] != n:
            raise ValueError(f"layer {prefix!r} does not keep the batch axis first")
        return self.t.reshape(n, *([1] * (a.dim() - 1)))

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def _hook(self, prefix: str) -> Any:
        raise NotImplementedError

    def _rows(self, prefix: str, a: Any, output: Tensor) -> tuple[Any, Tensor, Tensor]:
        """The input and output with one row per row of ``t``, and ``t`` shaped to broadcast against the output.

        The layer must keep the batch axis first, or second where :attr:`axes` says so (then both are
        returned batch first; :meth:`_back` restores the layout); a single row broadcast over the batch
        (GPT-2's position embeddings, ``(1, L)`` positions) is expanded to every row, which then moves on its own.
        """
        n = self.t.shape[0]
        if self.axes.get(prefix, 0):
            if output.dim() < 2 or output.shape[1] != n or not isinstance(a, Tensor) or a.dim() < 2 or a.shape[1] != n:
                raise ValueError(f"layer {prefix!r} of a sequence-first block does not keep the batch axis second")
            a, output = a.transpose(0, 1), output.transpose(0, 1)
        if output.dim() >= 1 and output.shape[0] == 1 != n and isinstance(a, Tensor) and a.dim() >= 1 \
                and a.shape[0] == 1:
            a, output = a.expand(n, *a.shape[1:]), output.expand(n, *output.shape[1:])
        if output.dim() == 0 or output.shape[0] != n:
            raise ValueError(f"layer {prefix!r} does not keep the batch axis first")
        return a, output, self.t.reshape(n, *([1] * (output.dim() - 1)))

    def _back(self, prefix: str, output: Tensor) -> Tensor:
        """A batch-first output of layer ``prefix`` in the layer's own layout (see :meth:`_rows`)."""
        return output.transpose(0, 1) if self.axes.get(prefix, 0) else output


class SegmentRows(LayerHooks):
    """Rows at ``theta_s + t_e * delta`` of one step, with zero offsets on the layer outputs."""

    def __init__(self, layers: Mapping[str, nn.Module], rules: Mapping[str, Any],
                 axes: Mapping[str, int] | None = None):
        super().__init__(layers, rules, axes)
        self.inputs: dict[str, list[Tensor]] = {}
        self.offsets: dict[str, list[Tensor]] = {}
        #: the site of each kept input and offset of a composite rule (``None`` for other rules)
        self.sites: dict[str, list[str | None]] = {}
        self.delta: dict[str, dict[str, Tensor]] = {}

    def run(self, delta: Mapping[tuple[str, str], Tensor], t: Tensor) -> SegmentRows:
        """Set the moves ``(prefix, role) -> Delta`` (empty: none) and the rows' ``t (E,)``."""
        self.delta = {p: {} for p in self.layers}
        for (prefix, role), value in delta.items():
            self.delta[prefix][role] = value
        self.t = t
        return self

    def __enter__(self) -> SegmentRows:
        self.inputs = {p: [] for p in self.layers}
        self.offsets = {p: [] for p in self.layers}
        self.sites = {p: [] for p in self.layers}
        super().__enter__()
        return self

    def affine(self, prefix: str, site: str, a: Tensor, W: Tensor, b: Tensor | None, roles: tuple[str, str],
               part: slice | None = None) -> Tensor:
        r""":math:`(W + t_e \Delta W) a_e + b + t_e \Delta b + \epsilon` (rows ``part`` of ``W``, ``b``), ``a`` kept."""
        t = self._batch_first(prefix, a)
        delta = self.delta[prefix]
        dW, db = delta.get(roles[0]), delta.get(roles[1])
        if part is not None:
            W, dW, b, db = (None if v is None else v[part] for v in (W, dW, b, db))
        z = F.linear(a, W, b)
        moved = linear_moved(a, dW, db, z)
        if moved is not None:
            z = z + t * moved
        eps = torch.zeros_like(z, requires_grad=True)
        self.inputs[prefix].append(a.detach())
        self.offsets[prefix].append(eps)
        self.sites[prefix].append(site)
        return z + eps

    def _hook(self, prefix: str) -> Any:
        rule = self.rules[prefix]
        keep = getattr(rule, "kept", None)

        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
            a, output, t = self._rows(prefix, inputs[0], output)
            moved = rule.moved(mod, a, output, self.delta[prefix])
            if moved is not None:
                output = output + t * moved
            eps = torch.zeros_like(output, requires_grad=True)
            self.inputs[prefix].append((a if keep is None else keep(mod, a)).detach())
            self.offsets[prefix].append(eps)
            self.sites[prefix].append(None)
            return self._back(prefix, output + eps)

        return hook


class StepRows(LayerHooks):
    """Each covered layer's output at the rows' own steps and points (parameters stacked ``(S, *shape)``).

    The rows come laid out in blocks of ``C`` rows of one step each (:func:`step_blocks`), so that a
    layer's product with stacked weights is one ``bmm`` over the blocks on the activations as they are.
    A covered layer's own forward runs on one row only (a forward pre-hook narrows its input; the hook
    then computes every row's output from the held input): its result would be replaced anyway.
    """

    def __init__(self, layers: Mapping[str, nn.Module], rules: Mapping[str, Any],
                 uses: Mapping[str, list[tuple[str, str]]], axes: Mapping[str, int] | None = None):
        super().__init__(layers, rules, axes)
        self.param_of = {use: name for name, used in uses.items() for use in used}
        self.base: Params = {}
        self.delta: Params = {}
        self.sidx = torch.zeros(0, dtype=torch.long)
        #: the step of each block of ``C`` consecutive rows, and ``C``
        self.blocks: tuple[Tensor, int] | None = None
        #: each layer's full input while its own forward runs on one row
        self._held: dict[str, Any] = {}
        #: whether the rows run in forward mode (:meth:`constant`)
        self.dual = False

    def run(self, base: Params, delta: Params, block_step: Tensor, C: int, dual: bool = False) -> StepRows:
        """Set the stacked parameters and the layout: rows ``b C .. (b + 1) C - 1`` are at step ``block_step[b]``.

        ``dual``: the rows' ``t`` is a forward-mode dual tensor (``torch.autograd.forward_ad``) inside a dual level.
        """
        self.base, self.delta, self.dual = base, delta, dual
        self.blocks = (block_step, C)
        self.sidx = torch.repeat_interleave(block_step, C)
        return self

    def __enter__(self) -> StepRows:
        super().__enter__()
        self._handles += [m.register_forward_pre_hook(self._narrow(p)) for p, m in self.layers.items()
                          if not self.composite(p)]
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.t = None
        self.base, self.delta, self.blocks, self._held, self.dual = {}, {}, None, {}, False

    def _narrow(self, prefix: str) -> Any:
        axis = self.axes.get(prefix, 0)

        def pre(mod: nn.Module, inputs: tuple[Any, ...]) -> Any:
            a = inputs[0] if inputs else None
            if not isinstance(a, Tensor) or a.dim() <= axis or a.shape[axis] <= 1:
                return None
            self._held[prefix] = a
            one = (fwad.unpack_dual(a).primal if self.dual else a).narrow(axis, 0, 1)  # no tangent: no forward mode
            return (one, *inputs[1:])

        return pre

    def stacked(self, prefix: str, role: str, current: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Stacked base and delta ``(S, *shape)`` of a layer parameter (a frozen one: its value, no delta)."""
        name = self.param_of.get((prefix, role))
        if name is None:
            return (None if current is None else current.unsqueeze(0)), None
        return self.base[name], self.delta[name]

    def buffers(self, prefix: str, attr: str, current: Tensor) -> Tensor:
        """Stacked ``(S, *shape)`` buffer ``attr`` of layer ``prefix`` (changed by training), else ``current[None]``."""
        stacked = self.base.get(f"{prefix}.{attr}" if prefix else attr)
        return current.unsqueeze(0) if stacked is None else stacked

    def linear(self, a: Tensor, t: Tensor, W: Tensor, dW: Tensor | None, b: Tensor | None,
               db: Tensor | None) -> Tensor:
        r""":math:`(W + t_e \Delta W)_{s_e} a_e + (b + t_e \Delta b)_{s_e}` per row, one ``bmm`` over the blocks.

        ``a (E, R, in)``, ``t (E,)``; ``W``, ``dW`` stacks ``(S, out, in)`` (``S = 1``: the same matrix for
        every row), ``b``, ``db`` stacks ``(S, out)``; returns ``(E, R, out)``. In forward mode
        (:mod:`torch.autograd.forward_ad`, ``a = a_0 + \varepsilon a_1``, ``t = t_0 + \varepsilon t_1``) the
        tangent is formed here from :math:`P = a_0 [W; \Delta W]^\top` and :math:`Q = a_1 [W; \Delta W]^\top`
        (one ``bmm`` over the blocks each),

        .. math::

            z_0 = P_W + t_0 P_{\Delta W} + b + t_0 \Delta b, \qquad
            z_1 = Q_W + t_0 Q_{\Delta W} + t_1 (P_{\Delta W} + \Delta b),

        and the result carries the tangent :math:`z_1` (docs/engine.md, *layer-factored paths*); outside
        forward mode it is :math:`z_0`.
        """
        E, R, _ = a.shape
        a0, a1 = fwad.unpack_dual(a) if self.dual else (a, None)
        t0, t1 = fwad.unpack_dual(t) if self.dual else (t, None)
        out = W.shape[1]
        if dW is None:  # nothing moves but a bias, if that
            both, bias = W, b
        else:  # [W; dW] and [b; db] (a frozen or absent part: its value, or zeros)
            both = torch.cat([W.expand_as(dW), dW], 1)
            bias = None
            if b is not None or db is not None:
                parts = [W.new_zeros(1, out) if v is None else v for v in (b, db)]
                S = max(v.shape[0] for v in parts)
                bias = torch.cat([v.expand(S, out) for v in parts], 1)
        P, Q = self._products(a0, a1, both, bias)  # (..., R, out or 2 out), rows leading; Q None without a1
        lead = P.shape[:-2]  # (E,), or (blocks, C): views of the product, no copy

        def per_row(v: Tensor | None) -> Tensor | None:  # (E,) or (E, out) to broadcast against (*lead, R, out)
            return None if v is None else v.reshape(*lead, 1, -1)

        t0, t1 = per_row(t0), per_row(t1)
        if dW is None:
            z0, z1, moved = P, Q, None
            if db is not None:
                moved = db[0] if db.shape[0] == 1 else per_row(db.index_select(0, self.sidx))
                z0 = torch.addcmul(z0, t0, moved)
        else:
            moved = P[..., out:]
            z0 = torch.addcmul(P[..., :out], t0, moved)
            z1 = None if Q is None else torch.addcmul(Q[..., :out], t0, Q[..., out:])
        if t1 is not None and moved is not None:
            z1 = t1 * moved if z1 is None else torch.addcmul(z1, t1, moved)
        z0 = z0.reshape(E, R, out)
        return z0 if z1 is None else fwad.make_dual(z0, z1.expand(*lead, R, out).reshape(E, R, out))

    def _products(self, a0: Tensor, a1: Tensor | None, W: Tensor,
                  bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``a0 W[s_e]^T + bias[s_e]`` and ``a1 W[s_e]^T`` for ``a (E, R, in)``, ``W (S, k, in)``, ``bias (S, k)``.

        One product over the blocks each, returned as ``(E, R, k)`` when ``S = 1``, else as views
        ``(blocks, C, R, k)`` of the product; a stack with ``S = 1`` is shared by every row.
        """
        E, R, n_in = a0.shape
        k = W.shape[1]
        if W.shape[0] == 1:
            x = a0 if a1 is None else torch.cat([a0, a1])
            z = x @ W[0].transpose(0, 1)
            P = z[:E]
            if bias is not None:
                P = P + (bias[0] if bias.shape[0] == 1 else bias.index_select(0, self.sidx).unsqueeze(1))
            return P, None if a1 is None else z[E:]
        block_step, C = self.blocks
        B = block_step.shape[0]
        Wt = W.index_select(0, block_step).transpose(1, 2)
        if bias is None:
            P = torch.bmm(a0.reshape(B, C * R, n_in), Wt)
        else:
            rows = bias[0].expand(1, 1, k) if bias.shape[0] == 1 else bias.index_select(0, block_step).unsqueeze(1)
            P = torch.baddbmm(rows, a0.reshape(B, C * R, n_in), Wt)
        Q = None if a1 is None else torch.bmm(a1.reshape(B, C * R, n_in), Wt).reshape(B, C, R, k)
        return P.reshape(B, C, R, k), Q

    def constant(self, x: Tensor) -> Tensor:
        """``x`` with a zero tangent while the rows run in forward mode (:meth:`run`); else ``x`` itself.

        An operation between a tensor with a tangent and one without takes a slow path of torch's
        forward mode (a Python meta kernel on every call); with an explicit zero tangent it takes the
        ordinary one.
        """
        return fwad.make_dual(x, torch.zeros_like(x)) if self.dual else x

    def _input_rows(self, prefix: str, a: Any, out_dim: int) -> tuple[Tensor, Tensor]:
        """The layer input with one row per row of ``t``, batch first, and ``t`` shaped for ``out_dim`` output axes.

        As :meth:`LayerHooks._rows`, from the input alone (the layer's own output has one row).
        """
        n, axis = self.t.shape[0], self.axes.get(prefix, 0)
        if not isinstance(a, Tensor) or a.dim() <= axis:
            raise ValueError(f"layer {prefix!r} does not keep the batch axis {'second' if axis else 'first'}")
        if axis:
            a = a.transpose(0, 1)
        elif a.shape[0] == 1 != n:
            a = a.expand(n, *a.shape[1:])
        if a.shape[0] != n:
            raise ValueError(f"layer {prefix!r} does not keep the batch axis {'second' if axis else 'first'}")
        return a, self.t.reshape(n, *([1] * (out_dim - 1)))

    def _hook(self, prefix: str) -> Any:
        rule = self.rules[prefix]

        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
            held = self._held.pop(prefix, inputs[0])
            with without_scalar_duals(held, output):  # no Python numbers here: skip the mode's dispatch
                a, t = self._input_rows(prefix, held, output.dim())
                return self._back(prefix, rule.at_steps(mod, prefix, a, t, self))

        return hook

    def affine(self, prefix: str, site: str, a: Tensor, W: Tensor, b: Tensor | None, roles: tuple[str, str],
               part: slice | None = None) -> Tensor:
        r""":math:`(W + t_e \Delta W)_{s_e} a_e + (b + t_e \Delta b)_{s_e}` with each row's step (rows ``part``)."""
        t = self._batch_first(prefix, a).reshape(-1)
        Ws, dW = self.stacked(prefix, roles[0], W)
        bs, db = self.stacked(prefix, roles[1], b)
        if part is not None:
            Ws, dW, bs, db = (None if v is None else v[:, part] for v in (Ws, dW, bs, db))
        return linear_at_steps(a, t, self, Ws, dW, bs, db)
