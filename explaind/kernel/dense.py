r"""The adaptive rule's fallback for kink-dense paths: a composite midpoint rule on shared nodes.

Locating kinks one by one (:mod:`explaind.kernel.adaptive`) pays off when a path crosses a few
dozen activation kinks. A ReLU-dense network (convolutions over many positions, wide MLPs, large
first steps) crosses thousands per segment: each located kink removes a tiny share of the error and
the rule would run into its evaluation cap after thousands of evaluations per unit, each at its own
point of its own segment (the costliest kind of evaluation).

So after :data:`DENSE_AFTER` evaluations the rule looks at the units still refining: a unit is
*far* when its error is above :data:`DENSE_RATIO` times its tolerance and above :data:`DENSE_REL`
times :math:`\max_o |h_o(1) - h_o(0)|`. When at least :data:`DENSE_SHARE` of the units that missed
the first estimate, and at least :data:`DENSE_MIN` units, are far, the batch is kink-dense (a
property of the model and the step size, not of one test input: a few far units among many
converging ones are left to the adaptive rule, which locates their kinks). Its far units are
integrated by the composite midpoint rule with :data:`DENSE_EVALS` nodes shared by all test inputs
of a step, which the engine evaluates like a fixed rule (one batched evaluation per node, not one
per unit); the batch's other units stop refining at :data:`DENSE_CAP` times :data:`DENSE_AFTER`
evaluations and take the midpoint rule where it errs less than their panels (both errors are known
exactly). The error left is reported as quadrature error and warned about (``docs/engine.md``,
section 2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .quadrature import rule_nodes

__all__ = ["DENSE_AFTER", "DENSE_RATIO", "DENSE_REL", "DENSE_SHARE", "DENSE_MIN", "DENSE_EVALS", "DENSE_CAP",
           "MIDPOINT_KIND", "Shared", "dense_units", "midpoint_estimate"]

#: Evaluations per unit after which the adaptive rule tests whether the batch is kink-dense.
DENSE_AFTER = 32
#: A unit is far when, after ``DENSE_AFTER`` evaluations, its error is above this many tolerances ...
DENSE_RATIO = 1000.0
#: ... and above this fraction of :math:`\max_o |h_o(1) - h_o(0)|`.
DENSE_REL = 1e-4
#: The batch is kink-dense when at least this share of the units that missed the first estimate are far,
#: and at least ``DENSE_MIN`` units (a kink-dense model shows it on many inputs; a few far units may hold
#: a few kinks each, which the adaptive rule locates).
DENSE_SHARE = 0.5
DENSE_MIN = 8
#: Nodes of the composite midpoint rule for the far units of a kink-dense batch.
DENSE_EVALS = 100
#: In a kink-dense batch the units that were not far stop refining after ``DENSE_CAP * DENSE_AFTER``
#: evaluations (with their error, known exactly, reported).
DENSE_CAP = 4
#: Panel kind of a midpoint panel (after the adaptive rule's two Gauss–Legendre kinds).
MIDPOINT_KIND = 2

#: ``(units (K,), t (Q,), w (Q,)) -> (K, O)``: :math:`\sum_q w_q h'(t_q)` of ``units`` at nodes shared by all.
Shared = Callable[[Tensor, Tensor, Tensor], Tensor]


def dense_units(total: Tensor, ripe: Tensor, failing: int, thr: Tensor, scale: Tensor) -> Tensor:
    r"""The far units of a kink-dense batch (bool ``(U,)``; all ``False`` when the batch is not kink-dense).

    Parameters
    ----------
    total : Tensor
        Each unit's summed panel error now, ``(U,)``.
    ripe : Tensor
        Units still refining that have spent ``DENSE_AFTER`` evaluations, bool ``(U,)``.
    failing : int
        Number of units that missed the first estimate.
    thr, scale : Tensor
        Each unit's tolerance and :math:`\max_o |\Delta g_o|`, ``(U,)``.
    """
    far = ripe & (total > torch.maximum(DENSE_RATIO * thr, DENSE_REL * scale))
    if int(far.sum()) < max(DENSE_MIN, DENSE_SHARE * failing):
        return torch.zeros_like(far)
    return far


def midpoint_estimate(units: Tensor, shared: Shared, dtype: torch.dtype,
                      n: int = DENSE_EVALS) -> tuple[Tensor, Tensor, Tensor]:
    r"""The ``n``-point composite midpoint rule on :math:`[0, 1]` for ``units (K,)``.

    Returns
    -------
    t, w : Tensor
        The nodes and weights, ``(n,)``.
    est : Tensor
        :math:`\sum_q w_q h'(t_q)` of each unit, ``(K, O)``.
    """
    t, w = (torch.as_tensor(v, dtype=dtype, device=units.device) for v in rule_nodes("midpoint", n))
    return t, w, shared(units, t, w)
