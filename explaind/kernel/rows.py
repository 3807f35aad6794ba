r"""Batched evaluation of :math:`g` and its derivative along the segment, rows from many steps at once.

The replica and the adaptive rule need, for many *rows* :math:`e = (s_e, x_e, t_e)`,

.. math::

    h_e = g(\theta_{s_e} + t_e \Delta\theta_{s_e}, x_e), \qquad
    h'_e = \nabla_\theta g(\theta_{s_e} + t_e \Delta\theta_{s_e}, x_e)\, \Delta\theta_{s_e}
         = \frac{\partial h_e}{\partial t_e}.

The generic way (:class:`~explaind.kernel.functional.StepStack`) gives every row its own copy of
the parameters inside ``vmap``, i.e. ``D`` numbers per row. When every trainable parameter lies in
an ``nn.Linear`` or ``nn.Embedding`` (see :func:`~explaind.kernel.factored.covered_parameters`),
each layer is affine in its parameters: at row :math:`e` a linear layer computes
:math:`W_{s_e} a + b_{s_e} + t_e(\Delta W_{s_e} a + \Delta b_{s_e})` and an embedding
:math:`E_{s_e}[k] + t_e \Delta E_{s_e}[k]`. :class:`RowEvaluator` runs all rows as *one batch*
through the model, a forward hook replacing each covered layer's output by that expression
(rows sorted by step, one pair of matrix products per step present; embeddings gather from the
stacked tables), and takes :math:`h'` by forward-mode differentiation with respect to the
per-row :math:`t` (:func:`torch.func.jvp`, tangent 1). No parameters are copied per row.

Valid when the rows of a batch do not interact and each layer keeps the batch axis first;
:meth:`RowEvaluator.build` checks the result against ``StepStack`` on a probe before use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp

from .factored import CHECK_TOLERANCE, LayerHooks, covered_parameters
from .functional import Explained, FunctionalModel, Params, StepStack

__all__ = ["RowEvaluator"]


class _StepRows(LayerHooks):
    """Forward hooks: each covered layer's output at the rows' own steps and segment points."""

    def __init__(self, layers: Mapping[str, nn.Module], covered: Mapping[str, tuple[str, str]]):
        super().__init__(layers)
        self.param_of = {(prefix, role): name for name, (prefix, role) in covered.items()}
        self.base: Params = {}
        self.delta: Params = {}
        self.sidx: Tensor | None = None
        #: (step of each block of rows, padded slot -> row (E = padding), row -> padded slot)
        self.layout: tuple[Tensor, Tensor, Tensor] | None = None

    def _stack(self, prefix: str, role: str, current: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Stacked base and delta ``(S, *shape)`` of a layer parameter (a frozen one: its value, no delta)."""
        name = self.param_of.get((prefix, role))
        if name is None:
            return (None if current is None else current.unsqueeze(0)), None
        return self.base[name], self.delta[name]

    def _hook(self, prefix: str) -> Any:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
            a = inputs[0]
            t = self._rows_t(prefix, output)
            n = t.shape[0]
            if type(mod) is nn.Embedding:
                table, moved = self._stack(prefix, "table", mod.weight)
                sel = self.sidx.reshape(n, *([1] * (a.dim() - 1)))
                sel_base = sel if table.shape[0] > 1 else torch.zeros_like(sel)
                z = table[sel_base, a]
                return z if moved is None else z + t * moved[sel, a]
            W, dW = self._stack(prefix, "weight", mod.weight)
            b, db = self._stack(prefix, "bias", mod.bias)
            lead = a.shape[:-1]
            z = self._per_step(a.reshape(n, -1, a.shape[-1]), W, b)
            if dW is not None:
                z = z + t.reshape(n, 1, 1) * self._per_step(a.reshape(n, -1, a.shape[-1]), dW, db)
            elif db is not None:
                z = z + t.reshape(n, 1, 1) * db.index_select(0, self.sidx).unsqueeze(1)
            return z.reshape(*lead, z.shape[-1])

        return hook


    def _per_step(self, a: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        """``a (E, R, in)`` through ``W[s_e] (out, in)`` and ``b[s_e]`` per row: one padded ``bmm``.

        Rows are grouped by step into blocks of at most ``C`` rows, ``(blocks, C * R, in)`` (padding
        rows are zero), so the cost is one product per layer whatever the number of steps.
        """
        E, R, n_in = a.shape
        block_step, pad, slot = self.layout
        if W.shape[0] == 1:  # frozen: the same matrix for every row
            z = a @ W[0].transpose(0, 1)
        else:
            Ws = W.index_select(0, block_step)
            padded = torch.cat([a, a.new_zeros(1, R, n_in)]).index_select(0, pad).reshape(Ws.shape[0], -1, n_in)
            z = torch.bmm(padded, Ws.transpose(1, 2)).reshape(-1, R, W.shape[1]).index_select(0, slot)
        if b is not None:
            z = z + (b[0] if b.shape[0] == 1 else b.index_select(0, self.sidx).unsqueeze(1))
        return z


class RowEvaluator:
    """:math:`h_e` and :math:`h'_e` for rows ``(step, input, t)`` of stacked steps, in one batch per chunk."""

    def __init__(self, fm: FunctionalModel, covered: Mapping[str, tuple[str, str]]):
        self.fm = fm
        prefixes = sorted({p for p, _ in covered.values()})
        self.layers = {p: fm.module.get_submodule(p) for p in prefixes}
        self.hooks = _StepRows(self.layers, covered)
        self.names = tuple(covered)

    @classmethod
    def build(cls, fm: FunctionalModel, names: Sequence[str], base: Params, delta: Params, X: Tensor,
              explained: Explained) -> tuple[RowEvaluator | None, str]:
        """The evaluator (or ``None``) and, when ``None``, the reason.

        ``base`` and ``delta`` are stacked over at least one step (``name -> (S, *shape)``). The
        probe rows (every step with the first two inputs at two points) must match
        :meth:`~explaind.kernel.functional.StepStack.jvp_along_delta` within
        :data:`~explaind.kernel.factored.CHECK_TOLERANCE`.
        """
        covered = covered_parameters(fm.module, names)
        missing = [n for n in names if n not in covered]
        if missing:
            return None, f"parameters outside nn.Linear/nn.Embedding layers: {', '.join(missing[:5])}"
        this = cls(fm, covered)
        S, n = next(iter(base.values())).shape[0], min(2, X.shape[0])
        sidx = torch.arange(S, device=X.device).repeat_interleave(2 * n)
        idx = torch.arange(n, device=X.device).repeat(2 * S)
        t = torch.tensor([0.3, 0.8], dtype=fm.dtype, device=fm.device).repeat_interleave(n).repeat(S)
        try:
            got = this.evaluate(base, delta, explained, X, sidx, idx, t, chunk=len(t))
        except Exception as exc:  # an unsupported layer or operation: use the generic path
            return None, f"the batched rows failed: {exc}"
        want = StepStack(fm, explained, base, delta, X).jvp_along_delta(sidx, idx, t)
        tol = CHECK_TOLERANCE.get(fm.dtype, 1e-4)
        for label, g, w in zip(("values", "derivatives"), got, want):
            err = float((g - w).abs().max())
            if not err <= tol * max(float(w.abs().max()), 1e-30):
                return None, f"the start-up check failed: {label} differ from the generic path by {err:.3g}"
        return this, ""

    def evaluate(self, base: Params, delta: Params, explained: Explained, X: Tensor, sidx: Tensor, idx: Tensor,
                 t: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        r"""``(h, h')`` of shape ``(E, O)`` for rows ``(sidx, idx, t)`` (each ``(E,)``).

        ``base``/``delta`` map names to stacked ``(S, *shape)`` tensors; ``X``/``explained.aux``
        are indexed by ``idx``. ``chunk`` bounds the rows per batch.
        """
        E = t.shape[0]
        order = torch.argsort(sidx, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(E, device=order.device)
        s_sorted, i_sorted, t_sorted = sidx[order], idx[order], t[order]
        prim, tang = [], []
        for lo in range(0, E, max(1, chunk)):
            hi = min(E, lo + chunk)
            p, d = self._batch(base, delta, explained, X[i_sorted[lo:hi]], explained.aux[i_sorted[lo:hi]],
                               s_sorted[lo:hi], t_sorted[lo:hi])
            prim.append(p)
            tang.append(d)
        primal, tangent = torch.cat(prim), torch.cat(tang)
        return primal[inverse], tangent[inverse]

    def _batch(self, base: Params, delta: Params, explained: Explained, x: Tensor, aux: Tensor, sidx: Tensor,
               t: Tensor) -> tuple[Tensor, Tensor]:
        hooks = self.hooks
        E = sidx.shape[0]
        steps, counts = torch.unique_consecutive(sidx, return_counts=True)  # rows are sorted by step
        C = max(1, -(-E // steps.shape[0]))  # rows per block: the mean per step (little padding)
        blocks = -(-counts // C)  # blocks per step
        block_step = torch.repeat_interleave(steps, blocks)
        first_block = torch.cumsum(blocks, 0) - blocks
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.repeat_interleave(torch.arange(steps.shape[0], device=sidx.device), counts)
        rank = torch.arange(E, device=sidx.device) - starts[pos]
        slot = (first_block[pos] + rank // C) * C + rank % C
        pad = torch.full((block_step.shape[0] * C,), E, dtype=torch.long, device=sidx.device)
        pad[slot] = torch.arange(E, device=sidx.device)
        hooks.layout = (block_step, pad, slot)
        hooks.base, hooks.delta, hooks.sidx = base, delta, sidx
        first = {n: v[int(steps[0])] for n, v in base.items()}  # any parameters: covered outputs are replaced

        def along(tt: Tensor) -> Tensor:
            hooks.t = tt
            return explained(self.fm, first, x, aux)

        try:
            with hooks:
                return jvp(along, (t,), (torch.ones_like(t),))
        finally:
            hooks.t = None
            hooks.base, hooks.delta, hooks.layout = {}, {}, None
