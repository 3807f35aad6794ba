r"""A composite layer rule for ``nn.MultiheadAttention`` (registered on import).

An attention block is not affine in its parameters, but it is a chain of two affine maps around
a parameter-free core: the in-projection :math:`[q; k; v] = W_{in} a + b_{in}` (``in_proj_weight``
``(3E, E)``, ``in_proj_bias``), scaled dot-product attention per head,

.. math::

    o = \operatorname{softmax}\!\Big(\frac{q_h k_h^\top}{\sqrt{d_h}} + M\Big) v_h,

(:math:`M` the additive mask from ``attn_mask`` and ``key_padding_mask``), and the out-projection
:math:`z = W_{out} o + b_{out}` (``out_proj``, whose own ``forward`` the block never calls). Each
affine map is a *site*: the hooks evaluate it at every row's own point and, for Jacobians, put a
zero offset on its output, so each site's factors are those of a linear layer,
:math:`\partial g / \partial W = \sum_r \delta_r a_r^\top` with :math:`a` the site's input and
:math:`\delta` the output gradient of the site (docs/engine.md §2, the layer-factored evaluator). The
in-projection of self-attention (``query is key is value``) is one site; of cross-attention,
``q`` and ``kv`` (``key is value``) or ``q``, ``k``, ``v``, each a block of rows of
``in_proj_weight``. Covered: packed projections (``kdim = vdim = embed_dim``), no ``bias_k``/``bias_v``,
no ``add_zero_attn``, batched inputs (either ``batch_first``), no active dropout (evaluation mode).
Checked against ``torch.func`` at start-up like every rule (:mod:`~explaind.kernel.layers`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .layer_rules import reduce_linear, register_layer_rule

__all__ = ["MultiheadAttentionRule"]

#: The rows of ``in_proj_weight`` each in-projection site computes, in units of ``embed_dim``.
SITES = {"in": (0, 3), "q": (0, 1), "kv": (1, 3), "k": (1, 2), "v": (2, 3)}

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class MultiheadAttentionRule:
    """``nn.MultiheadAttention``: roles ``in_weight``, ``in_bias``, ``out_weight``, ``out_bias`` (a composite rule)."""

    def roles(self, module: nn.Module) -> dict[str, str]:
        if (not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn
                or (module.training and module.dropout > 0)):
            return {}
        out = {"in_proj_weight": "in_weight", "out_proj.weight": "out_weight"}
        if module.in_proj_bias is not None:
            out["in_proj_bias"] = "in_bias"
        if module.out_proj.bias is not None:
            out["out_proj.bias"] = "out_bias"
        return out

    def forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                site: Callable[..., Tensor]) -> tuple[Tensor, Tensor | None]:
        """The block's output ``(attn_output, attn_weights or None)`` with both projections through ``site``.

        ``site(name, a, W, b, roles, part)`` evaluates ``a W[part]^T + b[part]`` at the rows' points;
        ``a`` is batch first ``(N, L, E)``.
        """
        call = _SIGNATURE.bind(module, *args, **kwargs)
        call.apply_defaults()
        arg = call.arguments
        query, key, value = arg["query"], arg["key"], arg["value"]
        if query.dim() != 3:
            raise ValueError("nn.MultiheadAttention with unbatched inputs has no batch axis to put rows on")
        self_attention, shared_kv = query is key and key is value, key is value
        if not module.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        E, H = module.embed_dim, module.num_heads
        W, b, roles = module.in_proj_weight, module.in_proj_bias, ("in_weight", "in_bias")

        def project(name: str, a: Tensor) -> Tensor:
            lo, hi = SITES[name]
            return site(name, a, W, b, roles, slice(lo * E, hi * E))

        if self_attention:
            q, k, v = project("in", query).chunk(3, dim=-1)
        elif shared_kv:
            q, (k, v) = project("q", query), project("kv", key).chunk(2, dim=-1)
        else:
            q, k, v = project("q", query), project("k", key), project("v", value)
        N, L, S, d = q.shape[0], q.shape[1], k.shape[1], E // H
        qh, kh, vh = (x.reshape(N, -1, H, d).transpose(1, 2) for x in (q, k, v))  # (N, H, length, d)
        scores = (qh * math.sqrt(1.0 / d)) @ kh.transpose(-2, -1)  # (N, H, L, S)
        mask = _mask(arg["attn_mask"], arg["key_padding_mask"], N, H, L, S, scores.dtype)
        weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        o = (weights @ vh).transpose(1, 2).reshape(N, L, E)
        out = site("out", o, module.out_proj.weight, module.out_proj.bias, ("out_weight", "out_bias"))
        if not module.batch_first:
            out = out.transpose(0, 1)
        if not arg["need_weights"]:
            return out, None
        return out, (weights.mean(dim=1) if arg["average_attn_weights"] else weights)

    def reduce(self, module: nn.Module, role: str, calls: dict[str, Any], owner: Tensor,
               buckets: list[tuple[Tensor, Tensor]], O: int, out: Tensor) -> None:
        """A role's Jacobian from its sites' factors (``calls``: ``site -> [(delta, input), ...]``)."""
        E, bias = module.embed_dim, role.endswith("bias")
        if role.startswith("out"):
            reduce_linear(bias, calls.get("out", []), owner, buckets, O, out, E, E)
            return
        sites = [s for s in SITES if calls.get(s)]
        if sites == ["in"]:  # self-attention only: one site covers every row of W_in
            reduce_linear(bias, calls["in"], owner, buckets, O, out, 3 * E, E)
            return
        width = 1 if bias else E
        rows = out.view(out.shape[0], O, 3 * E, width)
        out.zero_()
        for name in sites:
            lo, hi = SITES[name]
            part = torch.empty(out.shape[0], O, (hi - lo) * E * width, dtype=out.dtype, device=out.device)
            reduce_linear(bias, calls[name], owner, buckets, O, part, (hi - lo) * E, E)
            rows[:, :, lo * E:hi * E] += part.view(out.shape[0], O, -1, width)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (``True``: left out) as ``-inf``/``0``; a floating mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, N: int, H: int, L: int, S: int,
          dtype: torch.dtype) -> Tensor | None:
    """The additive mask ``M`` broadcast as ``(N, H, L, S)``, as ``nn.MultiheadAttention`` merges it."""
    mask = None
    if attn_mask is not None:
        m = _additive(attn_mask, dtype)
        mask = m.reshape(1, 1, L, S) if m.dim() == 2 else m.reshape(N, H, L, S)
    if key_padding_mask is not None:
        k = _additive(key_padding_mask, dtype).reshape(N, 1, 1, S)
        mask = k if mask is None else mask + k
    return mask


register_layer_rule(nn.MultiheadAttention, MultiheadAttentionRule())
