r"""The Jacobian path: per-parameter and per-training-sample decompositions (DESIGN §2).

At each window step the quadrature-weighted Jacobian
:math:`\Phi_s(x) = \sum_q w_q \nabla_\theta g(\theta_s + t_q\Delta\theta_s, x)` (shape ``(T, O, D_b)`` on a
parameter block) is formed once and contracted with the parts of :math:`\Delta\theta_s`. The influence
atom of training sample ``k`` at step ``s`` is

.. math::

    D_{s,k} = -P_s \odot \Big[q_s \sum_{i \le s} \Big(\prod_{j=i+1}^{s} a_j\Big) b_i c_i w_{i,k}
              \nabla\ell_k(\theta_i) + n_s c_s w_{s,k} \nabla\ell_k(\theta_s)\Big].

Two equivalent ways to couple the momentum across steps:

**forward** (:func:`forward_sweep`)
    A per-sample buffer :math:`M_s[k] = a_s M_{s-1}[k] + b_s c_s w_{s,k}\nabla\ell_k(\theta_s)` over the
    samples seen, memory ``O(M D_b)``; needed when ``step`` is kept.
**reverse** (:func:`reverse_sweep`)
    A test-side accumulator :math:`U_i = q_i P_i \Phi_i + a_{i+1} U_{i+1}` swept from the last step
    back; sample ``k`` of batch ``i`` contributes
    :math:`-c_i w_{i,k} (b_i U_i + n_i P_i \Phi_i)\cdot\nabla\ell_k(\theta_i)`; memory ``O(T O D_b)``.

Both also produce the regularization and residual parts (per coordinate, reduced to the kept
axes) and the per-step quadrature estimate :math:`\Phi_s\Delta\theta_s`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .accumulate import Accumulators, Block
from .engine import PathEngine, progress_iter
from .functional import Explained
from .layout import is_zero
from .quadrature import NodePlan
from .stepwise import Splitter, batch_data, coefficients, flat_block

__all__ = ["forward_sweep", "reverse_sweep", "seen_samples"]


def seen_samples(engine: PathEngine, first: int, stop: int) -> Tensor:
    """Distinct training indices of steps ``first .. stop-1`` in order of first appearance (int64)."""
    seen: dict[int, None] = {}
    for s in range(first, stop):
        for k in torch.as_tensor(engine.traj.batch(s)[0]).reshape(-1).tolist():
            seen.setdefault(int(k), None)
    return torch.tensor(list(seen), dtype=torch.long, device=engine.device)


def _phi(engine: PathEngine, s: int, X: Tensor, explained: Explained, plan: NodePlan, block: Block,
         jac_chunk: int) -> Tensor:
    seg = engine.segment(s, X, explained)  # Phi_s is consumed within the step: reuse one buffer
    out = engine.phi_buffer((X.shape[0], explained.n_outputs, block.layout.size))
    return engine.reduce_jacobian(seg, plan, block.layout, explained.n_outputs, jac_chunk, out=out)


def _sample_grads(engine: PathEngine, s: int, block: Block) -> tuple[Tensor, Tensor, Tensor]:
    """``(indices, c_s w_{s,k} grad l_k(theta_s) (B, D_b), theta_s on the block (D_b,))``."""
    theta = engine.params(s)
    idx, w, Xb, Yb = batch_data(engine, s)
    co_c = float(engine.traj.grad_scale(s))
    G = engine.per_sample_grads(s, block.layout, Xb, Yb, co_c * w)
    return idx, G, flat_block(theta, block.layout)


def _batch_grad(engine: PathEngine, s: int, block: Block) -> tuple[Tensor, Tensor]:
    """``(c_s sum_k w_{s,k} grad l_k(theta_s) (D_b,), theta_s on the block (D_b,))``."""
    theta = engine.params(s)
    _, w, Xb, Yb = batch_data(engine, s)
    c = float(engine.traj.grad_scale(s))
    g = engine.fm.weighted_grad(theta, block.layout.names, Xb, Yb, c * w, engine.chunk_size)
    return flat_block(g, block.layout), flat_block(theta, block.layout)


def _vec(value: float | Tensor, like: Tensor) -> Tensor:
    return value if isinstance(value, Tensor) else torch.full_like(like, float(value))


def forward_sweep(engine: PathEngine, X: Tensor, explained: Explained, plans: list[NodePlan],
                  window: tuple[int, int], first: int, acc: Accumulators, block: Block, rows: slice,
                  jac_chunk: int) -> None:
    """Forward momentum coupling on one block and test chunk (see the module docstring)."""
    start, stop = window
    empty = torch.zeros(0, dtype=torch.long, device=engine.device)
    samples = seen_samples(engine, first, stop) if acc.train else empty
    position = torch.full((int(samples.max()) + 1 if samples.numel() else 1,), -1, dtype=torch.long,
                          device=engine.device)
    position[samples] = torch.arange(samples.numel(), device=engine.device)
    buf = torch.zeros(samples.numel(), block.layout.size, dtype=engine.dtype, device=engine.device)
    n_seen = 0
    splitter = Splitter()
    for s in progress_iter(range(first, stop), engine.progress, "forward sweep", stop - first):
        co = coefficients(engine, s, block.layout)
        if acc.train:
            idx, G, theta = _sample_grads(engine, s, block)
            pos = position[idx]
            if not (isinstance(co.a, float) and co.a == 1.0):
                buf[:n_seen] *= co.a
            n_seen = max(n_seen, int(pos.max()) + 1) if pos.numel() else n_seen
            buf.index_add_(0, pos, co.b * G)
            gsum = G.sum(0)
        else:
            gsum, theta = _batch_grad(engine, s, block)
        data, reg = splitter.advance(co, gsum, theta)
        if s < start:
            continue
        phi = _phi(engine, s, X, explained, plans[s - start], block, jac_chunk)
        delta = flat_block(engine.delta(s), block.layout)
        vectors = [("regularization", reg), ("residual", delta - data - reg)]
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


def reverse_sweep(engine: PathEngine, X: Tensor, explained: Explained, plans: list[NodePlan],
                  window: tuple[int, int], first: int, acc: Accumulators, block: Block, rows: slice,
                  jac_chunk: int) -> None:
    r"""Reverse momentum coupling on one block and test chunk (``step`` must not be kept).

    The combined coefficient :math:`C_i = b_i U_i + n_i P_i \Phi_i` is never formed: every
    contraction is split into one with ``U`` and one with :math:`\Phi_i` (one matrix product
    each), with the diagonal factors moved onto the per-sample gradients and vectors. ``U`` is
    kept as ``scale * V`` so that a uniform decay :math:`a_{i+1}` only rescales a number.
    """
    start, stop = window
    V: Tensor | None = None
    scale = 1.0
    co_next = None
    for i in progress_iter(range(stop - 1, first - 1, -1), engine.progress, "reverse sweep", stop - first):
        co = coefficients(engine, i, block.layout)
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
            phi = _phi(engine, i, X, explained, plans[i - start], block, jac_chunk)
            qP = co.q * co.P
            if V is None:
                V, scale = phi * qP, 1.0
            elif isinstance(qP, Tensor):
                V.addcmul_(phi, qP, value=1.0 / scale)
            else:
                V.add_(phi, alpha=float(qP) / scale)
        if V is None and phi is None:
            break
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
            delta = flat_block(engine.delta(i), block.layout)
            decay = _vec(co.lambda_d * theta, gsum)
            reg_phi = -decay - (nP * lam if with_n else 0.0)
            res_phi = delta + decay + (nP * (gsum + lam) if with_n else 0.0)
            acc.contract(None, phi, block, rows, G=G * (-nP) if with_n else None, samples=idx if with_n else None,
                         vectors=[("regularization", _vec(reg_phi, gsum)), ("residual", _vec(res_phi, gsum))],
                         estimate=(i, delta))
