r"""Quadrature-weighted Jacobians of ``nn.Linear``/``nn.Embedding`` parameters from layer factors.

For a linear layer :math:`z_r = W a_r + b` applied at positions :math:`r` (sequence positions,
or none) of one input, the Jacobian of an explained output :math:`g_o` factorises,

.. math::

    \frac{\partial g_o}{\partial W} = \sum_r \delta_{o,r}\, a_r^\top, \qquad
    \frac{\partial g_o}{\partial b} = \sum_r \delta_{o,r}, \qquad
    \delta_{o,r} = \frac{\partial g_o}{\partial z_r},

and for an embedding :math:`z_r = E[k_r]`, :math:`\partial g_o / \partial E[v] = \sum_{r: k_r = v} \delta_{o,r}`.

**One batch per step.** A step's plan asks for :math:`\nabla g(\theta_s + t_{iq}\Delta\theta_s, x_i)`
at every (input, node) entry. When every trainable parameter lies in such a layer, each layer is
affine in its parameters, so the layer at the segment point :math:`t` is
:math:`z = z(\theta_s) + t\, z(\Delta\theta_s)` (for a linear layer :math:`W_s a + b_s + t(\Delta W a + \Delta b)`).
All entries of a step therefore run as one batch through the model at :math:`\theta_s`, a forward
hook adding :math:`t_e\, z_{\Delta}` per row :math:`e` — no per-entry copy of the parameters. The same
hook adds a zero offset :math:`\epsilon` to the layer output and keeps the layer input :math:`a`;
one backward pass per output (``is_grads_batched``) gives :math:`\delta = \partial g / \partial\epsilon`
for every layer and entry. The quadrature sum over an input's nodes then enters one batched
matrix product per layer,

.. math::

    \Phi_W[x] = \sum_q w_{xq} \sum_r \delta_{q,o,r}[x]\, a_{q,r}[x]^\top = G[x]\, A[x],
    \quad G[x] \in \mathbb{R}^{(O\cdot\mathrm{out}) \times (Q R)},\; A[x] \in \mathbb{R}^{(Q R) \times \mathrm{in}},

so no weight gradient is formed per entry.

This is valid only when the rows of a batch do not interact (evaluation mode, no batch
statistics), each layer keeps the batch as its leading axis, and each covered parameter is used
only through its layer. :meth:`FactoredJacobian.build` therefore checks outputs and Jacobians
against a plain ``functional_call`` and ``torch.func.jacrev`` before the path is used, and returns
``None`` (the engine then uses ``vmap(jacrev)``) when a check fails or a parameter is not covered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev

from .functional import Explained, FunctionalModel, Params

__all__ = ["FactoredJacobian", "LayerHooks", "covered_parameters", "CHECK_TOLERANCE"]


#: Largest relative disagreement with ``jacrev`` accepted by the start-up check, per dtype.
CHECK_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def covered_parameters(module: nn.Module, names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Trainable parameters that the factored path handles: ``name -> (module prefix, role)``.

    ``role`` is ``"weight"`` or ``"bias"`` of an ``nn.Linear``, or ``"table"`` of an ``nn.Embedding``.
    Embeddings with ``max_norm`` (which rewrites the table) or ``scale_grad_by_freq`` are not covered.
    """
    wanted = set(names)
    out: dict[str, tuple[str, str]] = {}
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if type(sub) is nn.Linear:
            if f"{dot}weight" in wanted:
                out[f"{dot}weight"] = (prefix, "weight")
            if sub.bias is not None and f"{dot}bias" in wanted:
                out[f"{dot}bias"] = (prefix, "bias")
        elif type(sub) is nn.Embedding and sub.max_norm is None and not sub.scale_grad_by_freq:
            if f"{dot}weight" in wanted:
                out[f"{dot}weight"] = (prefix, "table")
    return out


class LayerHooks:
    """Forward hooks on covered layers, active inside a ``with`` block; rows ride on a per-row ``t``.

    Subclasses implement ``_hook(prefix)``; :meth:`_rows_t` checks that a layer keeps the batch
    axis first and returns ``t`` shaped to broadcast against its output.
    """

    def __init__(self, layers: Mapping[str, nn.Module]):
        self.layers = dict(layers)
        self.t: Tensor | None = None

    def __enter__(self) -> LayerHooks:
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in self.layers.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def _hook(self, prefix: str) -> Any:
        raise NotImplementedError

    def _rows_t(self, prefix: str, output: Tensor) -> Tensor:
        n = self.t.shape[0]
        if output.dim() == 0 or output.shape[0] != n:
            raise ValueError(f"layer {prefix!r} does not keep the batch axis first")
        return self.t.reshape(n, *([1] * (output.dim() - 1)))


class _SegmentRows(LayerHooks):
    """Forward hooks placing each batch row at its own point ``theta_s + t_e * delta`` of the segment.

    Inside the context, each hooked layer returns ``z(theta_s) + t_e z(delta) + eps`` with a fresh
    zero ``eps`` requiring grad, and keeps its input.
    """

    def __init__(self, layers: Mapping[str, nn.Module]):
        super().__init__(layers)
        self.inputs: dict[str, list[Tensor]] = {}
        self.offsets: dict[str, list[Tensor]] = {}
        self.delta: Params = {}

    def run(self, delta: Mapping[str, Tensor | None], t: Tensor) -> _SegmentRows:
        self.delta = dict(delta)
        self.t = t
        return self

    def __enter__(self) -> _SegmentRows:
        self.inputs = {p: [] for p in self.layers}
        self.offsets = {p: [] for p in self.layers}
        super().__enter__()
        return self

    def _hook(self, prefix: str) -> Any:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
            a = inputs[0]
            t = self._rows_t(prefix, output)
            dw, db = self.delta.get(prefix + ":w"), self.delta.get(prefix + ":b")
            if type(mod) is nn.Embedding:
                moved = None if dw is None else F.embedding(a, dw)
            elif dw is not None:
                moved = F.linear(a, dw, db)
            else:
                moved = None if db is None else db.expand_as(output)
            if moved is not None:
                output = output + t * moved
            eps = torch.zeros_like(output, requires_grad=True)
            self.inputs[prefix].append(a.detach())
            self.offsets[prefix].append(eps)
            return output + eps

        return hook


class FactoredJacobian:
    r"""Quadrature-weighted Jacobians of a step from layer factors.

    :math:`\Phi_s(x_i) = \sum_q w_{iq} \nabla_\theta g(\theta_s + t_{iq}\Delta\theta_s, x_i)`, shape ``(T, O, D_b)``.
    Build with :meth:`build` (``None`` when the factored path does not apply); then
    :meth:`step_jacobian` gives :math:`\Phi_s` for all inputs of a plan.
    """

    def __init__(self, fm: FunctionalModel, covered: Mapping[str, tuple[str, str]]):
        self.fm = fm
        self.covered = dict(covered)
        prefixes = sorted({p for p, _ in self.covered.values()})
        self.layers = {p: fm.module.get_submodule(p) for p in prefixes}
        self.rows = _SegmentRows(self.layers)

    @classmethod
    def build(cls, fm: FunctionalModel, names: Sequence[str], base: Params, delta: Params, X: Tensor,
              explained: Explained) -> tuple[FactoredJacobian | None, str]:
        """The factored path for this model (or ``None``) and, when ``None``, the reason.

        Every name in ``names`` must be covered; on the first two inputs, at two points of the
        segment ``(base, delta)``, the Jacobians from the batched rows must match ``jacrev`` within
        :data:`CHECK_TOLERANCE`.
        """
        covered = covered_parameters(fm.module, names)
        missing = [n for n in names if n not in covered]
        if missing:
            return None, f"parameters outside nn.Linear/nn.Embedding layers: {', '.join(missing[:5])}"
        this = cls(fm, covered)
        n = min(2, X.shape[0])
        x, aux = X[:n], explained.aux[:n]
        t = torch.tensor([0.3, 0.8][:n], dtype=fm.dtype, device=fm.device)
        tol = CHECK_TOLERANCE.get(fm.dtype, 1e-4)
        try:
            got = this.step_jacobian(base, delta, x, explained, aux, t[:, None], torch.ones(n, 1, dtype=fm.dtype,
                                                                                               device=fm.device),
                                     names, chunk=n)
        except Exception as exc:  # an unsupported layer or operation: use the generic path
            return None, f"the batched rows failed: {exc}"
        offsets = [0]
        for name in names:
            offsets.append(offsets[-1] + base[name].numel())
        for i in range(n):
            point = {k: base[k] + t[i] * delta[k] for k in base}

            def g(p: Params, i: int = i, point: Params = point) -> Tensor:
                return explained(fm, {**point, **p}, x[i:i + 1], aux[i:i + 1])[0]

            want = jacrev(g)({k: point[k] for k in names})
            for j, name in enumerate(names):
                ref = want[name].reshape(want[name].shape[0], -1)
                err = float((got[i, :, offsets[j]:offsets[j + 1]] - ref).abs().max())
                if not err <= tol * max(float(ref.abs().max()), 1e-30):
                    return None, f"the start-up check failed: {name} differs from jacrev by {err:.3g}"
        return this, ""

    def covers(self, names: Sequence[str]) -> bool:
        """Whether every name in ``names`` is handled here."""
        return all(n in self.covered for n in names)

    def _layer_delta(self, delta: Params) -> dict[str, Tensor | None]:
        out: dict[str, Tensor | None] = {}
        for name, (prefix, role) in self.covered.items():
            out[prefix + (":b" if role == "bias" else ":w")] = delta[name]
        return out

    def _factors(self, base: Params, layer_delta: Mapping[str, Tensor | None], x: Tensor, explained: Explained,
                 aux: Tensor, t: Tensor, we: Tensor) -> tuple[dict[str, list[tuple[Tensor, Tensor]]], int]:
        """``prefix -> [(w_e delta (O, E, R, out), layer input), ...]`` for rows ``x`` at nodes ``t (E,)``.

        The quadrature weights ``we (E,)`` scale the cotangents, so the output gradients come out weighted.
        """
        with torch.enable_grad(), self.rows.run(layer_delta, t) as rows:
            out = explained(self.fm, base, x, aux)  # (E, O)
        E, O = out.shape
        flat = [(p, k) for p in self.layers for k in range(len(rows.offsets[p]))]
        cot = torch.eye(O, dtype=out.dtype, device=out.device).unsqueeze(1) * we[None, :, None]  # (O, E, O)
        grads = torch.autograd.grad(out, [rows.offsets[p][k] for p, k in flat], grad_outputs=cot,
                                    is_grads_batched=True, allow_unused=True)
        result: dict[str, list[tuple[Tensor, Tensor]]] = {p: [] for p in self.layers}
        for (p, k), d in zip(flat, grads):
            z = rows.offsets[p][k]
            d = torch.zeros((O, *z.shape), dtype=z.dtype, device=z.device) if d is None else d
            result[p].append((d.reshape(O, E, -1, z.shape[-1]), rows.inputs[p][k]))
        return result, O

    def sample_grads(self, params: Params, names: Sequence[str], X: Tensor, Y: Tensor, weights: Tensor,
                     chunk: int) -> Tensor:
        r"""Weighted per-sample training-loss gradients :math:`w_k \nabla_{\theta_b} \ell_k(\theta)`, ``(B, D_b)``.

        One forward and one backward pass of the summed loss per chunk of ``chunk`` samples: each
        sample's loss depends only on its own layer offsets, so :math:`\partial / \partial\epsilon` gives
        every sample's output gradients, contracted with its layer inputs.
        """
        B = X.shape[0]
        sizes = [params[n].numel() for n in names]
        result = torch.empty(B, sum(sizes), dtype=self.fm.dtype, device=self.fm.device)
        for lo in range(0, B, max(1, chunk)):
            xs, ys, ws = X[lo:lo + chunk], Y[lo:lo + chunk], weights[lo:lo + chunk]
            n = xs.shape[0]
            with torch.enable_grad(), self.rows.run({}, torch.zeros(n, dtype=ws.dtype, device=ws.device)) as rows:
                total = (self.fm.sample_loss(params, xs, ys) * ws).sum()
            flat = [(p, k) for p in self.layers for k in range(len(rows.offsets[p]))]
            grads = torch.autograd.grad(total, [rows.offsets[p][k] for p, k in flat], allow_unused=True)
            factors: dict[str, list[tuple[Tensor, Tensor]]] = {p: [] for p in self.layers}
            for (p, k), d in zip(flat, grads):
                z = rows.offsets[p][k]
                d = torch.zeros_like(z) if d is None else d
                factors[p].append((d.reshape(1, n, -1, z.shape[-1]), rows.inputs[p][k]))
            owner = torch.arange(n, device=X.device)
            buckets = [(owner, owner[:, None])]
            out = result[lo:lo + n]
            offset = 0
            for name, size in zip(names, sizes):
                self._reduce(name, factors, owner, buckets, 1, out[:, None, offset:offset + size])
                offset += size
        return result

    def step_jacobian(self, base: Params, delta: Params, X: Tensor, explained: Explained, aux: Tensor, t: Tensor,
                      w: Tensor, names: Sequence[str], chunk: int, out: Tensor | None = None) -> Tensor:
        r""":math:`\Phi_s` on the block ``names`` for inputs ``X (T, ...)`` with nodes ``t`` and weights ``w (T, Q)``.

        Entries with weight 0 are skipped. ``chunk`` bounds the inputs per batch. Returns
        ``(T, O, D_b)`` in the flat order of ``names``, written into ``out`` when given (its
        previous content is overwritten).
        """
        T, Q = w.shape
        layer_delta = self._layer_delta(delta)
        sizes = [base[n].numel() for n in names]
        result = out
        for lo in range(0, T, max(1, chunk)):
            ww, tt = w[lo:lo + chunk], t[lo:lo + chunk]
            mask = ww != 0
            Tc = ww.shape[0]
            owner = torch.arange(Tc, device=w.device)[:, None].expand_as(mask)[mask]  # input of each entry
            factors, O = self._factors(base, layer_delta, X[lo:lo + chunk][owner], explained,
                                       aux[lo:lo + chunk][owner], tt[mask], ww[mask])
            if result is None:
                result = torch.empty(T, O, sum(sizes), dtype=w.dtype, device=w.device)
            rows_out = result[lo:lo + Tc]
            buckets = _buckets(mask)
            offset = 0
            for name, size in zip(names, sizes):
                self._reduce(name, factors, owner, buckets, O, rows_out[..., offset:offset + size])
                offset += size
            empty = ~mask.any(1)
            if bool(empty.any()):
                rows_out[empty] = 0
        if result is None:
            raise ValueError("step_jacobian needs at least one input")
        return result

    def _reduce(self, name: str, factors: Mapping[str, list[tuple[Tensor, Tensor]]], owner: Tensor,
                buckets: list[tuple[Tensor, Tensor]], O: int, out: Tensor) -> None:
        """Sum one parameter's (weighted) factors over each input's entries; write ``out (Tc, O, numel)``."""
        prefix, role = self.covered[name]
        layer = self.layers[prefix]
        calls = factors[prefix]
        Tc = out.shape[0]
        dev, dt = out.device, out.dtype
        if role == "bias":
            total = torch.zeros(Tc, O, layer.out_features, dtype=dt, device=dev)
            for d, _ in calls:
                total.index_add_(0, owner, d.sum(2).transpose(0, 1))
            out.copy_(total)
            return
        if role == "weight":
            n_out, n_in = layer.out_features, layer.in_features
            # per entry: G_e^T (R, O*out) and A_e (R, in); Phi_W[x] = sum_e G_e A_e as one bmm per bucket
            g_rows = [d.permute(1, 2, 0, 3).reshape(d.shape[1], -1, O * n_out) for d, _ in calls]  # (E, R, O*out)
            a_rows = [a.reshape(a.shape[0], -1, n_in) for _, a in calls]  # (E, R, in)
            whole = len(buckets) == 1 and buckets[0][0].numel() == Tc
            for inputs, entries in buckets:  # inputs with the same number of entries: no padding
                k = entries.shape[0]
                if whole:  # entries are 0..E-1 in order
                    G = torch.cat([g.reshape(k, -1, O * n_out) for g in g_rows], dim=1)
                    A = torch.cat([a.reshape(k, -1, n_in) for a in a_rows], dim=1)
                else:
                    G = torch.cat([g[entries].reshape(k, -1, O * n_out) for g in g_rows], dim=1)
                    A = torch.cat([a[entries].reshape(k, -1, n_in) for a in a_rows], dim=1)
                part = torch.bmm(G.transpose(1, 2), A).reshape(k, O, n_out * n_in)
                if whole:
                    out.copy_(part)
                else:  # buckets partition the inputs
                    out.index_copy_(0, inputs, part)
            return
        V, dim = layer.num_embeddings, layer.embedding_dim
        acc = torch.zeros(Tc * V, O, dim, dtype=dt, device=dev)
        for d, tokens in calls:
            tok = tokens.reshape(tokens.shape[0], -1).long()
            rows = (owner[:, None] * V + tok).reshape(-1)
            vals = d.permute(1, 2, 0, 3).reshape(-1, O, dim)
            if layer.padding_idx is not None:
                keep = tok.reshape(-1) != layer.padding_idx
                rows, vals = rows[keep], vals[keep]
            acc.index_add_(0, rows, vals)
        out.copy_(acc.reshape(Tc, V, O, dim).permute(0, 2, 1, 3).reshape(Tc, O, V * dim))


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
