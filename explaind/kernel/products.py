r"""Per-coordinate products summed over steps: :math:`P = \sum_s \Phi_s \odot v_s` on a parameter block.

Keeping the ``param`` axis but not ``step`` needs, per test input and output, only the sum over
steps of :math:`\Phi_s(x)[o, p]\, v_s[p]` (``v_s`` a part of the update, e.g. :math:`\Delta\theta_s`).
:class:`JacobianProducts` forms :math:`\Phi_s` with any evaluator and adds :math:`\Phi_s \odot v_s` in
one pass. :class:`FactorProducts` never forms :math:`\Phi_s` for the weight of a linear layer: with
the weighted output gradients :math:`\delta` and layer inputs :math:`a` of every entry ``e`` (step,
node, position),

.. math::

    P_W[x, i, o, j] = \sum_e \delta_e[o, x, i]\; a_e[x, j]\, v_e[i, j]
                    = \big(G[x, i] H[x, i]\big)[o, j],

a batched matrix product whose inner dimension runs over the entries of many steps at once
(:math:`G[x, i] \in \mathbb{R}^{O \times E}`, :math:`H[x, i] \in \mathbb{R}^{E \times in}`, blocks bounded by
``block_elements``), so the work per step carries no factor ``O`` in memory traffic. Other roles
(embedding tables, other rules) and steps whose inputs do not share the number of nodes go
through :math:`\Phi_s`; a bias adds :math:`\sum_e \delta_e[o, x, i]\, v_e[i]` directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .evaluate import Segment
from .layer_rules import LinearRule
from .layout import ParamLayout
from .quadrature import NodePlan

__all__ = ["JacobianProducts", "FactorProducts"]

#: Default bound on the numbers in one block of ``H`` factors.
BLOCK_ELEMENTS = 2**24


class JacobianProducts:
    r""":math:`\sum_s \Phi_s \odot v_s` from the evaluator's Jacobians, ``(T, O, D_b)``."""

    def __init__(self, evaluator: Any, block: ParamLayout, T: int, O: int, chunk: int, dtype: torch.dtype,
                 device: torch.device):
        self.evaluator, self.block, self.chunk = evaluator, block, chunk
        self.total = torch.zeros(T, O, block.size, dtype=dtype, device=device)
        self._phi: Tensor | None = None

    def add(self, segment: Segment, plan: NodePlan, v: Tensor) -> None:
        """Add :math:`\\Phi_s \\odot v` for the step of ``segment`` (``v`` flat, ``(D_b,)``)."""
        if self._phi is None:
            self._phi = torch.empty_like(self.total)
        phi = self.evaluator.jacobian(segment, plan, self.block, self.chunk, out=self._phi)
        self.total.addcmul_(phi, v)

    def result(self) -> Tensor:
        """The sum so far, ``(T, O, D_b)``."""
        return self.total


class _WeightBlock:
    """Columns of ``G (T_c, out, O, E)`` and ``H (T_c, out, E, in)`` of one linear weight, multiplied when full."""

    def __init__(self, T: int, O: int, n_out: int, n_in: int, columns: int, like: Tensor):
        self.columns, self.used = columns, 0
        self.G = torch.empty(T, n_out, O, columns, dtype=like.dtype, device=like.device)
        self.H = torch.empty(T, n_out, columns, n_in, dtype=like.dtype, device=like.device)
        self.acc = torch.zeros(T, n_out, O, n_in, dtype=like.dtype, device=like.device)

    def add(self, g: Tensor, a: Tensor, v: Tensor) -> None:
        """``g (T_c, out, O, c)`` weighted output gradients, ``a (T_c, c, in)`` inputs, ``v (out, in)``."""
        c = g.shape[-1]
        if self.used + c > self.columns:
            self.flush()
        if c > self.columns:  # wider than a block: multiply at once
            self._multiply(g, a[:, None] * v[None, :, None, :])
            return
        cols = slice(self.used, self.used + c)
        self.G[..., cols].copy_(g)
        torch.mul(a.unsqueeze(1), v[None, :, None, :], out=self.H[:, :, cols, :])
        self.used += c

    def flush(self) -> None:
        if self.used:
            self._multiply(self.G[..., :self.used], self.H[:, :, :self.used, :])
            self.used = 0

    def _multiply(self, G: Tensor, H: Tensor) -> None:
        T, n_out, O, n_in = self.acc.shape
        self.acc.view(T * n_out, O, n_in).baddbmm_(G.reshape(T * n_out, O, -1), H.reshape(T * n_out, -1, n_in))


class FactorProducts(JacobianProducts):
    r""":math:`\sum_s \Phi_s \odot v_s` from layer factors, linear weights in blocks of entries (module docstring).

    Parameters
    ----------
    evaluator : LayerEvaluator
    block : ParamLayout
    T, O : int
    chunk : int
        Test inputs per batch of entries.
    block_elements : int
        Bound on the numbers of one block of ``H`` factors per weight and input chunk.
    """

    def __init__(self, evaluator: Any, block: ParamLayout, T: int, O: int, chunk: int, dtype: torch.dtype,
                 device: torch.device, block_elements: int = BLOCK_ELEMENTS):
        super().__init__(evaluator, block, T, O, chunk, dtype, device)
        self.T, self.O, self.block_elements = T, O, block_elements
        linear = {name for name, used in evaluator.uses.items()  # tied parameters go through Phi
                  if len(used) == 1 and isinstance(evaluator.rules[used[0][0]], LinearRule)}
        self.weights = {name: sl for name, sl in block.slices() if name in linear
                        and evaluator.covered[name][1] == "weight"}
        self.biases = {name for name in block.names if name in linear and evaluator.covered[name][1] == "bias"}
        #: weights stored ``(in, out)``
        self.transposed = {name for name in self.weights if evaluator.rules[evaluator.covered[name][0]].transposed}
        self.blocks: dict[tuple[str, int], _WeightBlock] = {}
        self._scratch: dict[str, Tensor] = {}

    def add(self, segment: Segment, plan: NodePlan, v: Tensor) -> None:
        ev = self.evaluator
        uniform = bool((plan.w != 0).all())
        if not (uniform and ev.ready_for_jacobian(segment) and ev.covers(self.block)):
            super().add(segment, plan, v)
            return
        Q = plan.w.shape[1]
        chunk = max(self.chunk, ev.fallback.rows_chunk)  # no parameters are copied per entry
        for lo in range(0, self.T, chunk):
            factors, owner, mask, _ = ev.entry_factors(segment, plan.t, plan.w, slice(lo, lo + chunk))
            Tc = mask.shape[0]
            rows = slice(lo, lo + Tc)
            for name, sl in self.block.slices():
                prefix = ev.covered[name][0]
                vv = v[sl]
                if name in self.weights:
                    module, rule = ev.layers[prefix], ev.rules[prefix]
                    n_out, n_in = rule.dims(module)
                    v_w = rule.matrix(vv.reshape(n_in, n_out) if rule.transposed else vv.reshape(n_out, n_in))
                    for d, a in factors[prefix]:  # (O, E, R, out), (E, R, in) per call of the layer
                        g = d.reshape(self.O, Tc, -1, d.shape[-1]).permute(1, 3, 0, 2)  # (T_c, out, O, Q R)
                        self._weight_block(name, lo, Tc, n_out, n_in).add(g, a.reshape(Tc, -1, a.shape[-1]), v_w)
                    continue
                if name in self.biases:  # P_b[x, o, i] = sum_e delta_e[o, x, i] v[i]
                    for d, _ in factors[prefix]:
                        self.total[rows, :, sl].addcmul_(d.reshape(self.O, Tc, -1, d.shape[-1]).sum(2).transpose(0, 1),
                                                         vv)
                    continue
                scratch = self._scratch.get(name)
                if scratch is None or scratch.shape[0] != Tc:
                    scratch = self._scratch[name] = torch.empty(Tc, self.O, sl.stop - sl.start, dtype=v.dtype,
                                                                device=v.device)
                buckets = [(torch.arange(Tc, device=v.device), torch.arange(Tc * Q, device=v.device).reshape(Tc, Q))]
                ev.reduce_parameter(name, factors, owner, buckets, self.O, scratch)
                self.total[rows, :, sl].addcmul_(scratch, vv)

    def _weight_block(self, name: str, lo: int, Tc: int, n_out: int, n_in: int) -> _WeightBlock:
        key = (name, lo)
        if key not in self.blocks:
            columns = max(1, min(512, self.block_elements // max(1, Tc * n_out * n_in)))
            self.blocks[key] = _WeightBlock(Tc, self.O, n_out, n_in, columns, self.total)
        return self.blocks[key]

    def result(self) -> Tensor:
        for (name, lo), wb in self.blocks.items():
            wb.flush()
            sl = self.weights[name]
            Tc = wb.acc.shape[0]
            acc = wb.acc.permute(0, 2, 1, 3)  # (T_c, O, out, in)
            if name in self.transposed:
                acc = acc.transpose(2, 3)
            self.total[lo:lo + Tc, :, sl] += acc.reshape(Tc, self.O, -1)
            wb.acc.zero_()
        return self.total
