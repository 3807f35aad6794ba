r"""Quadrature rules of :math:`\varphi_s(x) = \int_0^1 \nabla_\theta g(\theta_s + t\Delta\theta_s, x)\,dt`.

Only this 1-D integral is approximated; it enters every decomposition as
:math:`\varphi_s(x) v \approx \sum_q w_q \nabla_\theta g(\theta(t_q), x)\, v`. Four rules:

``"gauss-legendre"``
    ``n`` Gauss–Legendre nodes on ``[0, 1]`` (default 4; exact to rounding on smooth networks).
``"midpoint"``
    ``n`` equal cells, one node at each centre (default 100; the rule of the ExPLAIND paper).
``"left"``
    ``n`` equal cells, one node at each left end (default 1: the single node ``t = 0`` with weight 1,
    :math:`\varphi_s \approx \nabla_\theta g(\theta_s, x)` — TracIn's first-order term taken at every
    step; its large quadrature error is reported like any other rule's).
``"adaptive"`` (default)
    ``n``-point Gauss–Legendre panels, cut at the located kinks of :math:`h(t) = g(\theta(t), x)`
    and bisected where smooth until the measured error is within tolerance:
    :func:`explaind.kernel.adaptive.adaptive_plan` (``docs/engine.md``, section 2).

Each rule yields a :class:`NodePlan` per step: nodes ``t (T, Q)`` and weights ``w (T, Q)`` per
test input (zero-weight padding), the exact difference ``g(theta_{s+1}) - g(theta_s)``, the
estimate along :math:`\Delta\theta_s` (adaptive rule) and the evaluation count. The engine uses the
same plan for every part of the step's update, so ``exact - estimate`` is the whole
quadrature error and is reported as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["RULES", "DEFAULT_NODES", "NodePlan", "rule_nodes", "fixed_plan"]

RULES = ("adaptive", "gauss-legendre", "midpoint", "left")
#: Nodes per rule when ``nodes=None`` (per panel for ``"adaptive"``).
DEFAULT_NODES = {"adaptive": 4, "gauss-legendre": 4, "midpoint": 100, "left": 1}


def rule_nodes(rule: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of a rule on ``[0, 1]`` (float64 numpy arrays of length ``n``; weights sum to 1)."""
    if rule == "midpoint":
        return (np.arange(n, dtype=np.float64) + 0.5) / n, np.full(n, 1.0 / n)
    if rule == "left":  # left Riemann sum; n = 1 is the TracIn limit (docs/maths.md §2)
        return np.arange(n, dtype=np.float64) / n, np.full(n, 1.0 / n)
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (x + 1.0), 0.5 * w


@dataclass
class NodePlan:
    r"""Quadrature nodes of one step for each test input.

    Attributes
    ----------
    t, w : Tensor
        Nodes and weights, shape ``(T, Q)``; padding has weight 0.
    exact : Tensor
        ``g(theta_{s+1}) - g(theta_s)``, shape ``(T, O)``.
    estimate : Tensor or None
        :math:`\sum_q w_q \nabla g(\theta(t_q))\,\Delta\theta_s`, shape ``(T, O)`` (adaptive rule).
    evals : Tensor
        Evaluations spent per test input, shape ``(T,)`` (JVPs at nodes, plus forward passes at
        bisection points for the adaptive rule).
    """

    t: Tensor
    w: Tensor
    exact: Tensor
    estimate: Tensor | None
    evals: Tensor

    def split(self, n_steps: int) -> list[NodePlan]:
        """Split a plan over ``n_steps * T`` units (step-major) into one plan per step, trimming padding."""
        T = self.t.shape[0] // n_steps
        out = []
        for j in range(n_steps):
            sl = slice(j * T, (j + 1) * T)
            used = torch.nonzero((self.w[sl] != 0).any(0)).reshape(-1)
            Q = int(used.max()) + 1 if used.numel() else 1
            est = None if self.estimate is None else self.estimate[sl]
            out.append(NodePlan(self.t[sl, :Q], self.w[sl, :Q], self.exact[sl], est, self.evals[sl]))
        return out

    def take(self, idx: Tensor) -> NodePlan:
        """The plan of a subset of test inputs."""
        est = None if self.estimate is None else self.estimate[idx]
        return NodePlan(self.t[idx], self.w[idx], self.exact[idx], est, self.evals[idx])

    def by_node(self, min_shared: int = 2) -> tuple[list[tuple[Tensor, Tensor, Tensor]], tuple[Tensor, Tensor, Tensor]]:
        """Group the (input, node) pairs by node value.

        Returns
        -------
        shared : list of (t, sub, w)
            A node ``t`` (0-d) used by the inputs ``sub (S,)`` (``S >= min_shared``) with weights ``w (S,)``.
        single : (idx, t, w)
            The pairs whose node no other input uses, each of shape ``(P,)``.
        """
        mask = self.w != 0
        idx = torch.arange(self.t.shape[0], device=self.t.device)[:, None].expand_as(mask)[mask]
        tv, wv = self.t[mask], self.w[mask]
        uniq, inverse, counts = torch.unique(tv, return_inverse=True, return_counts=True)
        shared = []
        min_shared = max(2, int(min_shared))
        for u in torch.nonzero(counts >= min_shared).reshape(-1).tolist():
            sel = inverse == u
            shared.append((uniq[u], idx[sel], wv[sel]))
        lone = counts[inverse] < min_shared
        return shared, (idx[lone], tv[lone], wv[lone])


def fixed_plan(rule: str, n: int, exact: Tensor) -> NodePlan:
    """The same ``n``-node rule for every test input (``exact`` gives ``T``, device and dtype)."""
    x, w = rule_nodes(rule, n)
    T = exact.shape[0]
    tt = torch.as_tensor(x, dtype=exact.dtype, device=exact.device).expand(T, n).contiguous()
    ww = torch.as_tensor(w, dtype=exact.dtype, device=exact.device).expand(T, n).contiguous()
    return NodePlan(tt, ww, exact, None, torch.full((T,), n, dtype=torch.long, device=exact.device))
