r"""The decomposition algorithms: the JVP path and the forward and reverse Jacobian sweeps.

A :class:`Query` fixes the test inputs, their quadrature plans, the step window and where its
rows land in the result. Each algorithm walks the steps once and fills
:class:`~explaind.kernel.accumulate.Accumulators` (docs/maths.md §5; docs/engine.md):

**JVP path** (:func:`jvp_path`, ``keep`` within ``{"step", "group"}``)
    each part of :math:`\Delta\theta_s` (data, regularization, residual; per tensor when ``group`` is
    kept, see :mod:`~explaind.kernel.split`) is a tangent and :math:`\varphi_s(x) v` a batch of JVPs
    at the step's nodes: no Jacobian and no per-sample gradient is formed.

**Jacobian sweeps** (``param`` or ``train`` kept): :math:`\Phi_s(x) = \sum_q w_q \nabla_\theta g(\theta_s +
t_q\Delta\theta_s, x)` ``(T, O, D_b)`` is formed once per step and block and contracted with the parts.
The atom of training sample ``k`` at step ``s`` is

.. math::

    D_{s,k} = -P_s \odot \Big[q_s \sum_{i \le s} \Big(\prod_{j=i+1}^{s} a_j\Big) b_i c_i w_{i,k}
              \nabla\ell_k(\theta_i) + n_s c_s w_{s,k} \nabla\ell_k(\theta_s)\Big],

coupled across steps **forward** (:func:`forward_sweep`: a per-sample buffer
:math:`M_s[k] = a_s M_{s-1}[k] + b_s c_s w_{s,k}\nabla\ell_k(\theta_s)`, memory ``O(M D_b)``; needed when
``step`` is kept) or in **reverse** (:func:`reverse_sweep`: a test-side accumulator
:math:`U_i = q_i P_i \Phi_i + a_{i+1} U_{i+1}` swept from the last step back, memory ``O(T O D_b)``).
Both also give the regularization and residual parts and each step's quadrature estimate
:math:`\Phi_s\Delta\theta_s`. Without the split (:func:`update_sweep`, and the JVP path with
``Query.split=False``), the whole update :math:`\Delta\theta_s` is contracted instead: no training data
and no optimizer coefficients are read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .accumulate import Accumulators, Block
from .evaluate import Segment
from .explained import Explained
from .layout import ParamLayout
from .quadrature import NodePlan
from .split import Splitter, coefficients, is_zero, start_buffer, step_batch

__all__ = ["Query", "jvp_path", "update_sweep", "forward_sweep", "reverse_sweep", "seen_samples", "progress_iter",
           "progress_bar"]


def progress_iter(items: Any, enabled: bool, desc: str, total: int | None = None) -> Any:
    """Wrap ``items`` in a tqdm progress bar when ``enabled``."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)


class _NoBar:
    """Stands in for a tqdm bar when progress is off."""

    def update(self, n: int = 1) -> None:
        """Ignore the progress."""

    def close(self) -> None:
        """Nothing to close."""


def progress_bar(enabled: bool, desc: str, total: int, unit: str = "step") -> Any:
    """A tqdm bar counting ``total`` units (updated by the caller) when ``enabled``, else a no-op."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(desc=desc, total=total, unit=unit, leave=False)


@dataclass(frozen=True)
class Query:
    """Test inputs of one decomposition and where they go.

    Attributes
    ----------
    X : Tensor
        Test inputs ``(T_c, ...)``.
    explained : Explained
    plans : list of NodePlan
        One per window step, for these inputs.
    window : (int, int)
        Steps ``start .. stop-1``.
    first : int
        Where the momentum buffers start (:func:`~explaind.kernel.split.momentum_start`).
    rows : slice
        Positions of these inputs in the result.
    jac_chunk : int
        Inputs per Jacobian call.
    split : bool
        Split each update into data, regularization and residual parts (else: the whole update
        goes to ``values``).
    """

    X: Tensor
    explained: Explained
    plans: list[NodePlan]
    window: tuple[int, int]
    first: int
    rows: slice
    jac_chunk: int = 256
    split: bool = True

    def chunk(self, rows: slice) -> Query:
        """The query of the inputs ``rows`` (positions within this one; the result rows follow ``self.rows``)."""
        idx = torch.arange(rows.start, rows.stop, device=self.X.device)
        base = self.rows.start
        return replace(self, X=self.X[rows], explained=self.explained.take(rows),
                       plans=[p.take(idx) for p in self.plans], rows=slice(base + rows.start, base + rows.stop))


def seen_samples(engine: Any, first: int, stop: int) -> Tensor:
    """Distinct training indices of steps ``first .. stop-1`` in order of first appearance (int64)."""
    seen: dict[int, None] = {}
    for s in range(first, stop):
        for k in torch.as_tensor(engine.traj.batch(s)[0]).reshape(-1).tolist():
            seen.setdefault(int(k), None)
    return torch.tensor(list(seen), dtype=torch.long, device=engine.device)


def _segment(engine: Any, s: int, q: Query) -> Segment:
    return Segment(engine.params(s), engine.delta(s), q.X, q.explained)


# ---------------------------------------------------------------------- JVP path
def jvp_path(engine: Any, q: Query, acc: Accumulators, max_tangent_bytes: int) -> None:
    """Fill ``acc`` for ``keep`` within ``{"step", "group"}`` with JVPs along the parts of each update."""
    layout = engine.layout
    G = len(layout)
    init = start_buffer(engine, layout, q.first) if q.split else None
    names = (("values", "regularization", "residual") + (("initial_state",) if init is not None else ())
             if q.split else ("values",))
    per_group = acc.group
    n_tan = len(names) * G if per_group else len(names)
    elem = torch.finfo(engine.dtype).bits // 8
    k_chunk = max(1, min(n_tan, max_tangent_bytes // max(1, elem * layout.size)))
    for s, parts in (_split_parts(engine, q, init) if q.split else _whole_updates(engine, q)):
        seg, plan = _segment(engine, s, q), q.plans[s - q.window[0]]
        chunks = []
        for lo in range(0, n_tan, k_chunk):
            tangents = layout.unflatten(_tangents(parts, layout, lo, min(lo + k_chunk, n_tan), per_group))
            chunks.append(engine.evaluator.jvp(seg, plan, tangents))
        J = torch.cat(chunks, dim=1)  # (T, K, O)
        J = J.reshape(J.shape[0], len(names), G, -1) if per_group else J.reshape(J.shape[0], len(names), -1)
        for j, name in enumerate(names):
            acc.add_totals(name, s, J[:, j], q.rows)
        acc.add_estimate(s, J.sum(dim=(1, 2)) if per_group else J.sum(1), q.rows)


def _split_parts(engine: Any, q: Query, init: Tensor | None) -> Iterator[tuple[int, Tensor]]:
    """``(s, parts (3 or 4, D))`` of the window's steps: data, regularization, residual and initial-state parts.

    The fourth part only with a start buffer ``init`` (:func:`~explaind.kernel.split.start_buffer`).
    """
    start, stop = q.window
    layout = engine.layout
    splitter = Splitter(init)
    for s in progress_iter(range(q.first, stop), engine.progress, "steps", stop - q.first):
        theta = engine.params(s)
        g = engine.evaluator.sample_grads(theta, layout, step_batch(engine, s)[1], summed=True)
        data, reg, init_part = splitter.advance(coefficients(engine, s, layout), g, layout.flatten(theta))
        if s >= start:
            delta = layout.flatten(engine.delta(s))
            if init_part is None:
                yield s, torch.stack([data, reg, delta - data - reg])
            else:
                yield s, torch.stack([data, reg, delta - data - reg - init_part, init_part])


def _whole_updates(engine: Any, q: Query) -> Iterator[tuple[int, Tensor]]:
    r"""``(s, \Delta\theta_s (1, D))`` of the window's steps (no split: only the recorded parameters are read)."""
    start, stop = q.window
    for s in progress_iter(range(start, stop), engine.progress, "steps", stop - start):
        yield s, engine.layout.flatten(engine.delta(s))[None]


def _tangents(parts: Tensor, layout: ParamLayout, lo: int, hi: int, per_group: bool) -> Tensor:
    """Tangents ``lo..hi-1`` of the list (part, group): flat ``(hi - lo, D)``."""
    if not per_group:
        return parts[lo:hi]
    G = len(layout)
    out = torch.zeros(hi - lo, layout.size, dtype=parts.dtype, device=parts.device)
    for k in range(lo, hi):
        j, g = divmod(k, G)
        sl = slice(layout.offsets[g], layout.offsets[g + 1])
        out[k - lo, sl] = parts[j, sl]
    return out


# ---------------------------------------------------------------------- Jacobian sweeps
class _Phi:
    r""":math:`\Phi_s` of a block, written into one buffer reused across steps (no page faults per step)."""

    def __init__(self, engine: Any, q: Query, block: Block):
        self.engine, self.q, self.block = engine, q, block
        self.buffer = torch.empty(q.X.shape[0], q.explained.n_outputs, block.layout.size, dtype=engine.dtype,
                                  device=engine.device)

    def __call__(self, s: int) -> Tensor:
        plan = self.q.plans[s - self.q.window[0]]
        return self.engine.evaluator.jacobian(_segment(self.engine, s, self.q), plan, self.block.layout,
                                              self.q.jac_chunk, out=self.buffer)


def _sample_grads(engine: Any, s: int, block: Block) -> tuple[Tensor, Tensor, Tensor]:
    """``(indices, c_s w_{s,k} grad l_k(theta_s) (B, D_b), theta_s on the block (D_b,))``."""
    theta = engine.params(s)
    idx, batch = step_batch(engine, s)
    return idx, engine.evaluator.sample_grads(theta, block.layout, batch), block.layout.flatten(theta)


def _vec(value: float | Tensor, like: Tensor) -> Tensor:
    return value if isinstance(value, Tensor) else torch.full_like(like, float(value))


def update_sweep(engine: Any, q: Query, acc: Accumulators, block: Block) -> None:
    r"""The whole update per coordinate, :math:`\Phi_s \odot \Delta\theta_s` reduced to the kept axes (no split).

    Without ``step``, the products are summed over steps by the evaluator
    (:meth:`~explaind.kernel.evaluate.Evaluator.products`), which may avoid forming :math:`\Phi_s`.
    """
    start, stop = q.window
    steps = progress_iter(range(start, stop), engine.progress, "steps", stop - start)
    if acc.param and not acc.step:
        sums = engine.evaluator.products(block.layout, q.X.shape[0], q.explained.n_outputs, q.jac_chunk)
        for s in steps:
            sums.add(_segment(engine, s, q), q.plans[s - start], block.layout.flatten(engine.delta(s)))
        total = sums.result()  # (T_c, O, D_b)
        acc.add_coordinates("values", total, block, q.rows)
        acc.add_estimate(start, total.sum(-1), q.rows)  # only the sum over steps is read without 'step'
        return
    phi_of = _Phi(engine, q, block)
    for s in steps:
        delta = block.layout.flatten(engine.delta(s))
        acc.contract(s, phi_of(s), block, q.rows, vectors=[("values", delta)], estimate=(s, delta))


def forward_sweep(engine: Any, q: Query, acc: Accumulators, block: Block) -> None:
    """Forward momentum coupling on one block and test chunk (see the module docstring)."""
    start, stop = q.window
    layout, rows = block.layout, q.rows
    samples = seen_samples(engine, q.first, stop) if acc.train else torch.zeros(0, dtype=torch.long,
                                                                                device=engine.device)
    position = torch.full((int(samples.max()) + 1 if samples.numel() else 1,), -1, dtype=torch.long,
                          device=engine.device)
    position[samples] = torch.arange(samples.numel(), device=engine.device)
    buf = torch.zeros(samples.numel(), layout.size, dtype=engine.dtype, device=engine.device)
    n_seen = 0
    splitter, phi_of = Splitter(start_buffer(engine, layout, q.first)), _Phi(engine, q, block)
    for s in progress_iter(range(q.first, stop), engine.progress, "forward sweep", stop - q.first):
        co = coefficients(engine, s, layout)
        if acc.train:
            idx, G, theta = _sample_grads(engine, s, block)
            pos = position[idx]
            if not (isinstance(co.a, float) and co.a == 1.0):
                buf[:n_seen] *= co.a
            n_seen = max(n_seen, int(pos.max()) + 1) if pos.numel() else n_seen
            buf.index_add_(0, pos, co.b * G)
            gsum = G.sum(0)
        else:
            theta = engine.params(s)
            gsum = engine.evaluator.sample_grads(theta, layout, step_batch(engine, s)[1], summed=True)
            theta = layout.flatten(theta)
        data, reg, init = splitter.advance(co, gsum, theta)
        if s < start:
            continue
        phi = phi_of(s)
        delta = layout.flatten(engine.delta(s))
        if init is None:
            vectors = [("regularization", reg), ("residual", delta - data - reg)]
        else:
            vectors = [("regularization", reg), ("initial_state", init), ("residual", delta - data - reg - init)]
        if not acc.train:
            acc.contract(s, phi, block, rows, vectors=[("values", data), *vectors], estimate=(s, delta))
            continue
        scale = _vec(-co.P * co.q, delta)
        with_n = not is_zero(co.n) and not is_zero(co.P)
        Gn = G * (-co.P * co.n) if with_n else None
        Tc, O = phi.shape[:2]
        if n_seen <= Tc * O:
            rows_G = buf[:n_seen] * scale
            if with_n:
                rows_G, rows_k = torch.cat([rows_G, Gn]), torch.cat([samples[:n_seen], idx])
            else:
                rows_k = samples[:n_seen]
            acc.contract(s, phi, block, rows, G=rows_G, samples=rows_k, vectors=vectors, estimate=(s, delta))
        else:
            acc.add_train(s, phi * scale, buf[:n_seen], samples[:n_seen], block, rows)
            acc.contract(s, phi, block, rows, G=Gn, samples=idx if with_n else None, vectors=vectors,
                         estimate=(s, delta))


def reverse_sweep(engine: Any, q: Query, acc: Accumulators, block: Block) -> None:
    r"""Reverse momentum coupling on one block and test chunk (``step`` must not be kept).

    The combined coefficient :math:`C_i = b_i U_i + n_i P_i \Phi_i` is never formed: every
    contraction is split into one with ``U`` and one with :math:`\Phi_i` (one matrix product
    each), with the diagonal factors moved onto the per-sample gradients and vectors. ``U`` is
    kept as ``scale * V`` so that a uniform decay :math:`a_{i+1}` only rescales a number. With a start
    buffer :math:`m_{-1}` the sweep ends at step 0 with :math:`U_0`, and the initial-state part is
    :math:`-U_0 \cdot (a_0 m_{-1})` (docs/maths.md §4, "Optimizer state at the start").
    """
    start, stop = q.window
    layout, rows = block.layout, q.rows
    V: Tensor | None = None
    scale = 1.0
    co_next = None
    phi_of = _Phi(engine, q, block)
    reached = stop
    for i in progress_iter(range(stop - 1, q.first - 1, -1), engine.progress, "reverse sweep", stop - q.first):
        co = coefficients(engine, i, layout)
        if V is not None and co_next is not None:
            if is_zero(co_next.a):
                V, scale = None, 1.0
            elif isinstance(co_next.a, Tensor):
                V.mul_(co_next.a)
            else:
                scale *= float(co_next.a)
            if V is not None and abs(scale) < 1e-6:
                V.mul_(scale)
                scale = 1.0
        co_next = co
        phi = None
        if i >= start:
            phi = phi_of(i)
            qP = co.q * co.P
            if V is None:
                V, scale = phi * qP, 1.0
            elif isinstance(qP, Tensor):
                V.addcmul_(phi, qP, value=1.0 / scale)
            else:
                V.add_(phi, alpha=float(qP) / scale)
        if V is None and phi is None:
            break
        reached = i
        idx, G, theta = _sample_grads(engine, i, block)
        gsum = G.sum(0)
        lam = co.lambda_c * theta
        with_n = phi is not None and not is_zero(co.n) and not is_zero(co.P)
        if V is not None and not is_zero(co.b):
            b = co.b * scale
            acc.contract(None, V, block, rows, G=G * (-b), samples=idx,
                         vectors=[("regularization", _vec(-b * lam, gsum)),
                                  ("residual", _vec(b * (gsum + lam), gsum))])
        if phi is not None:
            nP = co.n * co.P
            delta = layout.flatten(engine.delta(i))
            decay = _vec(co.lambda_d * theta, gsum)
            reg_phi = -decay - (nP * lam if with_n else 0.0)
            res_phi = delta + decay + (nP * (gsum + lam) if with_n else 0.0)
            acc.contract(None, phi, block, rows, G=G * (-nP) if with_n else None, samples=idx if with_n else None,
                         vectors=[("regularization", _vec(reg_phi, gsum)), ("residual", _vec(res_phi, gsum))],
                         estimate=(i, delta))
    init = start_buffer(engine, layout, q.first)
    if init is not None and reached == 0 and V is not None and co_next is not None:
        carried = co_next.a * init * scale  # a_0 m_{-1}, with U_0 = scale * V
        acc.contract(None, V, block, rows, vectors=[("initial_state", _vec(-carried, init)),
                                                    ("residual", _vec(carried, init))])
