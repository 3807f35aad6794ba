r"""The evaluator protocol: the three derivative primitives every decomposition is built from.

On the segment of step ``s``, :math:`\theta(t) = \theta_s + t\,\Delta\theta_s`, the engine needs

* **JVPs** (forward mode): :math:`h = g(\theta(t), x)` and :math:`h' = \nabla_\theta g(\theta(t), x)\,\Delta\theta_s`
  at rows (step, input, node) — :meth:`Evaluator.slopes` — and quadrature-weighted directional
  derivatives :math:`\sum_q w_{iq}\nabla_\theta g(\theta(t_{iq}), x_i)\,v_k` along tangents ``v`` —
  :meth:`Evaluator.jvp`;
* **Jacobians** (reverse mode): :math:`\Phi_s(x_i) = \sum_q w_{iq} \nabla_{\theta_b} g(\theta(t_{iq}), x_i)` on a
  parameter block — :meth:`Evaluator.jacobian`;
* **per-sample gradients** of the training loss, :math:`w_k\nabla_{\theta_b}\ell_k(\theta_s)` —
  :meth:`Evaluator.sample_grads`.

Two evaluators implement them: :class:`~explaind.kernel.autograd.AutogradEvaluator` (any model,
``torch.func``) and :class:`~explaind.kernel.layers.LayerEvaluator` (layer-factored rules keyed by
layer type, checked against the first at start-up). The plain data they act on are the frozen
dataclasses below. See docs/maths.md for the notation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .explained import Explained, Params
from .layout import ParamLayout
from .quadrature import NodePlan

__all__ = ["along", "Segment", "StepStack", "Rows", "Grid", "Batch", "NodeGroup", "Evaluator", "node_groups",
           "STACK_BYTES", "OUTPUT_BYTES", "ROW_OUTPUT_COPIES", "rows_for_outputs", "budgets",
           "CHECK_TOLERANCE"]

#: Largest bytes of stacked per-(step, node) parameters in one batched evaluation.
STACK_BYTES = 2**28
#: Largest bytes of explained outputs one batched evaluation of rows or grid nodes holds while it runs (a causal
#: language model explains ``sequence x vocabulary`` outputs per input: 0.5 MB per row in float64 at 64 x 1,024).
OUTPUT_BYTES = 2**28
#: Output-sized tensors one evaluated row is taken to hold at the peak of the call: the primal and tangent of the
#: outputs and of the layer that produces them, the step blocks' partial products and the caller's copy, with a margin.
ROW_OUTPUT_COPIES = 16


def rows_for_outputs(n_outputs: int, dtype: torch.dtype, budget: int | None = None) -> int:
    """Rows (step, input, node) per evaluation whose outputs, ``n_outputs`` each, take at most ``budget`` bytes
    (default :data:`OUTPUT_BYTES`; an estimator's ``memory_budget`` gives :func:`budgets`).

    Each row holds about :data:`ROW_OUTPUT_COPIES` tensors of its ``n_outputs`` values while the call runs; at
    least one row. The evaluators take the smaller of this and their ``chunk_size`` rows (docs/engine.md §3,
    *Chunking*).
    """
    elem = torch.finfo(dtype).bits // 8
    return max(1, (OUTPUT_BYTES if budget is None else budget) // max(1, ROW_OUTPUT_COPIES * elem * n_outputs))


def budgets(memory_budget: int | None) -> tuple[int | None, int | None]:
    """The bytes of output-sized state of the adaptive rule's chunks and of one evaluation's outputs within an
    estimator's ``memory_budget``: half and an eighth of it (``None``: the defaults, ``RULE_BYTES`` of
    :mod:`~explaind.kernel.adaptive_chunks` and :data:`OUTPUT_BYTES`, the same as 2 GiB; docs/engine.md §3,
    *Chunking*)."""
    if memory_budget is None:
        return None, None
    return max(1, memory_budget // 2), max(1, memory_budget // 8)


#: Largest relative disagreement between two evaluators accepted by a start-up check, per dtype.
CHECK_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def along(base: Params, delta: Params, t: Tensor) -> Params:
    r""":math:`\theta_s + t\Delta\theta_s`; entries of ``base`` without a ``delta`` (buffers :math:`\beta_s`) stay."""
    return {n: base[n] + t * delta[n] if n in delta else base[n] for n in base}


@dataclass(frozen=True)
class Segment:
    r"""The segment :math:`\theta(t) = \theta_s + t\,\Delta\theta_s` of one step, for fixed test inputs.

    Attributes
    ----------
    base, delta : dict
        :math:`\theta_s` and :math:`\Delta\theta_s` (every trainable tensor); ``base`` may also hold buffers
        :math:`\beta_s` (no ``delta``: constant along the segment).
    X : Tensor
        Test inputs ``(T, ...)``.
    explained : Explained
        The explained quantity (its ``aux`` rows align with ``X``).
    """

    base: Params
    delta: Params
    X: Tensor
    explained: Explained

    def theta(self, t: Tensor) -> Params:
        r""":math:`\theta(t)` (``t`` a 0-d tensor, possibly batched under ``vmap``)."""
        return along(self.base, self.delta, t)


@dataclass(frozen=True)
class StepStack:
    r"""The segments of several steps, parameters stacked: ``name -> (S, *shape)`` each.

    Attributes
    ----------
    base, delta : dict
        :math:`\theta_s` and :math:`\Delta\theta_s` of the stacked steps.
    X : Tensor
        Test inputs ``(T, ...)``.
    explained : Explained
    """

    base: Params
    delta: Params
    X: Tensor
    explained: Explained

    @property
    def n_steps(self) -> int:
        """``S``, the number of stacked steps."""
        return int(next(iter(self.base.values())).shape[0])

    def steps(self, lo: int, hi: int) -> StepStack:
        """The stacked steps ``lo .. hi-1`` (views)."""
        return StepStack({k: v[lo:hi] for k, v in self.base.items()}, {k: v[lo:hi] for k, v in self.delta.items()},
                         self.X, self.explained)


@dataclass(frozen=True)
class Rows:
    """Rows ``(step in the stack, test input, node t)``, each of shape ``(E,)``."""

    steps: Tensor
    inputs: Tensor
    t: Tensor


@dataclass(frozen=True)
class Grid:
    """The same nodes ``t (n,)`` for every stacked step and test input."""

    t: Tensor


@dataclass(frozen=True)
class Batch:
    """Training samples of a step: inputs ``X``, targets ``Y`` and weights :math:`c_s w_{s,k}` ``(B,)``.

    ``replay`` (a :class:`~explaind.kernel.coupled.Replay`) is set when the step's forwards must be
    recomputed batched, in training mode, under their recorded random states (dropout, batch norm).
    """

    X: Tensor
    Y: Tensor
    weights: Tensor
    replay: Any = None


@dataclass(frozen=True)
class NodeGroup:
    """Nodes ``t (U,)`` shared by the same test inputs ``inputs (S,)``, with weights ``w (S, U)``."""

    t: Tensor
    inputs: Tensor
    w: Tensor


def node_groups(plan: NodePlan) -> tuple[list[NodeGroup], tuple[Tensor, Tensor, Tensor]]:
    """The plan's (input, node) entries: nodes shared by the same inputs, grouped; and the lone pairs.

    A node counts as shared when at least ``min(8, max(2, T // 2))`` inputs use it. Returns the
    groups and the remaining pairs ``(idx, t, w)``, each ``(P,)``.
    """
    T = plan.t.shape[0]
    shared, lone = plan.by_node(min_shared=min(8, max(2, T // 2)))
    members: dict[tuple[int, ...], list[tuple[Tensor, Tensor, Tensor]]] = {}
    for tu, sub, wu in shared:
        members.setdefault(tuple(sub.tolist()), []).append((tu, sub, wu))
    groups = [NodeGroup(torch.stack([m[0] for m in ms]), ms[0][1], torch.stack([m[2] for m in ms], dim=1))
              for ms in members.values()]
    return groups, lone


class Evaluator(Protocol):
    """What the engine needs of an evaluator (see the module docstring)."""

    def slopes(self, stack: StepStack, rows: Rows | Grid) -> tuple[Tensor, Tensor]:
        r""":math:`h` and :math:`h'` along :math:`\Delta\theta_s`.

        For :class:`Rows`, both ``(E, O)``; for a :class:`Grid` of ``n`` nodes, both ``(S * T, n, O)``
        with units ``(step, input)`` step-major.
        """
        ...

    def jvp(self, segment: Segment, plan: NodePlan, tangents: Params) -> Tensor:
        r""":math:`\sum_q w_{iq} \nabla g(\theta(t_{iq}), x_i)\, v_k` for tangents ``name -> (K, *shape)``.

        Returns ``(T, K, O)``.
        """
        ...

    def jacobian(self, segment: Segment, plan: NodePlan, block: ParamLayout, chunk: int,
                 out: Tensor | None = None) -> Tensor:
        r""":math:`\Phi_s` on ``block``, ``(T, O, D_b)``; ``chunk`` bounds inputs per call.

        Written into ``out`` (overwritten) when given.
        """
        ...

    def products(self, block: ParamLayout, T: int, O: int, chunk: int) -> Any:
        r"""An accumulator of :math:`\sum_s \Phi_s \odot v_s` on ``block`` (``add(segment, plan, v)``, ``result()``).

        Per-coordinate products summed over steps: what ``param`` without ``step`` needs, without a
        full :math:`\Phi_s` per step where the evaluator can avoid it (:mod:`~explaind.kernel.products`).
        """
        ...

    def sample_grads(self, theta: Params, block: ParamLayout, batch: Batch, summed: bool = False) -> Tensor:
        r""":math:`w_k \nabla_{\theta_b}\ell_k(\theta)`, ``(B, D_b)``; with ``summed`` their sum ``(D_b,)``."""
        ...
