r"""Shared machinery of the estimators: parameters per step, the explained function, node plans.

:class:`PathEngine` wraps a :class:`~explaind.trajectory.base.Trajectory` for computation on one
device and dtype. It streams :math:`\theta_s` step by step (a small cache keeps the last few),
builds the explained function :math:`g` for a set of test inputs, evaluates
:math:`g(\theta_s, x)` for the window's steps, builds the quadrature :class:`NodePlan` of every
step, and reduces forward-mode derivatives and Jacobians over a plan,
:math:`\sum_q w_{iq} \nabla g(\theta_s + t_{iq}\Delta\theta_s, x_i)\,(\cdot)`, batched over inputs and
nodes in chunks.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from ..exceptions import ConfigError
from ..trajectory.base import Trajectory
from .adaptive import adaptive_plan
from .functional import Explained, FunctionalModel, Params, Segment, StepStack
from .layout import ParamLayout
from .quadrature import DEFAULT_NODES, NodePlan, fixed_plan, rule_nodes

__all__ = ["PathEngine", "progress_iter"]

logger = logging.getLogger(__name__)


def progress_iter(items: Iterable[Any], enabled: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    """Wrap ``items`` in a tqdm progress bar when ``enabled``."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)


class PathEngine:
    """Computation context over a trajectory.

    Parameters
    ----------
    traj : Trajectory
        The recorded run (read only through the abstract interface).
    device : torch.device
    dtype : torch.dtype
    chunk_size : int or None
        Samples or (input, node) pairs per ``vmap`` call (``None`` = everything at once).
    progress : bool
        Show progress bars over steps.
    factored : {"auto", "always", "never"}
        Use the layer-factored paths when every trainable parameter lies in an ``nn.Linear`` or
        ``nn.Embedding``: Jacobians from layer factors (:mod:`~explaind.kernel.factored`) and
        batched rows from many steps (:mod:`~explaind.kernel.rows`), each after a start-up check
        against the generic path (``vmap`` over per-row parameters, ``jacrev``). ``"auto"`` falls
        back to the generic path when they do not apply, ``"always"`` raises
        :class:`~explaind.exceptions.ConfigError` then, ``"never"`` always uses the generic path.
    """

    def __init__(self, traj: Trajectory, *, device: torch.device, dtype: torch.dtype, chunk_size: int | None,
                 progress: bool = False, factored: str = "auto"):
        if factored not in ("auto", "always", "never"):
            raise ConfigError(f"PathEngine: invalid value for 'factored': {factored!r}; choose one of 'auto', "
                              f"'always', 'never'.")
        self.factored_mode = factored
        self._factored: Any = None
        self._rows: Any = None
        self.traj = traj
        self.device = device
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.progress = progress
        self.names = tuple(traj.param_names)
        self.fm = FunctionalModel(traj.model, traj.constants(), traj.loss.implementation, device, dtype)
        self.layout = ParamLayout.from_tensors(traj.params(0), self.names)
        self._cache: OrderedDict[int, Params] = OrderedDict()

    # ------------------------------------------------------------------ parameters
    def params(self, s: int) -> Params:
        r""":math:`\theta_s` on the compute device and dtype (cached, do not modify)."""
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        p = self.fm.cast_params(self.traj.params(s), self.names)
        self._cache[s] = p
        while len(self._cache) > 3:
            self._cache.popitem(last=False)
        return p

    def delta(self, s: int) -> Params:
        r""":math:`\Delta\theta_s = \theta_{s+1} - \theta_s`."""
        a, b = self.params(s), self.params(s + 1)
        return {n: b[n] - a[n] for n in self.names}

    def clear(self) -> None:
        """Drop cached parameters and scratch buffers."""
        self._cache.clear()
        self._phi_scratch = None

    # ------------------------------------------------------------------ explained function
    def inputs(self, X: Any) -> Tensor:
        """Test inputs as a tensor on the compute device (floating inputs in the compute dtype)."""
        return self.fm.cast(torch.as_tensor(X))

    def model_outputs(self, X: Tensor) -> int:
        """Number of model outputs per input (``O`` of ``target=None``)."""
        with torch.no_grad():
            out = self.fm(self.params(0), X[:1])
        return int(out[0].numel())

    def explained(self, X: Tensor, target: Any, y: Any, owner: str) -> Explained:
        """Build :math:`g` for inputs ``X``: all outputs, ``target`` indices, or ``"loss"`` with ``y``."""
        T = X.shape[0]
        if target is None:
            return Explained("outputs", torch.zeros(T, 1, dtype=self.dtype, device=self.device),
                             self.model_outputs(X))
        if isinstance(target, str):
            if y is None:
                raise ConfigError(f"{owner}: target='loss' needs the test targets: call transform(X, y) with y of "
                                  f"length {T}.")
            yy = self.fm.cast(torch.as_tensor(y))
            if yy.shape[0] != T:
                raise ConfigError(f"{owner}: y has {yy.shape[0]} entries but X has {T} inputs; pass one target "
                                  f"per test input.")
            return Explained("loss", yy, 1)
        n_out = self.model_outputs(X)
        tgt = torch.as_tensor(target).reshape(-1)
        if tgt.numel() == 1 and T != 1:
            tgt = tgt.expand(T)
        if tgt.shape[0] != T or tgt.is_floating_point() or tgt.dtype == torch.bool:
            raise ConfigError(f"{owner}: target must be None, 'loss', an int or {T} ints (one output index per test "
                              f"input); got {target!r}.")
        if int(tgt.min()) < 0 or int(tgt.max()) >= n_out:
            raise ConfigError(f"{owner}: target indices must lie in 0..{n_out - 1} (the model has {n_out} outputs "
                              f"per input); got values from {int(tgt.min())} to {int(tgt.max())}.")
        onehot = torch.nn.functional.one_hot(tgt.long(), n_out).to(device=self.device, dtype=self.dtype)
        return Explained("target", onehot, 1)

    def segment(self, s: int, X: Tensor, explained: Explained) -> Segment:
        """The segment of step ``s`` for inputs ``X``."""
        return Segment(self.fm, explained, self.params(s), self.delta(s), X)

    def values_at(self, s: int, X: Tensor, explained: Explained) -> Tensor:
        r""":math:`g(\theta_s, x)` for every input, shape ``(T, O)`` (chunked over inputs)."""
        p = self.params(s)
        step = X.shape[0] if not self.chunk_size else self.chunk_size
        with torch.no_grad():
            parts = [explained(self.fm, p, X[i:i + step], explained.aux[i:i + step])
                     for i in range(0, X.shape[0], step)]
        return torch.cat(parts)

    # ------------------------------------------------------------------ plans
    def plans(self, X: Tensor, explained: Explained, window: tuple[int, int], rule: str, nodes: int | None,
              tol: float, with_estimate: bool, coarsen: bool = False,
              stack_bytes: int = 2**28) -> tuple[Tensor, Tensor, list[NodePlan]]:
        r"""Node plans of the window's steps.

        Returns
        -------
        g_start, g_stop : Tensor
            :math:`g(\theta_{start})` and :math:`g(\theta_{stop})`, shape ``(T, O)``.
        plans : list of NodePlan
            One per step ``start .. stop-1``; ``estimate`` is filled for the adaptive rule and,
            when ``with_estimate``, for the fixed rules.

        ``coarsen`` merges smooth panels of the adaptive rule (fewer nodes for plans reused by
        many decompositions; see :func:`~explaind.kernel.quadrature.adaptive_plan`).
        The adaptive rule refines the steps in groups whose stacked :math:`\theta_s, \Delta\theta_s`
        take at most ``stack_bytes``, one batched evaluation per refinement level and group.
        """
        start, stop = window
        n = DEFAULT_NODES[rule] if nodes is None else int(nodes)
        elem = torch.finfo(self.dtype).bits // 8
        stacked = rule == "adaptive" or with_estimate
        group = max(1, stack_bytes // max(1, 2 * elem * self.layout.size)) if stacked else 1
        g_prev = self.values_at(start, X, explained)
        g_start = g_prev
        plans: list[NodePlan] = []
        steps = progress_iter(range(start, stop, group), self.progress, "quadrature", -(-(stop - start) // group))
        for lo in steps:
            hi = min(stop, lo + group)
            g_vals = [g_prev]
            for s in range(lo, hi):
                g_vals.append(self.values_at(s + 1, X, explained))
            if rule == "adaptive":
                plans.extend(self._adaptive_group(X, explained, lo, hi, g_vals, n, tol, coarsen))
            else:
                plans.extend(self._fixed_group(X, explained, lo, hi, g_vals, rule, n, with_estimate, stack_bytes))
            g_prev = g_vals[-1]
        return g_start, g_prev, plans

    def _adaptive_group(self, X: Tensor, explained: Explained, lo: int, hi: int, g_vals: list[Tensor], n: int,
                        tol: float, coarsen: bool) -> list[NodePlan]:
        """Adaptive plans of steps ``lo .. hi-1`` refined together (units are (step, input) pairs)."""
        T = X.shape[0]
        x01, w01 = (torch.as_tensor(v, dtype=self.dtype, device=self.device) for v in rule_nodes("gauss-legendre", n))
        base, delta = self._stack(lo, hi)
        h0, d0 = self._stack_slopes(base, delta, X, explained, x01)  # first estimate, nodes shared by all inputs
        est0 = torch.einsum("q,uqo->uo", w01, d0)
        rows = self.rows_available(lo, X, explained)  # refinement: (step, input, t) rows without shared nodes
        stack = StepStack(self.fm, explained, base, delta, X)

        def refine(units: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            if rows:
                return self._rows.evaluate(base, delta, explained, X, units // T, units % T, t, self.rows_chunk)
            chunk = self.chunk_size or max(1, units.shape[0])
            outs = [stack.jvp_along_delta(units[i:i + chunk] // T, units[i:i + chunk] % T, t[i:i + chunk])
                    for i in range(0, units.shape[0], chunk)]
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

        g_a = torch.cat(g_vals[:-1])
        g_b = torch.cat(g_vals[1:])
        plan = adaptive_plan(est0, g_a, g_b, refine, tol=tol, nodes=n, coarsen=coarsen, first=(x01, h0, d0))
        return plan.split(hi - lo)

    def _fixed_group(self, X: Tensor, explained: Explained, lo: int, hi: int, g_vals: list[Tensor], rule: str,
                     n: int, with_estimate: bool, stack_bytes: int) -> list[NodePlan]:
        """Fixed-rule plans of steps ``lo .. hi-1``; estimates (when asked) from one stacked evaluation."""
        est = None
        if with_estimate:
            x, w = (torch.as_tensor(v, dtype=self.dtype, device=self.device) for v in rule_nodes(rule, n))
            _, d = self._stack_slopes(*self._stack(lo, hi), X, explained, x, stack_bytes)
            est = torch.einsum("q,uqo->uo", w, d).reshape(hi - lo, X.shape[0], -1)
        plans = []
        for j in range(hi - lo):
            plan = fixed_plan(rule, n, g_vals[j + 1] - g_vals[j])
            plan.estimate = None if est is None else est[j]
            plans.append(plan)
        return plans

    def _stack_slopes(self, base: Params, delta: Params, X: Tensor, explained: Explained, x: Tensor,
                      stack_bytes: int = 2**28) -> tuple[Tensor, Tensor]:
        r""":math:`h` and :math:`h'` at nodes ``x (n,)`` for every stacked step and input: ``(S_b * T, n, O)`` each.

        Steps and nodes are batched so that a call holds at most ``rows_chunk`` (step, node, input)
        rows and ``stack_bytes`` of per-(step, node) parameters.
        """
        S, n, T = next(iter(base.values())).shape[0], x.shape[0], X.shape[0]
        elem = torch.finfo(self.dtype).bits // 8
        per_node = max(1, min(n, self.rows_chunk // max(1, T)))
        per_step = max(1, min(S, self.rows_chunk // max(1, per_node * T),
                              stack_bytes // max(1, per_node * elem * self.layout.size)))
        hs, ds = [], []
        for lo in range(0, S, per_step):
            stack = StepStack(self.fm, explained, {k: v[lo:lo + per_step] for k, v in base.items()},
                              {k: v[lo:lo + per_step] for k, v in delta.items()}, X)
            parts = [stack.slopes_grid(x[i:i + per_node]) for i in range(0, n, per_node)]  # (S_c, n_c, T, O)
            hs.append(torch.cat([p[0] for p in parts], dim=1))
            ds.append(torch.cat([p[1] for p in parts], dim=1))
        h, d = torch.cat(hs), torch.cat(ds)  # (S, n, T, O)
        return (h.transpose(1, 2).reshape(S * T, n, -1), d.transpose(1, 2).reshape(S * T, n, -1))

    def _stack(self, lo: int, hi: int) -> tuple[Params, Params]:
        r""":math:`\theta_s` and :math:`\Delta\theta_s` of steps ``lo .. hi-1``: ``name -> (hi - lo, *shape)``."""
        bases, deltas = [], []
        for s in range(lo, hi):
            bases.append(self.params(s))
            deltas.append(self.delta(s))
        return ({k: torch.stack([b[k] for b in bases]) for k in self.names},
                {k: torch.stack([d[k] for d in deltas]) for k in self.names})

    @property
    def rows_chunk(self) -> int:
        """Rows per batch of the row evaluator (16 x ``chunk_size``: no parameters are copied per row)."""
        return 16 * (self.chunk_size or 256)

    def rows_available(self, s: int, X: Tensor, explained: Explained) -> bool:
        """Whether the :class:`~explaind.kernel.rows.RowEvaluator` applies (built and checked once)."""
        if self.factored_mode == "never":
            return False
        if self._rows is None:
            from .rows import RowEvaluator

            base, delta = self._stack(s, min(s + 2, self.traj.n_steps))
            self._rows = self._checked(RowEvaluator.build(self.fm, self.names, base, delta, X, explained),
                                       "batched rows off (%s); using vmap over per-row parameters")
        return self._rows is not False

    def _checked(self, built: tuple[Any, str], fallback_message: str) -> Any:
        """A factored helper from its ``(object or None, reason)`` build result, or ``False`` (logged)."""
        obj, reason = built
        if obj is not None:
            return obj
        if self.factored_mode == "always":
            raise ConfigError(f"invalid value for 'factored': 'always' does not apply to this model ({reason}). "
                              f"Use factored='auto' or 'never'.")
        logger.info(fallback_message, reason)
        return False

    # ------------------------------------------------------------------ chunked evaluation
    def _pair_chunks(self, fn: Any, idx: Tensor, t: Tensor, chunk: int | None = None) -> Tensor:
        chunk = chunk or self.chunk_size or max(int(idx.shape[0]), 1)
        if idx.shape[0] == 0:
            return fn(idx, t)
        return torch.cat([fn(idx[i:i + chunk], t[i:i + chunk]) for i in range(0, idx.shape[0], chunk)])

    def _grid_chunks(self, fn: Any, t: Tensor, n_inputs: int, chunk: int | None = None) -> Tensor:
        chunk = chunk or self.chunk_size or max(int(t.shape[0]) * n_inputs, 1)
        per = max(1, chunk // max(n_inputs, 1))
        return torch.cat([fn(t[i:i + per]) for i in range(0, t.shape[0], per)])

    def reduce_jvp(self, seg: Segment, plan: NodePlan, tangents: Params) -> Tensor:
        r""":math:`\sum_q w_{iq} \nabla g(\theta(t_{iq}), x_i)\, v_k` for tangents ``name -> (K, *shape)``;
        shape ``(T, K, O)``.

        Nodes shared by the same inputs are evaluated in one ``vmap`` over the nodes (the inputs
        batched inside, parameters not batched per input); the remaining (input, node) pairs go
        through one ``vmap`` per chunk.
        """
        T = plan.t.shape[0]
        K = next(iter(tangents.values())).shape[0]
        O = plan.exact.shape[-1]
        out = torch.zeros(T, K, O, dtype=self.dtype, device=self.device)
        shared, (idx, t, w) = plan.by_node(min_shared=min(8, max(2, T // 2)))
        groups: dict[tuple[int, ...], list[tuple[Tensor, Tensor, Tensor]]] = {}
        for tu, sub, wu in shared:
            groups.setdefault(tuple(sub.tolist()), []).append((tu, sub, wu))
        for members in groups.values():
            sub = members[0][1]
            tg = torch.stack([m[0] for m in members])  # (U,)
            wg = torch.stack([m[2] for m in members], dim=1)  # (S, U)
            step = self.chunk_size or sub.shape[0]
            for i in range(0, sub.shape[0], step):
                part = sub[i:i + step]
                vals = vmap(lambda tu, part=part: seg.jvp_at(tu, tangents, part))(tg)  # (U, K, S, O)
                out.index_add_(0, part, torch.einsum("su,ukso->sko", wg[i:i + step], vals))
        if idx.shape[0]:
            vals = self._pair_chunks(lambda i, tc: seg.jvp_pairs(i, tc, tangents), idx, t)
            out.index_add_(0, idx, w[:, None, None] * vals)
        return out

    def per_sample_grads(self, s: int, block: ParamLayout, X: Tensor, Y: Tensor, weights: Tensor) -> Tensor:
        r""":math:`w_k \nabla_{\theta_b} \ell_k(\theta_s)` for the training samples ``X, Y``: ``(B, D_b)``.

        From layer factors when the factored path is in use (one forward and backward pass per
        chunk), else ``vmap(grad)`` with ``chunk_size``.
        """
        theta = self.params(s)
        factored = self._factored if self._factored not in (None, False) else None
        if factored is not None and factored.covers(block.names):
            return factored.sample_grads(theta, block.names, X, Y, weights, self.rows_chunk)
        grads = self.fm.per_sample_grads(theta, block.names, X, Y, self.chunk_size)
        return block.flatten(grads, lead=1) * weights[:, None]

    def factored_jacobian(self, seg: Segment, names: Sequence[str]) -> Any:
        """The :class:`~explaind.kernel.factored.FactoredJacobian` for block ``names``, or ``None``.

        Built (and checked) once per engine from the first segment it sees.
        """
        if self.factored_mode == "never":
            return None
        if self._factored is None:
            from .factored import FactoredJacobian

            self._factored = self._checked(
                FactoredJacobian.build(self.fm, self.names, seg.base, seg.delta, seg.X, seg.explained),
                "factored Jacobians off (%s); using vmap(jacrev)")
        if self._factored is False or not self._factored.covers(names):
            return None
        return self._factored

    @property
    def jacobian_used(self) -> str:
        """``"factored"`` once the factored path has been built and used, else ``"autograd"``."""
        return "factored" if self._factored not in (None, False) else "autograd"

    def phi_buffer(self, shape: tuple[int, ...]) -> Tensor:
        r"""A scratch tensor of ``shape`` reused across steps (for :meth:`reduce_jacobian` ``out``).

        Large fresh allocations are returned to the system and page-faulted again at every step;
        callers that consume :math:`\Phi_s` within the step reuse this buffer instead.
        """
        buf = getattr(self, "_phi_scratch", None)
        if buf is None or tuple(buf.shape) != tuple(shape):
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            self._phi_scratch = buf
        return buf

    def reduce_jacobian(self, seg: Segment, plan: NodePlan, block: ParamLayout, n_outputs: int,
                        chunk: int, out: Tensor | None = None) -> Tensor:
        r""":math:`\Phi_s = \sum_q w_{iq} \nabla_{\theta_b} g(\theta(t_{iq}), x_i)` on a block; ``(T, O, D_b)``.

        Nodes shared by several inputs are evaluated once for all of them (parameters not batched),
        and all nodes shared by the same inputs are summed inside one reverse pass
        (:meth:`~explaind.kernel.functional.Segment.jac_nodes`); the remaining (input, node) pairs go
        through one ``vmap``. ``chunk`` bounds the inputs or pairs per call. The quadrature weights
        scale the differentiated outputs. ``out`` (``(T, O, D_b)``, overwritten) receives the result
        when given.
        """
        T = plan.t.shape[0]
        names: Sequence[str] = block.names
        factored = self.factored_jacobian(seg, names)
        if factored is not None:
            return factored.step_jacobian(seg.base, seg.delta, seg.X, seg.explained, seg.aux, plan.t, plan.w, names,
                                          chunk, out=out)
        if out is None:
            flat = torch.zeros(T, n_outputs, block.size, dtype=self.dtype, device=self.device)
        else:
            flat = out.zero_()
        acc = {name: flat[..., sl] for name, sl in block.slices()}
        full = torch.arange(T, device=self.device)

        def add(rows: Tensor, jac: Params) -> None:
            whole = rows.shape[0] == T and bool((rows == full).all())
            for name in names:
                j = jac[name].reshape(rows.shape[0], n_outputs, -1)
                if whole:
                    acc[name] += j
                else:
                    acc[name].index_add_(0, rows, j)

        shared, (idx, t, w) = plan.by_node(min_shared=min(8, max(2, T // 2)))
        groups: dict[tuple[int, ...], list[tuple[Tensor, Tensor, Tensor]]] = {}
        for tu, sub, wu in shared:  # nodes used by the same inputs are summed in one reverse pass
            groups.setdefault(tuple(sub.tolist()), []).append((tu, sub, wu))
        for members in groups.values():
            sub = members[0][1]
            tg = torch.stack([m[0] for m in members])
            wg = torch.stack([m[2] for m in members], dim=1)  # (S, U)
            for i in range(0, sub.shape[0], chunk):
                add(sub[i:i + chunk], seg.jac_nodes(tg, names, sub[i:i + chunk], wg[i:i + chunk]))
        for i in range(0, idx.shape[0], chunk):
            add(idx[i:i + chunk], seg.jac_pairs(idx[i:i + chunk], t[i:i + chunk], names, w[i:i + chunk]))
        return flat
