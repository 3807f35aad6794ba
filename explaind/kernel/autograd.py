r"""The ``torch.func`` evaluator: the three primitives for any model.

* JVPs with :func:`torch.func.jvp`: at one node shared by a set of inputs (parameters not batched,
  the inputs one batch), on a grid of nodes (``vmap`` over nodes, and over stacked steps; for
  convolutional models on the CPU one call per step and node, :data:`PER_NODE_LAYERS`), or on
  rows that each have their own point of a segment (``vmap`` over rows, parameters gathered per row);
* Jacobians with :func:`torch.func.jacrev` with respect to a common offset of the block, the
  quadrature weights folded into the differentiated outputs (with :attr:`AutogradEvaluator.forward_jacobians`,
  :func:`torch.func.jacfwd`: for models whose backward is not the derivative of the forward,
  :mod:`~explaind.kernel.adjoint`);
* per-sample gradients with ``vmap(grad(loss), chunk_size=...)``, their sum with one ``grad``.

Every call is chunked by ``chunk_size`` (rows, pairs or samples per ``vmap``). A ``vmap`` over rows or (input,
node) pairs holds copies of all the parameters per row (its point on the segment, the gathered base and step, the
forward-mode duals): such calls also take at most :data:`~explaind.kernel.evaluate.STACK_BYTES` of them
(:meth:`AutogradEvaluator.rows_per_call`), one row at a time for a model of more than ``STACK_BYTES / 4`` bytes
(8.4M float64 parameters), where 256 rows of a full-width ResNet-18 would take 92 GB.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jacfwd, jacrev, jvp, vmap

from ..models import EAGER_RANDOM_BACKENDS, compile_backend
from .coupled import coupled_sample_grads
from .evaluate import STACK_BYTES, Batch, Grid, Rows, Segment, StepStack, along, node_groups, rows_for_outputs
from .explained import FunctionalModel, Params
from .fused_jvp import fused_jvp
from .layout import ParamLayout
from .products import JacobianProducts
from .quadrature import NodePlan

__all__ = ["AutogradEvaluator", "PER_NODE_LAYERS"]

#: On the CPU, grids of models holding these layers are evaluated one (step, node) at a time with the
#: parameters shared by the batch of test inputs: under ``vmap`` over per-node parameters a convolution
#: runs as a grouped convolution, 2-4x slower per evaluation in float64 than one call per node
#: (``python benchmarks/bench_kink_dense.py --per-eval``; docs/engine.md, sections 2 and 7).
PER_NODE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Copies of all the parameters one row of a ``vmap`` over rows holds: the gathered base and step, the point on
#: the segment and its forward-mode dual (a ``vmap`` over tangents adds one per tangent).
ROW_COPIES = 4


def _along_each(along: Callable[[Params], Tensor], tangents: Params) -> Tensor:
    """``along(v)`` for each tangent of ``name -> (K, *shape)``, stacked first (no ``vmap`` when ``K = 1``)."""
    if next(iter(tangents.values())).shape[0] == 1:
        return along({n: v[0] for n, v in tangents.items()}).unsqueeze(0)
    return vmap(along)(tangents)


def _jvp(fn: Callable[[Params], Tensor], point: Params, tangent: Params) -> tuple[Tensor, Tensor]:
    """``jvp`` of ``fn`` at ``point`` along ``tangent``; entries of ``point`` without a tangent (buffers) held fixed."""
    rest = {n: v for n, v in point.items() if n not in tangent}
    return jvp(lambda p: fn({**rest, **p}), ({n: point[n] for n in tangent},), (tangent,))


def _split(point: Params, names: Sequence[str]) -> tuple[Params, Params]:
    block = {n: point[n] for n in names}
    return block, {n: v for n, v in point.items() if n not in block}


class AutogradEvaluator:
    """The primitives of :class:`~explaind.kernel.evaluate.Evaluator` by ``torch.func`` transforms.

    Parameters
    ----------
    fm : FunctionalModel
    chunk_size : int or None
        Rows, (input, node) pairs or samples per ``vmap`` call (``None``: all at once).
    rows_chunk : int, optional
        Rows per batch of evaluators that copy no parameters per row (default 16 x ``chunk_size``).
    """

    name = "autograd"

    def __init__(self, fm: FunctionalModel, chunk_size: int | None, rows_chunk: int | None = None):
        self.fm = fm
        self.chunk_size = chunk_size
        self.rows_chunk = rows_chunk or 16 * (chunk_size or 256)
        #: bytes of outputs one evaluation may hold (``None``: ``evaluate.OUTPUT_BYTES``), set by the engine
        self.output_bytes: int | None = None
        #: grids by one JVP per (step, node) (:data:`PER_NODE_LAYERS`), else one ``vmap`` over steps and nodes
        self.per_node = fm.device.type == "cpu" and any(isinstance(m, PER_NODE_LAYERS) for m in fm.module.modules())
        #: the per-node JVPs fuse convolutions with forward-mode dual tensors, which the code a compiling
        #: ``torch.compile`` backend (inductor) generates cannot carry (its ``out=`` kernels have no forward AD);
        #: such a model takes ``torch.func.jvp``, which runs it as eager PyTorch
        self.fused = not any(compile_backend(m) not in (None, *EAGER_RANDOM_BACKENDS) for m in fm.module.modules())
        #: Jacobians by forward mode (``jacfwd``: one JVP per entry of the block) instead of ``jacrev``, for a model
        #: whose backward is not the derivative of its forward (set by the engine, explaind/kernel/adjoint.py)
        self.forward_jacobians = False

    def rows_per_call(self, n_rows: int, n_params: int, copies: int = ROW_COPIES) -> int:
        """Rows per ``vmap`` over rows that each hold ``copies`` copies of ``n_params`` parameters: ``chunk_size``
        (all ``n_rows`` when ``None``), at most :data:`~explaind.kernel.evaluate.STACK_BYTES` of copies, at least 1.
        """
        elem = torch.finfo(self.fm.dtype).bits // 8
        cap = max(1, STACK_BYTES // max(1, copies * elem * n_params))
        return max(1, min(self.chunk_size or n_rows, cap))

    # ------------------------------------------------------------------ JVPs
    def slopes(self, stack: StepStack, rows: Rows | Grid) -> tuple[Tensor, Tensor]:
        """:math:`h, h'` at rows, or on a grid of nodes (see :meth:`Evaluator.slopes`)."""
        if isinstance(rows, Grid):
            return self._slopes_grid(stack, rows.t)
        chunk = min(self.rows_per_call(rows.t.shape[0], sum(v[0].numel() for v in stack.base.values())),
                    rows_for_outputs(stack.explained.n_outputs, self.fm.dtype, self.output_bytes))
        E = rows.t.shape[0]
        h = torch.empty(E, stack.explained.n_outputs, dtype=self.fm.dtype, device=self.fm.device)
        d = torch.empty_like(h)
        for i in range(0, E, chunk):  # written in place: no second copy of every row's outputs
            h[i:i + chunk], d[i:i + chunk] = self._slopes_rows(stack, rows.steps[i:i + chunk],
                                                               rows.inputs[i:i + chunk], rows.t[i:i + chunk])
        return h, d

    def _slopes_rows(self, stack: StepStack, sidx: Tensor, idx: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        fm, explained = self.fm, stack.explained
        b = {n: v[sidx] for n, v in stack.base.items()}
        d = {n: v[sidx] for n, v in stack.delta.items()}

        def one(bp: Params, dp: Params, tj: Tensor, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
            return _jvp(lambda p: explained(fm, p, x.unsqueeze(0), a.unsqueeze(0))[0], along(bp, dp, tj), dp)

        return vmap(one)(b, d, t, stack.X[idx], explained.aux[idx])

    def _slopes_grid(self, stack: StepStack, x: Tensor) -> tuple[Tensor, Tensor]:
        """Grid slopes in batches of at most ``rows_chunk`` rows and :data:`STACK_BYTES` of stacked parameters."""
        if self.per_node:
            return self._grid_per_node(stack, x)
        S, n, T = stack.n_steps, x.shape[0], stack.X.shape[0]
        elem = torch.finfo(self.fm.dtype).bits // 8
        D = sum(v[0].numel() for v in stack.base.values())
        rows = min(self.rows_chunk, rows_for_outputs(stack.explained.n_outputs, self.fm.dtype, self.output_bytes))
        if T > rows:  # more inputs than one call's outputs may take: a slice of them at a time
            h = torch.empty(S, T, n, stack.explained.n_outputs, dtype=self.fm.dtype, device=self.fm.device)
            d = torch.empty_like(h)
            for lo in range(0, T, rows):
                part = StepStack(stack.base, stack.delta, stack.X[lo:lo + rows],
                                 stack.explained.take(slice(lo, lo + rows)))
                hp, dp = self._slopes_grid(part, x)
                h[:, lo:lo + rows], d[:, lo:lo + rows] = hp.reshape(S, -1, n, h.shape[-1]), dp.reshape(S, -1, n,
                                                                                                       h.shape[-1])
            return h.reshape(S * T, n, -1), d.reshape(S * T, n, -1)
        per_node = max(1, min(n, rows // max(1, T)))
        per_step = max(1, min(S, rows // max(1, per_node * T), STACK_BYTES // max(1, per_node * elem * D)))
        hs, ds = [], []
        for lo in range(0, S, per_step):
            part = stack.steps(lo, lo + per_step)
            got = [self._grid(part, x[i:i + per_node]) for i in range(0, n, per_node)]  # (S_c, n_c, T, O)
            hs.append(torch.cat([g[0] for g in got], dim=1))
            ds.append(torch.cat([g[1] for g in got], dim=1))
        h, d = torch.cat(hs), torch.cat(ds)  # (S, n, T, O)
        return h.transpose(1, 2).reshape(S * T, n, -1), d.transpose(1, 2).reshape(S * T, n, -1)

    def _grid_per_node(self, stack: StepStack, x: Tensor) -> tuple[Tensor, Tensor]:
        """Grid slopes by one JVP per (step, node): parameters not batched, the inputs one batch (``rows_chunk``).

        Each JVP is a :func:`~explaind.kernel.fused_jvp.fused_jvp`: a convolution's primal and its kernel's
        tangent in one call.
        """
        fm, explained, X = self.fm, stack.explained, stack.X
        S, n, T = stack.n_steps, x.shape[0], X.shape[0]
        rows = min(self.rows_chunk, rows_for_outputs(explained.n_outputs, self.fm.dtype, self.output_bytes))
        hs, ds = [], []
        for s in range(S):
            b = {k: v[s] for k, v in stack.base.items()}
            d = {k: v[s] for k, v in stack.delta.items()}
            for t in x:
                point = along(b, d, t)
                for lo in range(0, T, rows):
                    part, aux = X[lo:lo + rows], explained.aux[lo:lo + rows]
                    h, dh = (fused_jvp if self.fused else _jvp)(
                        lambda p, part=part, aux=aux: explained(fm, p, part, aux), point, d)
                    hs.append(h)
                    ds.append(dh)
        h, d = torch.cat(hs).reshape(S, n, T, -1), torch.cat(ds).reshape(S, n, T, -1)
        return h.transpose(1, 2).reshape(S * T, n, -1), d.transpose(1, 2).reshape(S * T, n, -1)

    def _grid(self, stack: StepStack, t: Tensor) -> tuple[Tensor, Tensor]:
        """One ``vmap`` over stacked steps of a ``vmap`` over nodes; the inputs one batch inside."""
        fm, explained, X = self.fm, stack.explained, stack.X

        def per_step(b: Params, d: Params) -> tuple[Tensor, Tensor]:
            def at(tu: Tensor) -> tuple[Tensor, Tensor]:
                return _jvp(lambda p: explained(fm, p, X, explained.aux), along(b, d, tu), d)

            return vmap(at)(t)

        return vmap(per_step)(stack.base, stack.delta)

    def jvp(self, segment: Segment, plan: NodePlan, tangents: Params) -> Tensor:
        """Weighted JVPs along ``tangents`` (see :meth:`Evaluator.jvp`): shared nodes in one ``vmap`` over nodes
        (one call per node for :data:`PER_NODE_LAYERS`), ``vals (U, K, S, O)``."""
        T = plan.t.shape[0]
        K = next(iter(tangents.values())).shape[0]
        out = torch.zeros(T, K, plan.exact.shape[-1], dtype=self.fm.dtype, device=self.fm.device)
        groups, (idx, t, w) = node_groups(plan)
        for group in groups:
            step = self.chunk_size or group.inputs.shape[0]
            for i in range(0, group.inputs.shape[0], step):
                part = group.inputs[i:i + step]
                if self.per_node:  # one call per node, parameters shared (PER_NODE_LAYERS)
                    vals = torch.stack([self._jvp_at(segment, tu, tangents, part) for tu in group.t])
                else:
                    vals = vmap(lambda tu, part=part: self._jvp_at(segment, tu, tangents, part))(group.t)
                out.index_add_(0, part, torch.einsum("su,ukso->sko", group.w[i:i + step], vals))
        if idx.shape[0]:
            chunk = self.rows_per_call(idx.shape[0], sum(v.numel() for v in segment.base.values()), ROW_COPIES + K)
            vals = torch.cat([self._jvp_pairs(segment, idx[i:i + chunk], t[i:i + chunk], tangents)
                              for i in range(0, idx.shape[0], chunk)])
            out.index_add_(0, idx, w[:, None, None] * vals)
        return out

    def _jvp_at(self, seg: Segment, t: Tensor, tangents: Params, sub: Tensor) -> Tensor:
        """``(K, S, O)`` at one node ``t`` for inputs ``sub`` (parameters shared, not batched)."""
        X, aux = seg.X[sub], seg.explained.aux[sub]
        point = seg.theta(t)

        def along(v: Params) -> Tensor:
            return _jvp(lambda p: seg.explained(self.fm, p, X, aux), point, v)[1]

        return _along_each(along, tangents)

    def _jvp_pairs(self, seg: Segment, idx: Tensor, t: Tensor, tangents: Params) -> Tensor:
        """``(P, K, O)`` for (input, node) pairs, one ``vmap`` over pairs."""
        def one(tj: Tensor, x: Tensor, a: Tensor) -> Tensor:
            point = seg.theta(tj)

            def along(v: Params) -> Tensor:
                return _jvp(lambda p: seg.explained(self.fm, p, x.unsqueeze(0), a.unsqueeze(0))[0], point, v)[1]

            return _along_each(along, tangents)

        return vmap(one)(t, seg.X[idx], seg.explained.aux[idx])

    # ------------------------------------------------------------------ Jacobians
    def jacobian(self, segment: Segment, plan: NodePlan, block: ParamLayout, chunk: int,
                 out: Tensor | None = None) -> Tensor:
        r""":math:`\Phi_s` on ``block`` (see :meth:`Evaluator.jacobian`).

        All nodes shared by the same inputs are summed inside one reverse pass (no per-node
        Jacobian is stored); the remaining (input, node) pairs go through one ``vmap``.
        """
        T, O = plan.t.shape[0], segment.explained.n_outputs
        names = block.names
        if out is None:
            flat = torch.zeros(T, O, block.size, dtype=self.fm.dtype, device=self.fm.device)
        else:
            flat = out.zero_()
        acc = {name: flat[..., sl] for name, sl in block.slices()}
        full = torch.arange(T, device=self.fm.device)

        def add(rows: Tensor, jac: Params) -> None:
            whole = rows.shape[0] == T and bool((rows == full).all())
            for name in names:
                j = jac[name].reshape(rows.shape[0], O, -1)
                if whole:
                    acc[name] += j
                else:
                    acc[name].index_add_(0, rows, j)

        groups, (idx, t, w) = node_groups(plan)
        for group in groups:
            sub = group.inputs
            for i in range(0, sub.shape[0], chunk):
                add(sub[i:i + chunk], self._jac_nodes(segment, group.t, names, sub[i:i + chunk], group.w[i:i + chunk]))
        pairs = min(chunk, self.rows_per_call(idx.shape[0], sum(v.numel() for v in segment.base.values())))
        for i in range(0, idx.shape[0], pairs):
            add(idx[i:i + pairs], self._jac_pairs(segment, idx[i:i + pairs], t[i:i + pairs], names, w[i:i + pairs]))
        return flat

    def _g1(self, seg: Segment, params: Params, x: Tensor, a: Tensor) -> Tensor:
        return seg.explained(self.fm, params, x.unsqueeze(0), a.unsqueeze(0))[0]

    def _jac_nodes(self, seg: Segment, t: Tensor, names: Sequence[str], sub: Tensor, w: Tensor) -> Params:
        r""":math:`\sum_u w_{iu} \nabla_{\theta_b} g(\theta(t_u), x_i)` for inputs ``sub``: ``name -> (S, O, *shape)``.

        Differentiates :math:`\sum_u w_{iu} g(\theta(t_u) + \epsilon, x_i)` with respect to a common
        offset :math:`\epsilon`, a plain loop over nodes inside (parameters never batched).
        """
        points = [_split(seg.theta(tu), names) for tu in t]
        eps0 = {n: torch.zeros_like(seg.base[n]) for n in names}

        def per_input(x: Tensor, a: Tensor, wi: Tensor) -> Params:
            def total(eps: Params) -> Tensor:
                out: Any = 0
                for u, (block, rest) in enumerate(points):
                    out = out + wi[u] * self._g1(seg, {**rest, **{n: block[n] + eps[n] for n in names}}, x, a)
                return out

            return (jacfwd if self.forward_jacobians else jacrev)(total)(eps0)

        return vmap(per_input)(seg.X[sub], seg.explained.aux[sub], w)

    def _jac_pairs(self, seg: Segment, idx: Tensor, t: Tensor, names: Sequence[str], w: Tensor) -> Params:
        """Weighted Jacobians of (input, node) pairs: ``name -> (P, O, *shape)``."""
        def one(tj: Tensor, x: Tensor, a: Tensor, wj: Tensor) -> Params:
            block, rest = _split(seg.theta(tj), names)
            jac = jacfwd if self.forward_jacobians else jacrev
            return jac(lambda b: wj * self._g1(seg, {**rest, **b}, x, a))(block)

        return vmap(one)(t, seg.X[idx], seg.explained.aux[idx], w)

    def products(self, block: ParamLayout, T: int, O: int, chunk: int) -> JacobianProducts:
        r""":math:`\sum_s \Phi_s \odot v_s` from :meth:`jacobian` (see :mod:`~explaind.kernel.products`)."""
        return JacobianProducts(self, block, T, O, chunk, self.fm.dtype, self.fm.device)

    # ------------------------------------------------------------------ per-sample gradients
    def sample_grads(self, theta: Params, block: ParamLayout, batch: Batch, summed: bool = False) -> Tensor:
        r"""Weighted per-sample gradients ``(B, D_b)`` by ``vmap(grad)``; with ``summed`` one ``grad`` of the sum.

        A batch to replay (dropout, batch norm) goes through the batched training forward instead
        (:func:`~explaind.kernel.coupled.coupled_sample_grads`).
        """
        if batch.replay is not None:
            return coupled_sample_grads(self.fm, theta, block, batch, self.chunk_size, summed)
        names = block.names
        params = {n: theta[n] for n in names}
        rest = {n: v for n, v in theta.items() if n not in params}
        if summed:
            return block.flatten(self._summed(params, rest, batch))

        def one(b: Params, x: Tensor, y: Tensor) -> Tensor:
            return self.fm.sample_loss({**rest, **b}, x.unsqueeze(0), y.unsqueeze(0)).sum()

        grads = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=self.chunk_size)(params, batch.X, batch.Y)
        return block.flatten(grads, lead=1) * batch.weights[:, None]

    def _summed(self, params: Params, rest: Params, batch: Batch) -> Params:
        total = {n: torch.zeros_like(v) for n, v in params.items()}
        X, Y, weights = batch.X, batch.Y, batch.weights
        step = X.shape[0] if not self.chunk_size else int(self.chunk_size)
        for lo in range(0, X.shape[0], max(step, 1)):
            sl = slice(lo, lo + step)

            def fn(b: Params, sl: slice = sl) -> Tensor:
                return (self.fm.sample_loss({**rest, **b}, X[sl], Y[sl]) * weights[sl]).sum()

            for n, g in grad(fn)(params).items():
                total[n] += g
        return total
