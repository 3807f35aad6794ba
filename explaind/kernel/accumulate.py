r"""Result tensors of an influence query and the additions the algorithms make to them.

For kept axes ``K`` (a subset of ``step, group, param, train``; ``group`` and ``param``
exclusive) the engine fills, in canonical axis order,

* ``values``          ``(T, *K, O)``: the data (kernel) part :math:`\sum \varphi_s(x)[o,p] D_{s,k}[p]`;
* ``regularization``  ``(T, *K \ {train}, O)``: :math:`\varphi_s(x) R_s` (weight decay);
* ``residual``        ``(T, *K \ {train}, O)``: :math:`\varphi_s(x) E_s` (unmodelled update);
* ``initial_state``   ``(T, *K \ {train}, O)``: the part carried by the optimizer's buffers from before step 0;
* ``estimate``        ``(T, S, O)``: the quadrature estimate of each step (all parts together),

and the quadrature error follows as ``exact - estimate``. Contributions arrive per step (or summed
over steps by the reverse sweep, ``s=None``), per contiguous test chunk ``rows`` and per parameter
:class:`Block` as coordinate-resolved tensors ``(T_c, O, D_b)`` that are reduced here to the kept
axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .attribution import AXES
from .layout import ParamLayout

__all__ = ["Block", "Accumulators", "make_blocks"]


@dataclass(frozen=True)
class Block:
    """A run of whole parameter tensors: its layout, flat offset and index of its first tensor."""

    layout: ParamLayout
    offset: int
    first_group: int

    def groups(self) -> list[tuple[int, slice]]:
        """``(global group index, slice within the block)`` of each tensor."""
        return [(self.first_group + j, sl) for j, (_, sl) in enumerate(self.layout.slices())]


def make_blocks(layout: ParamLayout, max_size: int | None) -> list[Block]:
    """Split ``layout`` into :class:`Block` s of at most ``max_size`` coordinates (whole tensors)."""
    out, offset, group = [], 0, 0
    for sub in layout.blocks(max_size):
        out.append(Block(sub, offset, group))
        offset += sub.size
        group += len(sub)
    return out


class Accumulators:
    """Zero-initialised result tensors for ``keep`` and the reductions into them.

    Parameters
    ----------
    keep : sequence of str
        Kept axes (any order; stored canonically).
    T, O : int
        Test inputs and outputs.
    window : (int, int)
        Step window.
    layout : ParamLayout
        All trainable parameters.
    n_train : int
        Size of the ``train`` axis.
    """

    def __init__(self, keep: Sequence[str], T: int, O: int, window: tuple[int, int], layout: ParamLayout,
                 n_train: int, dtype: torch.dtype, device: torch.device):
        self.canon = tuple(a for a in AXES if a in keep)
        self.start, self.stop = window
        S = self.stop - self.start
        sizes = {"step": S, "group": len(layout), "param": layout.size, "train": n_train}
        kw = {"dtype": dtype, "device": device}
        self.values = torch.zeros(T, *[sizes[a] for a in self.canon], O, **kw)
        side = [sizes[a] for a in self.canon if a != "train"]
        self.regularization = torch.zeros(T, *side, O, **kw)
        self.residual = torch.zeros(T, *side, O, **kw)
        self.initial_state = torch.zeros(T, *side, O, **kw)
        self.estimate = torch.zeros(T, S, O, **kw)
        self.step = "step" in keep
        self.group = "group" in keep
        self.param = "param" in keep
        self.train = "train" in keep

    @staticmethod
    def result_numel(keep: Sequence[str], T: int, O: int, S: int, layout: ParamLayout, n_train: int) -> int:
        """Number of elements of ``values`` + side tensors for this query (memory planning)."""
        sizes = {"step": S, "group": len(layout), "param": layout.size, "train": n_train}
        vals = T * O
        side = T * O
        for a in keep:
            vals *= sizes[a]
            if a != "train":
                side *= sizes[a]
        return vals + 3 * side + T * S * O

    def _view(self, target: Tensor, s: int | None, rows: slice) -> Tensor:
        view = target[rows]
        if self.step:
            if s is None:
                raise RuntimeError("a per-step contribution needs the step number when 'step' is kept")
            view = view[:, s - self.start]
        return view

    def add_products(self, names: Sequence[str], s: int | None, M: Tensor, V: Sequence[Tensor | None], block: Block,
                     rows: slice) -> None:
        r"""Add ``M ⊙ V[j]`` reduced to the kept axes to the result ``names[j]``.

        ``M (T_c, O, D_b)`` is shared (e.g. :math:`\Phi_s`); each ``V[j]`` is a flat vector ``(D_b,)``
        (``None`` skips). Without ``param`` the reduction is one matrix product for all vectors.
        """
        pairs = [(n, v) for n, v in zip(names, V) if v is not None]
        if not pairs:
            return
        if self.param:
            for name, v in pairs:
                view = self._view(getattr(self, name), s, rows)
                view[:, block.offset:block.offset + block.layout.size] += (M * v).transpose(1, 2)
            return
        Tc, O, Db = M.shape
        Vm = torch.stack([v for _, v in pairs], dim=1)  # (D_b, k)
        if self.group:
            for g, sl in block.groups():
                R = (M[..., sl].reshape(Tc * O, -1) @ Vm[sl]).reshape(Tc, O, -1)
                for j, (name, _) in enumerate(pairs):
                    self._view(getattr(self, name), s, rows)[:, g] += R[..., j]
            return
        R = (M.reshape(Tc * O, Db) @ Vm).reshape(Tc, O, -1)
        for j, (name, _) in enumerate(pairs):
            view = self._view(getattr(self, name), s, rows)
            view += R[..., j]

    def add_coordinates(self, name: str, M: Tensor, block: Block, rows: slice) -> None:
        """Add per-coordinate contributions summed over steps, ``M (T_c, O, D_b)``, to ``name`` (``param`` kept)."""
        if self.step or not self.param:
            raise RuntimeError("per-coordinate sums over steps need 'param' kept and 'step' not kept")
        view = getattr(self, name)[rows]
        view[:, block.offset:block.offset + block.layout.size] += M.transpose(1, 2)

    def add_totals(self, name: str, s: int, E: Tensor, rows: slice) -> None:
        """Add an already reduced contribution ``(T_c, [G], O)`` (forward-mode path)."""
        view = self._view(getattr(self, name), s, rows)
        view += E

    def add_train(self, s: int | None, C: Tensor, G: Tensor, samples: Tensor, block: Block, rows: slice) -> None:
        r"""Add :math:`\sum_p C[t,o,p]\, G[k,p]` to ``values`` at train positions ``samples``.

        ``C (T_c, O, D_b)``, ``G (K, D_b)``, ``samples (K,)`` (repeats add up).
        """
        if G.shape[0] == 0:
            return
        view = self._view(self.values, s, rows)
        Tc, O, Db = C.shape
        if self.param:
            E = C.transpose(1, 2)[:, :, None, :] * G.T[None, :, :, None]  # (T_c, D_b, K, O)
            view[:, block.offset:block.offset + Db].index_add_(2, samples, E)
        elif self.group:
            for g, sl in block.groups():
                E = (C[..., sl].reshape(Tc * O, -1) @ G[:, sl].T).reshape(Tc, O, -1)
                view[:, g].index_add_(1, samples, E.transpose(1, 2))
        else:
            E = (C.reshape(Tc * O, Db) @ G.T).reshape(Tc, O, -1)
            view.index_add_(1, samples, E.transpose(1, 2))

    def contract(self, s: int | None, M: Tensor, block: Block, rows: slice, *, G: Tensor | None = None,
                 samples: Tensor | None = None, vectors: Sequence[tuple[str, Tensor]] = (),
                 estimate: tuple[int, Tensor] | None = None) -> None:
        r"""All contractions of one shared ``M (T_c, O, D_b)`` at once.

        Adds :math:`M \cdot G_k` to ``values`` at train positions ``samples`` (``G (K, D_b)``),
        ``M ⊙ v`` reduced to the kept axes to each named result, and, for ``estimate = (step, v)``,
        :math:`M v` to the quadrature estimate of that step. Without ``param`` this is a single
        matrix product with every column stacked, so ``M`` is read once.
        """
        if self.param:
            if G is not None:
                self.add_train(s, M, G, samples, block, rows)
            self.add_products([n for n, _ in vectors], s, M, [v for _, v in vectors], block, rows)
            if estimate is not None:
                Tc, O, Db = M.shape
                self.add_estimate(estimate[0], (M.reshape(Tc * O, Db) @ estimate[1]).reshape(Tc, O), rows)
            return
        Tc, O, Db = M.shape
        K = 0 if G is None else G.shape[0]
        cols = ([G.T] if K else []) + [v[:, None] for _, v in vectors]
        if estimate is not None:
            cols.append(estimate[1][:, None])
        C = torch.cat(cols, dim=1)  # (D_b, K + k [+ 1])
        parts = block.groups() if self.group else [(None, slice(0, Db))]
        est_total = None
        for g, sl in parts:
            R = (M[..., sl].reshape(Tc * O, -1) @ C[sl]).reshape(Tc, O, -1)
            if K:
                view = self._view(self.values, s, rows)
                view = view[:, g] if g is not None else view
                view.index_add_(1, samples, R[..., :K].transpose(1, 2))
            for j, (name, _) in enumerate(vectors):
                view = self._view(getattr(self, name), s, rows)
                if g is not None:
                    view[:, g] += R[..., K + j]
                else:
                    view += R[..., K + j]
            if estimate is not None:
                est_total = R[..., -1] if est_total is None else est_total + R[..., -1]
        if estimate is not None:
            self.add_estimate(estimate[0], est_total, rows)

    def add_estimate(self, s: int, E: Tensor, rows: slice) -> None:
        """Add to the quadrature estimate of step ``s``, ``E (T_c, O)``."""
        self.estimate[rows, s - self.start] += E

    def quadrature_error(self, exact: Tensor) -> Tensor:
        """``exact (T, S, O) - estimate``; summed over steps unless ``step`` is kept."""
        err = exact - self.estimate
        return err if self.step else err.sum(1)
