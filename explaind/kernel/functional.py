r"""torch.func view of a recorded model: the explained function, its JVPs, Jacobians and loss gradients.

The explained function :math:`g(\theta, x) \in \mathbb{R}^O` is one of

* ``"outputs"``: every output of the model, flattened (``O`` = outputs per input);
* ``"target"``: one chosen output per test input (``O = 1``, like Captum's ``target``);
* ``"loss"``: the per-sample training loss of ``(f(x; theta), y)`` (``O = 1``).

On the segment of step ``s`` the parameters are :math:`\theta(t) = \theta_s + t\,\Delta\theta_s`.
:class:`Segment` evaluates the directional derivatives :math:`\nabla_\theta g(\theta(t), x)\, v`
(forward mode, :func:`torch.func.jvp`) and the Jacobians :math:`\nabla_\theta g(\theta(t), x)` (reverse
mode, :func:`torch.func.jacrev`) either at one node ``t`` shared by a set of test inputs (the
parameters are not batched and the inputs form one batch), on a grid of nodes, or on *pairs*
``(x_i, t_i)`` (each pair has its own point of the segment; :func:`torch.func.vmap` over pairs).
:class:`StepStack` does the same for triples (step, input, node) of several steps at once.
Per-sample training-loss gradients use ``vmap(grad(loss), chunk_size=...)``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

__all__ = ["FunctionalModel", "Explained", "Segment", "ExplainedKind"]

ExplainedKind = Literal["outputs", "target", "loss"]
Params = dict[str, Tensor]


class FunctionalModel:
    """A private copy of the template model, in evaluation mode, on the compute device and dtype.

    Parameters
    ----------
    module : nn.Module
        The trajectory's template (``traj.model``); it is copied, never modified.
    constants : mapping
        Frozen parameters and buffers, passed to every ``functional_call``.
    loss_fn : callable
        Per-sample training loss ``(outputs, targets) -> (n,)``.
    device, dtype
        Where and in which floating dtype everything is computed.
    """

    def __init__(self, module: nn.Module, constants: Mapping[str, Tensor], loss_fn: Any, device: torch.device,
                 dtype: torch.dtype):
        self.module = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
        self.device = device
        self.dtype = dtype
        self.constants = {k: self.cast(v) for k, v in constants.items()}
        self.loss_fn = loss_fn

    def cast(self, t: Tensor) -> Tensor:
        """Move to the compute device; floating tensors also to the compute dtype."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            return t.detach().to(device=self.device, dtype=self.dtype)
        return t.detach().to(device=self.device)

    def cast_params(self, params: Mapping[str, Tensor], names: Sequence[str]) -> Params:
        """``{name: cast(params[name])}`` for ``names``."""
        return {n: self.cast(params[n]) for n in names}

    def __call__(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Model outputs ``f(x; params)`` of shape ``(n, ...)``."""
        return functional_call(self.module, {**self.constants, **params}, (x,))

    def sample_loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Per-sample training losses ``l_k(params)``, shape ``(n,)``."""
        return self.loss_fn(self(params, x), y).reshape(-1)

    # ------------------------------------------------------------------ training-loss gradients
    def per_sample_grads(self, params: Params, names: Sequence[str], X: Tensor, Y: Tensor,
                         chunk_size: int | None) -> Params:
        r"""Per-sample gradients :math:`\nabla_{\theta_b}\ell_k(\theta)` of the block ``names``.

        Returns ``name -> (n, *shape)``; computed by ``vmap(grad(l), chunk_size=chunk_size)``.
        """
        block = {n: params[n] for n in names}
        rest = {n: v for n, v in params.items() if n not in block}

        def one(b: Params, x: Tensor, y: Tensor) -> Tensor:
            return self.sample_loss({**rest, **b}, x.unsqueeze(0), y.unsqueeze(0)).sum()

        return vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)(block, X, Y)

    def weighted_grad(self, params: Params, names: Sequence[str], X: Tensor, Y: Tensor, weights: Tensor,
                      chunk_size: int | None) -> Params:
        r""":math:`\sum_k w_k \nabla_{\theta_b}\ell_k(\theta)` for the block ``names`` (batched, chunked)."""
        block = {n: params[n] for n in names}
        rest = {n: v for n, v in params.items() if n not in block}
        total = {n: torch.zeros_like(v) for n, v in block.items()}
        step = X.shape[0] if not chunk_size else int(chunk_size)
        for lo in range(0, X.shape[0], max(step, 1)):
            sl = slice(lo, lo + step)

            def fn(b: Params, sl: slice = sl) -> Tensor:
                return (self.sample_loss({**rest, **b}, X[sl], Y[sl]) * weights[sl]).sum()

            for n, g in grad(fn)(block).items():
                total[n] += g
        return total


@dataclass(frozen=True)
class Explained:
    """The explained quantity for a set of test inputs.

    Attributes
    ----------
    kind : {"outputs", "target", "loss"}
    aux : Tensor
        Per-input auxiliary data, shape ``(T, ...)``: one-hot target rows ``(T, O_model)``
        (``"target"``), test targets ``y`` (``"loss"``), or zeros ``(T, 1)`` (``"outputs"``).
    n_outputs : int
        ``O``.
    """

    kind: ExplainedKind
    aux: Tensor
    n_outputs: int

    def __call__(self, fm: FunctionalModel, params: Mapping[str, Tensor], x: Tensor, aux: Tensor) -> Tensor:
        """``g(params, x)`` of shape ``(n, O)``."""
        out = fm(params, x)
        if self.kind == "loss":
            return fm.loss_fn(out, aux).reshape(-1, 1)
        flat = out.reshape(out.shape[0], -1)
        if self.kind == "target":
            return (flat * aux).sum(-1, keepdim=True)
        return flat

    def take(self, idx: Tensor | slice) -> Explained:
        """The same quantity for a subset of the test inputs."""
        return Explained(self.kind, self.aux[idx], self.n_outputs)


def _along_each(along: Any, tangents: Params) -> Tensor:
    """``along(v)`` for each tangent of ``name -> (K, *shape)``, stacked first (no ``vmap`` when ``K = 1``)."""
    if next(iter(tangents.values())).shape[0] == 1:
        return along({n: v[0] for n, v in tangents.items()}).unsqueeze(0)
    return vmap(along)(tangents)


class Segment:
    r"""The segment :math:`\theta(t) = \theta_s + t\,\Delta\theta_s` of one step, for fixed test inputs.

    Parameters
    ----------
    fm : FunctionalModel
    explained : Explained
        The explained quantity (its ``aux`` rows align with ``X``).
    base, delta : dict
        :math:`\theta_s` and :math:`\Delta\theta_s` (all trainable tensors, on the compute device).
    X : Tensor
        Test inputs ``(T, ...)``.
    """

    def __init__(self, fm: FunctionalModel, explained: Explained, base: Params, delta: Params, X: Tensor):
        self.fm = fm
        self.explained = explained
        self.base = base
        self.delta = delta
        self.X = X
        self.aux = explained.aux

    def theta(self, t: Tensor) -> Params:
        r""":math:`\theta(t)` (``t`` a 0-d tensor, possibly batched under ``vmap``)."""
        return {n: self.base[n] + t * self.delta[n] for n in self.base}

    def _g(self, params: Params, x: Tensor, aux: Tensor) -> Tensor:
        return self.explained(self.fm, params, x, aux)

    def _g1(self, params: Params, x: Tensor, aux: Tensor) -> Tensor:
        return self._g(params, x.unsqueeze(0), aux.unsqueeze(0))[0]

    # ------------------------------------------------------------------ forward mode
    def jvp_grid(self, t: Tensor, tangents: Params, sub: Tensor) -> Tensor:
        r""":math:`\nabla g(\theta(t_u), x_i)\, v_k` for nodes ``t (U,)``, inputs ``sub (S,)``,
        tangents ``name -> (K, *shape)``; shape ``(U, K, S, O)``."""
        X, aux = self.X[sub], self.aux[sub]

        def at(tu: Tensor) -> Tensor:
            point = self.theta(tu)

            def along(v: Params) -> Tensor:
                return jvp(lambda p: self._g(p, X, aux), (point,), (v,))[1]

            return _along_each(along, tangents)

        return vmap(at)(t)

    def jvp_at(self, t: Tensor, tangents: Params, sub: Tensor) -> Tensor:
        r""":math:`\nabla g(\theta(t), x_i)\, v_k` at one node ``t`` for inputs ``sub (S,)`` and tangents
        ``name -> (K, *shape)``; shape ``(K, S, O)`` (parameters shared by the inputs, not batched)."""
        X, aux = self.X[sub], self.aux[sub]
        point = self.theta(t)

        def along(v: Params) -> Tensor:
            return jvp(lambda p: self._g(p, X, aux), (point,), (v,))[1]

        return _along_each(along, tangents)

    def jvp_pairs(self, idx: Tensor, t: Tensor, tangents: Params) -> Tensor:
        r""":math:`\nabla g(\theta(t_j), x_{idx_j})\, v_k` for pairs; shape ``(P, K, O)``."""

        def one(tj: Tensor, x: Tensor, a: Tensor) -> Tensor:
            point = self.theta(tj)

            def along(v: Params) -> Tensor:
                return jvp(lambda p: self._g1(p, x, a), (point,), (v,))[1]

            return _along_each(along, tangents)

        return vmap(one)(t, self.X[idx], self.aux[idx])

    # ------------------------------------------------------------------ reverse mode
    def _split(self, point: Params, names: Sequence[str]) -> tuple[Params, Params]:
        block = {n: point[n] for n in names}
        rest = {n: v for n, v in point.items() if n not in block}
        return block, rest

    def jac_nodes(self, t: Tensor, names: Sequence[str], sub: Tensor, w: Tensor) -> Params:
        r""":math:`\sum_u w_{iu} \nabla_{\theta_b} g(\theta(t_u), x_i)` for nodes ``t (U,)`` shared by the inputs
        ``sub (S,)`` with weights ``w (S, U)``: ``name -> (S, O, *shape)``.

        The nodes are summed inside one reverse pass: the derivative is taken with respect to a
        common offset :math:`\epsilon` of the block, :math:`\nabla_\epsilon \sum_u w_{iu} g(\theta(t_u) +
        \epsilon, x_i)`, with a plain loop over nodes (parameters never batched), so each layer's
        per-node gradients are added while still in cache and no per-node Jacobian is stored.
        """
        points = [self._split(self.theta(tu), names) for tu in t]
        eps0 = {n: torch.zeros_like(self.base[n]) for n in names}

        def per_input(x: Tensor, a: Tensor, wi: Tensor) -> Params:
            def total(eps: Params) -> Tensor:
                out = 0
                for u, (block, rest) in enumerate(points):
                    out = out + wi[u] * self._g1({**rest, **{n: block[n] + eps[n] for n in names}}, x, a)
                return out

            return jacrev(total)(eps0)

        return vmap(per_input)(self.X[sub], self.aux[sub], w)

    def jac_pairs(self, idx: Tensor, t: Tensor, names: Sequence[str], w: Tensor) -> Params:
        r"""Weighted Jacobians for (input, node) pairs ``(idx_j, t_j)`` with weights ``w_j``:
        ``name -> (P, O, *shape)``."""

        def one(tj: Tensor, x: Tensor, a: Tensor, wj: Tensor) -> Params:
            block, rest = self._split(self.theta(tj), names)
            return jacrev(lambda b: wj * self._g1({**rest, **b}, x, a))(block)

        return vmap(one)(t, self.X[idx], self.aux[idx], w)


class StepStack:
    r"""Segments of several steps stacked, for (step, input, node) triples in one ``vmap``.

    Parameters
    ----------
    fm : FunctionalModel
    explained : Explained
    base, delta : dict
        :math:`\theta_s` and :math:`\Delta\theta_s` of the stacked steps, ``name -> (S_b, *shape)``.
    X : Tensor
        Test inputs ``(T, ...)``.
    """

    def __init__(self, fm: FunctionalModel, explained: Explained, base: Params, delta: Params, X: Tensor):
        self.fm = fm
        self.explained = explained
        self.base = base
        self.delta = delta
        self.X = X

    def slopes_grid(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`h = g(\theta_s + t_u\Delta\theta_s, x_i)` and :math:`h' = \nabla g(\cdot)\,\Delta\theta_s` for every
        stacked step, node ``t (U,)`` and input; both ``(S_b, U, T, O)``.

        One ``vmap`` over steps (their parameters are already stacked, nothing is gathered) of a
        ``vmap`` over nodes; the inputs form one batch inside.
        """
        X, aux = self.X, self.explained.aux

        def per_step(b: Params, d: Params) -> tuple[Tensor, Tensor]:
            def at(tu: Tensor) -> tuple[Tensor, Tensor]:
                return jvp(lambda p: self.explained(self.fm, p, X, aux), ({n: b[n] + tu * d[n] for n in b},), (d,))

            return vmap(at)(t)

        return vmap(per_step)(self.base, self.delta)

    def jvp_along_delta(self, sidx: Tensor, idx: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`g(\theta_s + t\Delta\theta_s, x_i)` and :math:`\nabla g(\cdot)\,\Delta\theta_s` for triples
        ``(sidx, idx, t)`` (all ``(P,)``); both ``(P, O)``."""
        b = {n: v[sidx] for n, v in self.base.items()}
        d = {n: v[sidx] for n, v in self.delta.items()}

        def one(bp: Params, dp: Params, tj: Tensor, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
            point = {n: bp[n] + tj * dp[n] for n in bp}
            return jvp(lambda p: self.explained(self.fm, p, x.unsqueeze(0), a.unsqueeze(0))[0], (point,), (dp,))

        return vmap(one)(b, d, t, self.X[idx], self.explained.aux[idx])
