r"""The layer-factored evaluator: many rows in one batch through layers affine in their parameters.

When every trainable parameter lies in a layer with a registered rule
(:mod:`~explaind.kernel.layer_rules`), forward hooks replace each covered layer's output so that
each row of one batch sits at its own point of a segment, with no parameter copy per row:

* **Jacobians** (:meth:`LayerEvaluator.jacobian`): all (input, node) entries of a step run as one
  batch at :math:`\theta_s`, each row shifted to :math:`\theta_s + t_e\Delta\theta_s`; a zero offset
  :math:`\epsilon` on each layer output gives :math:`\delta = \partial g / \partial\epsilon` for every layer
  and entry in one backward pass per output (``is_grads_batched``, quadrature weights folded into
  the cotangents), and the rules reduce :math:`\Phi_s` from :math:`\delta` and the layer inputs;
* **per-sample gradients**: the same offsets on the summed training loss;
* **rows of many steps** (:meth:`LayerEvaluator.slopes` on :class:`~explaind.kernel.evaluate.Rows`):
  each layer computes its output at the row's own step from stacked parameters, and
  :math:`h' = \partial h / \partial t` by forward mode in the per-row :math:`t`.

Valid when the rows of a batch do not interact (evaluation mode), each layer keeps the batch axis
first (or broadcasts one row over it; second in the layers of a sequence-first transformer block)
and each covered parameter is used only through covered layers
(a tied one through several: its Jacobian is the sum over them): each capability is checked
once against the :class:`~explaind.kernel.autograd.AutogradEvaluator` on the first data it sees,
and falls back to it (``strict``: raises) when the check fails. Other primitives are the
fallback's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

from ..exceptions import ConfigError
from .autograd import AutogradEvaluator
from .evaluate import CHECK_TOLERANCE, Batch, Grid, Rows, Segment, StepStack, rows_for_outputs
from .explained import Params
from .layer_hooks import SegmentRows, StepRows, batch_axes, step_blocks
from .layer_rules import Factors, layer_rule, parameter_uses, rule_names
from .layout import ParamLayout
from .products import FactorProducts
from .quadrature import NodePlan
from .scalar_duals import ScalarDuals

__all__ = ["LayerEvaluator", "FACTOR_BYTES"]

#: Bytes of layer factors (each (input, node) entry's output gradients for every output, and its layer
#: inputs) that one batch of a factored Jacobian holds at most; its backward pass is of the same order.
FACTOR_BYTES = 2**27

logger = logging.getLogger(__name__)

_FALLBACK = {"jacobian": "factored Jacobians off (%s); using vmap(jacrev)",
             "rows": "batched rows off (%s); using vmap over per-row parameters"}


class LayerEvaluator:
    """Layer-factored primitives, each checked once against ``fallback`` (see the module docstring).

    Parameters
    ----------
    fallback : AutogradEvaluator
        Used for what the rules do not cover, and as the reference of the start-up checks.
    names : sequence of str
        All trainable parameter names.
    strict : bool
        Raise :class:`~explaind.exceptions.ConfigError` instead of falling back (``factored="always"``).
    """

    name = "layers"

    def __init__(self, fallback: AutogradEvaluator, names: tuple[str, ...], strict: bool = False):
        self.fallback = fallback
        self.fm = fallback.fm
        self.names = names
        self.strict = strict
        #: every use of a covered parameter (several for a tied one), and its first use
        self.uses = parameter_uses(self.fm.module, names)
        self.covered = {name: used[0] for name, used in self.uses.items()}
        prefixes = sorted({p for used in self.uses.values() for p, _ in used})
        self.layers = {p: self.fm.module.get_submodule(p) for p in prefixes}
        self.rules = {p: layer_rule(m) for p, m in self.layers.items()}
        axes = batch_axes(self.fm.module, prefixes)
        self.segment_rows = SegmentRows(self.layers, self.rules, axes)
        self.step_rows = StepRows(self.layers, self.rules, self.uses, axes)
        #: per kind of explained function (its number of outputs O is fixed by it), the largest bytes of one
        #: (input, node) entry's factors seen so far; sizes the batches of :meth:`_factored_jacobian` without a
        #: one-input measuring batch at every call
        self._entry_bytes: dict[str, int] = {}
        #: per capability: ``None`` unchecked, ``True`` in use, else the reason it is off
        self.state: dict[str, bool | str | None] = {"jacobian": None, "rows": None}
        missing = [n for n in names if n not in self.covered]
        if missing:
            rules = ", ".join(rule_names())
            self.state = {k: f"parameters outside layers with a rule: {', '.join(missing[:5])} (layer rules "
                             f"exist for {rules}; register_layer_rule adds one)" for k in self.state}

    @property
    def used(self) -> set[str]:
        """Capabilities that passed their check and are in use (``"jacobian"``, ``"rows"``)."""
        return {k for k, v in self.state.items() if v is True}

    def _ready(self, kind: str, check: Callable[[], str]) -> bool:
        """Whether capability ``kind`` applies; ``check()`` (an empty string or the reason) runs once."""
        if self.state[kind] is None:
            try:
                reason = check()
            except Exception as exc:  # an unsupported layer or operation: use the generic path
                reason = f"the batched rows failed: {exc}"
            self.state[kind] = True if not reason else reason
        state = self.state[kind]
        if state is True:
            return True
        if self.strict:
            raise ConfigError(f"invalid value for 'factored': 'always' does not apply to this model ({state}). "
                              f"Use factored='auto' or 'never'.")
        if not getattr(self, f"_logged_{kind}", False):
            logger.info(_FALLBACK[kind], state)
            setattr(self, f"_logged_{kind}", True)
        return False

    # ------------------------------------------------------------------ JVPs
    def slopes(self, stack: StepStack, rows: Rows | Grid) -> tuple[Tensor, Tensor]:
        """Rows of many steps in one batch per chunk; grids by the fallback."""
        if isinstance(rows, Grid) or not self._ready("rows", lambda: self._check_rows(stack)):
            return self.fallback.slopes(stack, rows)
        return self._rows(stack, rows, min(self.fallback.rows_chunk,
                                           rows_for_outputs(stack.explained.n_outputs, self.fm.dtype,
                                                            self.fallback.output_bytes)))

    def jvp(self, segment: Segment, plan: NodePlan, tangents: Params) -> Tensor:
        """The fallback's weighted JVPs."""
        return self.fallback.jvp(segment, plan, tangents)

    def _rows(self, stack: StepStack, rows: Rows, chunk: int) -> tuple[Tensor, Tensor]:
        E = rows.t.shape[0]
        order = torch.argsort(rows.steps, stable=True)
        s, i, t = rows.steps[order], rows.inputs[order], rows.t[order]
        chunk = max(1, chunk)
        h = d = None
        for lo in range(0, E, chunk):  # each batch written to its rows' places: no second copy of all the outputs
            p, dp = self._row_batch(stack, s[lo:lo + chunk], i[lo:lo + chunk], t[lo:lo + chunk])
            if h is None:
                h, d = p.new_empty(E, *p.shape[1:]), dp.new_empty(E, *dp.shape[1:])
            h[order[lo:lo + chunk]], d[order[lo:lo + chunk]] = p, dp
        return h, d

    def _row_batch(self, stack: StepStack, sidx: Tensor, idx: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Rows sorted by step, in blocks of one step each (:func:`~explaind.kernel.layer_hooks.step_blocks`)."""
        block_step, C, pad, slot = step_blocks(sidx)
        idx, t = idx[pad], t[pad]
        explained, x, aux = stack.explained, stack.X[idx], stack.explained.aux[idx]
        first = {n: v[int(sidx[0])] for n, v in stack.base.items()}  # any parameters: covered outputs are replaced

        def along(tt: Tensor) -> Tensor:
            self.step_rows.t = tt
            return explained(self.fm, first, x, aux)

        with self.step_rows.run(stack.base, stack.delta, block_step, C, dual=True), fwad.dual_level(), ScalarDuals():
            h, d = fwad.unpack_dual(along(fwad.make_dual(t, torch.ones_like(t))))
        return h[slot], (torch.zeros_like(h) if d is None else d)[slot]

    def _check_rows(self, stack: StepStack) -> str:
        """Probe rows (two steps, the first two inputs at two points) against the fallback."""
        probe = stack.steps(0, 2)
        S, n = probe.n_steps, min(2, stack.X.shape[0])
        dev = stack.X.device
        rows = Rows(torch.arange(S, device=dev).repeat_interleave(2 * n), torch.arange(n, device=dev).repeat(2 * S),
                    torch.tensor([0.3, 0.8], dtype=self.fm.dtype, device=self.fm.device).repeat_interleave(n).repeat(S))
        try:
            got = self._rows(probe, rows, rows_for_outputs(probe.explained.n_outputs, self.fm.dtype,
                                                               self.fallback.output_bytes))
        except Exception as exc:  # an unsupported layer or operation: use the generic path
            return f"the batched rows failed: {exc}"
        want = self.fallback.slopes(probe, rows)
        return _compare(("values", "derivatives"), got, want, self.fm.dtype, "differ from the generic path")

    # ------------------------------------------------------------------ Jacobians
    def jacobian(self, segment: Segment, plan: NodePlan, block: ParamLayout, chunk: int,
                 out: Tensor | None = None) -> Tensor:
        r""":math:`\Phi_s` from layer factors (entries of weight 0 skipped); else the fallback's."""
        if not self.ready_for_jacobian(segment) or not self.covers(block):
            return self.fallback.jacobian(segment, plan, block, chunk, out)
        return self._factored_jacobian(segment, plan.t, plan.w, block, chunk, out)

    def products(self, block: ParamLayout, T: int, O: int, chunk: int) -> FactorProducts:
        r""":math:`\sum_s \Phi_s \odot v_s` from layer factors (:class:`~explaind.kernel.products.FactorProducts`)."""
        return FactorProducts(self, block, T, O, chunk, self.fm.dtype, self.fm.device)

    def ready_for_jacobian(self, segment: Segment) -> bool:
        """Whether factored Jacobians apply (checked once, on ``segment``; ``strict`` raises otherwise)."""
        return self._ready("jacobian", lambda: self._check_jacobian(segment))

    def covers(self, block: ParamLayout) -> bool:
        """Whether every tensor of ``block`` has a layer rule."""
        return all(n in self.covered for n in block.names)

    def _factored_jacobian(self, seg: Segment, t: Tensor, w: Tensor, block: ParamLayout, chunk: int,
                           out: Tensor | None) -> Tensor:
        """Batches of at most ``chunk`` inputs whose entries' factors take at most :data:`FACTOR_BYTES`."""
        T = w.shape[0]
        entries = (w != 0).sum(1).tolist()
        result, lo, kind = out, 0, seg.explained.kind
        while lo < T:
            hi = _factor_batch(entries, lo, max(1, chunk), self._entry_bytes.get(kind, 0))
            factors, owner, mask, O = self.entry_factors(seg, t, w, slice(lo, hi))
            measured = _factor_bytes(factors) // max(1, int(mask.sum()))
            self._entry_bytes[kind] = max(self._entry_bytes.get(kind, 0), measured)
            if result is None:
                result = torch.empty(T, O, block.size, dtype=w.dtype, device=w.device)
            rows_out = result[lo:lo + mask.shape[0]]
            self._reduce(block, factors, owner, _buckets(mask), O, rows_out)
            empty = ~mask.any(1)
            if bool(empty.any()):
                rows_out[empty] = 0
            lo = hi
        if result is None:
            raise ValueError("jacobian needs at least one input")
        return result

    def entry_factors(self, seg: Segment, t: Tensor, w: Tensor,
                      rows: slice) -> tuple[dict[str, Factors], Tensor, Tensor, int]:
        """Weighted factors of the (input, node) entries of the inputs ``rows`` with nonzero weight ``w (T, Q)``.

        Returns ``prefix -> factors`` (:data:`~explaind.kernel.layer_rules.Factors`; entries in the
        row-major order of the mask), the input of each entry, the mask ``(T_c, Q)`` and ``O``.
        """
        ww, tt = w[rows], t[rows]
        mask = ww != 0
        owner = torch.arange(ww.shape[0], device=w.device)[:, None].expand_as(mask)[mask]  # input of each entry
        x, aux = seg.X[rows][owner], seg.explained.aux[rows][owner]
        delta = {use: seg.delta[name] for name, used in self.uses.items() for use in used}
        with torch.enable_grad(), self.segment_rows.run(delta, tt[mask]) as hooked:
            g = seg.explained(self.fm, seg.base, x, aux)  # (E, O)
        O = g.shape[1]
        cot = torch.eye(O, dtype=g.dtype, device=g.device).unsqueeze(1) * ww[mask][None, :, None]  # (O, E, O)
        return self._factors(hooked, g, cot, O), owner, mask, O

    def _factors(self, rows: SegmentRows, value: Tensor, cot: Tensor | None, O: int) -> dict[str, Any]:
        """``prefix -> [(d value / d offset (O, E, R, out), layer input), ...]`` by one batched backward pass.

        A composite rule's factors are grouped by site: ``prefix -> {site: [(delta, input), ...]}``.
        """
        flat = [(p, k) for p in self.layers for k in range(len(rows.offsets[p]))]
        grads = torch.autograd.grad(value, [rows.offsets[p][k] for p, k in flat], grad_outputs=cot,
                                    is_grads_batched=cot is not None, allow_unused=True)
        result: dict[str, Any] = {p: {} if rows.composite(p) else [] for p in self.layers}
        for (p, k), d in zip(flat, grads):
            z = rows.offsets[p][k]
            E = z.shape[0]
            d = torch.zeros((O, *z.shape), dtype=z.dtype, device=z.device) if d is None else d
            entry = (d.reshape(O, E, -1, z.shape[-1]), rows.inputs[p][k])
            site = rows.sites[p][k]
            (result[p] if site is None else result[p].setdefault(site, [])).append(entry)
        return result

    def _reduce(self, block: ParamLayout, factors: Mapping[str, Factors], owner: Tensor,
                buckets: list[tuple[Tensor, Tensor]], O: int, out: Tensor) -> None:
        for name, sl in block.slices():
            self.reduce_parameter(name, factors, owner, buckets, O, out[..., sl])

    def reduce_parameter(self, name: str, factors: Mapping[str, Factors], owner: Tensor,
                         buckets: list[tuple[Tensor, Tensor]], O: int, out: Tensor) -> None:
        """One parameter's Jacobian ``out (T_c, O, numel)``: the sum over its uses (one unless tied)."""
        for k, (prefix, role) in enumerate(self.uses[name]):
            part = out if k == 0 else torch.zeros_like(out)
            self.rules[prefix].reduce(self.layers[prefix], role, factors[prefix], owner, buckets, O, part)
            if k:
                out += part

    def _check_jacobian(self, seg: Segment) -> str:
        r""":math:`\Phi` of the first two inputs, one node each, against the fallback (``jacrev``)."""
        n = min(2, seg.X.shape[0])
        t = torch.tensor([0.3, 0.8][:n], dtype=self.fm.dtype, device=self.fm.device)[:, None]
        one = torch.ones(n, 1, dtype=self.fm.dtype, device=self.fm.device)
        sub = Segment(seg.base, seg.delta, seg.X[:n], seg.explained.take(slice(0, n)))
        block = ParamLayout.from_tensors(seg.base, self.names)
        try:
            got = self._factored_jacobian(sub, t, one, block, n, None)
        except Exception as exc:  # an unsupported layer or operation: use the generic path
            return f"the batched rows failed: {exc}"
        plan = NodePlan(t, one, torch.zeros(n, got.shape[1], dtype=one.dtype, device=one.device), None,
                        torch.ones(n, dtype=torch.long, device=one.device))
        want = self.fallback.jacobian(sub, plan, block, 1)
        for i in range(n):
            for name, sl in block.slices():
                reason = _compare((name,), (got[i, :, sl],), (want[i, :, sl],), self.fm.dtype, "differs from jacrev")
                if reason:
                    return reason
        return ""

    # ------------------------------------------------------------------ per-sample gradients
    def sample_grads(self, theta: Params, block: ParamLayout, batch: Batch, summed: bool = False) -> Tensor:
        """Per-sample gradients from layer factors once the Jacobians are in use; sums and replays by the fallback."""
        if summed or batch.replay is not None or self.state["jacobian"] is not True or not self.covers(block):
            return self.fallback.sample_grads(theta, block, batch, summed)
        B = batch.X.shape[0]
        chunk = self.fallback.rows_chunk
        result = torch.empty(B, block.size, dtype=self.fm.dtype, device=self.fm.device)
        for lo in range(0, B, chunk):
            xs, ys, ws = batch.X[lo:lo + chunk], batch.Y[lo:lo + chunk], batch.weights[lo:lo + chunk]
            n = xs.shape[0]
            at_theta = torch.zeros(n, dtype=ws.dtype, device=ws.device)
            with torch.enable_grad(), self.segment_rows.run({}, at_theta) as rows:
                total = (self.fm.sample_loss(theta, xs, ys) * ws).sum()
            owner = torch.arange(n, device=xs.device)
            self._reduce(block, self._factors(rows, total, None, 1), owner, [(owner, owner[:, None])], 1,
                         result[lo:lo + n, None, :])
        return result


def _factor_batch(entries: list[int], lo: int, chunk: int, per_entry: int) -> int:
    """End of the batch of inputs from ``lo``: at most ``chunk`` inputs and, once the bytes of one entry's
    factors are known (``per_entry > 0``; the evaluator's first batch is one input, to measure them), at most
    :data:`FACTOR_BYTES` of factors; always at least one input."""
    if not per_entry:
        return lo + 1
    hi, held = lo, 0
    while hi < min(len(entries), lo + chunk) and (hi == lo or (held + entries[hi]) * per_entry <= FACTOR_BYTES):
        held += entries[hi]
        hi += 1
    return hi


def _factor_bytes(factors: Mapping[str, Any]) -> int:
    """Bytes held by the factors; a composite rule's are grouped by site (``{site: Factors}``)."""
    def held(parts: Any) -> int:
        if isinstance(parts, Mapping):
            return sum(held(p) for p in parts.values())
        return sum(d.numel() * d.element_size() + a.numel() * a.element_size() for d, a in parts)
    return sum(held(parts) for parts in factors.values())


def _compare(labels: tuple[str, ...], got: Any, want: Any, dtype: torch.dtype, what: str) -> str:
    """The reason of the first pair differing by more than :data:`CHECK_TOLERANCE` (relative), else ``""``."""
    tol = CHECK_TOLERANCE.get(dtype, 1e-4)
    for label, g, w in zip(labels, got, want):
        err = float((g - w).abs().max())
        if not err <= tol * max(float(w.abs().max()), 1e-30):
            return f"the start-up check failed: {label} {what} by {err:.3g}"
    return ""


def _buckets(mask: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Inputs grouped by their number of entries: ``[(inputs (k,), entry indices (k, n)), ...]``.

    Entries are numbered row-major over ``mask (Tc, Q)`` (the order of ``mask.nonzero()``).
    """
    counts = mask.sum(1)
    starts = torch.cumsum(counts, 0) - counts
    out = []
    for n in torch.unique(counts).tolist():
        if n == 0:
            continue
        inputs = torch.nonzero(counts == n).reshape(-1)
        entries = starts[inputs][:, None] + torch.arange(n, device=mask.device)[None, :]
        out.append((inputs, entries))
    return out
