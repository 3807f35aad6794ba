r"""Per-coordinate path contributions of a recorded run, computed directly from its parameters.

For evaluation inputs :math:`x` (a chunk of ``B``), outputs :math:`o` and coordinates :math:`p`:

.. math::

    A[x, o, p] = \sum_{s=0}^{N-1} \Big( \sum_{q} w_q \, \nabla_\theta f_o(x; \theta_s + t_q \Delta\theta_s) \Big)_p
    \Delta\theta_s[p],

with Gauss–Legendre nodes :math:`t_q` and weights :math:`w_q` on :math:`[0, 1]`. Summed over
:math:`p`, :math:`A` telescopes to :math:`f(x; \theta_N) - f(x; \theta_0)` up to the quadrature error.

Two ways to get the per-example gradients:

``"vmap"``
    ``torch.func.vmap(jacrev(f))``: any model; materialises a ``(B, O, D)`` Jacobian per node.
``"factored"``
    for parameters of ``nn.Linear`` modules, the gradient factorises:
    :math:`\partial f_o / \partial W_{ij} = \sum_r g_{o}[r, i]\, a[r, j]` with :math:`a` the layer input
    and :math:`g_o` the gradient of :math:`f_o` with respect to the layer output (``r`` runs over
    extra leading positions, e.g. sequence positions). The factors of a block of steps are
    stacked and contracted with one batched matrix product,
    :math:`A \mathrel{+}= G\,H` with :math:`G[x,i] \in \mathbb{R}^{O \times KR}` and
    :math:`H[x,i] \in \mathbb{R}^{KR \times \text{in}}`, so the Jacobian is never written per step.
    Other parameters (convolutions, norms, embeddings, ...) use ``"vmap"``. A module called more
    than once per forward pass (weight sharing) makes the whole model fall back to ``"vmap"``.

Both assume the examples of a batch do not interact (no batch statistics: the model runs in
eval mode).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

__all__ = ["gauss_legendre", "path_chunks"]

logger = logging.getLogger(__name__)

#: Most (step, node) entries contracted in one batched product.
_MAX_BLOCK = 64
#: Default bound on ``B * O * D``, the accumulator of one chunk of inputs (numbers).
CHUNK_ELEMENTS = 2**25


def gauss_legendre(n: int) -> tuple[list[float], list[float]]:
    """Nodes and weights of the ``n``-point Gauss–Legendre rule on ``[0, 1]`` (weights sum to 1)."""
    x, w = np.polynomial.legendre.leggauss(n)
    return [float(t) for t in (x + 1.0) / 2.0], [float(v) for v in w / 2.0]


class _Linears:
    """The ``nn.Linear`` modules whose weight is trainable, and hooks capturing their inputs/outputs."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.layers: dict[str, tuple[nn.Module, str, str | None]] = {}
        for prefix, module in model.named_modules():
            if type(module) is not nn.Linear:
                continue
            weight = f"{prefix}.weight" if prefix else "weight"
            bias = f"{prefix}.bias" if prefix else "bias"
            if weight in names:
                self.layers[prefix] = (module, weight, bias if bias in names else None)
        self.captured: dict[str, list[tuple[Tensor, Tensor]]] = {}

    @property
    def covered(self) -> set[str]:
        out = set()
        for _, weight, bias in self.layers.values():
            out.add(weight)
            if bias is not None:
                out.add(bias)
        return out

    def forward(self, template: nn.Module, params: dict[str, Tensor], xs: Tensor) -> Tensor:
        self.captured = {p: [] for p in self.layers}
        handles = []
        for prefix, (module, _, _) in self.layers.items():
            def hook(mod: nn.Module, inputs: tuple, output: Tensor, prefix: str = prefix) -> None:
                self.captured[prefix].append((inputs[0].detach(), output))
            handles.append(module.register_forward_hook(hook))
        try:
            out = functional_call(template, params, (xs,))
        finally:
            for h in handles:
                h.remove()
        return out.reshape(xs.shape[0], -1)

    def single_use(self) -> bool:
        return all(len(v) == 1 for v in self.captured.values())

    def factors(self, out: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """``prefix -> (g, a)`` with ``g`` of shape ``(O, B, R, out)`` and ``a`` of shape ``(B, R, in)``."""
        prefixes = list(self.layers)
        zs = [self.captured[p][0][1] for p in prefixes]
        B, O = out.shape
        # one backward pass per output, batched: cotangent e_o for every example
        eye = torch.eye(O, dtype=out.dtype, device=out.device).unsqueeze(1).expand(O, B, O)
        gs = torch.autograd.grad(out, zs, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        result = {}
        for prefix, z, g in zip(prefixes, zs, gs):
            a = self.captured[prefix][0][0]
            g = torch.zeros((O, *z.shape), dtype=z.dtype, device=z.device) if g is None else g.detach()
            result[prefix] = (g.reshape(O, B, -1, z.shape[-1]), a.reshape(B, -1, a.shape[-1]))
        return result


class _Block:
    r"""Factors of up to ``K`` (step, node) entries of one ``nn.Linear`` weight, contracted at once.

    ``G[x, i, o, (k, r)] = w_k g_k[o, x, r, i]`` and ``H[x, i, (k, r), j] = a_k[x, r, j] \Delta W_k[i, j]``;
    :meth:`flush` adds ``G @ H`` (shape ``(B, out, O, in)``) to the accumulator.
    """

    def __init__(self, B: int, O: int, R: int, out: int, inp: int, K: int, like: Tensor):
        self.K, self.R, self.n = K, R, 0
        self.G = torch.zeros((B, out, O, K * R), dtype=like.dtype, device=like.device)
        self.H = torch.zeros((B, out, K * R, inp), dtype=like.dtype, device=like.device)
        self.acc = torch.zeros((B, out, O, inp), dtype=like.dtype, device=like.device)

    def add(self, w: float, g: Tensor, a: Tensor, delta: Tensor) -> None:
        cols = slice(self.n * self.R, (self.n + 1) * self.R)
        self.G[..., cols].copy_(g.permute(1, 3, 0, 2)).mul_(w)
        torch.mul(a.unsqueeze(1), delta.unsqueeze(0).unsqueeze(2), out=self.H[:, :, cols, :])
        self.n += 1
        if self.n == self.K:
            self.flush()

    def flush(self) -> None:
        if self.n == 0:
            return
        used = self.n * self.R
        B, out, O, inp = self.acc.shape
        acc3 = self.acc.view(B * out, O, inp)
        acc3.baddbmm_(self.G[..., :used].reshape(B * out, O, used), self.H[:, :, :used, :].reshape(B * out, used, inp))
        self.n = 0


def path_chunks(trajectory: Any, X: Tensor, *, nodes: int, batch_size: int | None, device: torch.device,
                dtype: torch.dtype, method: str = "factored",
                block_elements: int = 2**24) -> Iterator[dict[str, Tensor]]:
    """Yield, per chunk of ``batch_size`` inputs, ``name -> A`` of shape ``(B, O, *param_shape)`` (signed).

    ``batch_size=None`` takes as many inputs per chunk as keep ``B * O * D`` within
    :data:`CHUNK_ELEMENTS`.

    Memory: ``B * O * D`` numbers for the accumulators plus, for ``"factored"``, about
    ``block_elements`` numbers per block of steps.
    """
    template = copy.deepcopy(trajectory.model).to(device=device, dtype=dtype).eval()
    for p in template.parameters():
        p.requires_grad_(False)
    constants = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                 for k, v in trajectory.constants().items()}
    names = list(trajectory.param_names)
    t_nodes, t_weights = gauss_legendre(nodes)
    linears = _Linears(template, names) if method == "factored" else None
    if linears is not None and linears.layers:
        probe = {n: v.to(device=device, dtype=dtype) for n, v in trajectory.params(0).items()}
        with torch.no_grad():
            linears.forward(template, {**probe, **constants}, X[:1])
        if not linears.single_use():
            logger.info("path contributions: a Linear module is called more than once; using vmap for all")
            linears = None
    if linears is not None and not linears.layers:
        linears = None
    covered = linears.covered if linears is not None else set()
    other = [n for n in names if n not in covered]

    def single(p_other: dict[str, Tensor], p_rest: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(template, {**p_rest, **p_other, **constants}, (x.unsqueeze(0),)).reshape(-1)

    jacobian = vmap(jacrev(single), in_dims=(None, None, 0))

    def cast(state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: state[n].to(device=device, dtype=dtype) for n in names}

    if batch_size is None:
        probe = {n: v.to(device=device, dtype=dtype) for n, v in trajectory.params(0).items()}
        with torch.no_grad():
            n_out = functional_call(template, {**probe, **constants}, (X[:1],)).numel()
        size = sum(v.numel() for v in probe.values())
        batch_size = max(1, min(X.shape[0], CHUNK_ELEMENTS // max(1, n_out * size)))
    for start in range(0, X.shape[0], batch_size):
        xs = X[start:start + batch_size]
        yield _chunk(trajectory, xs, names, other, linears, jacobian, cast, constants, template,
                     t_nodes, t_weights, block_elements)


def _chunk(trajectory: Any, xs: Tensor, names: list[str], other: list[str], linears: _Linears | None,
           jacobian: Any, cast: Any, constants: dict[str, Tensor], template: nn.Module,
           t_nodes: list[float], t_weights: list[float], block_elements: int) -> dict[str, Tensor]:
    B = xs.shape[0]
    acc: dict[str, Tensor] = {}
    blocks: dict[str, _Block] = {}
    current = cast(trajectory.params(0))
    for s in range(trajectory.n_steps):
        following = cast(trajectory.params(s + 1))
        delta = {n: following[n] - current[n] for n in names}
        for t, w in zip(t_nodes, t_weights):
            theta = {n: current[n] + t * delta[n] for n in names}
            if linears is not None:
                live = {n: (v.requires_grad_(True) if n in linears.covered else v) for n, v in theta.items()}
                out = linears.forward(template, {**live, **constants}, xs)
                for prefix, (g, a) in linears.factors(out).items():
                    module, weight, bias = linears.layers[prefix]
                    if bias is not None:
                        term = w * g.sum(dim=2).transpose(0, 1) * delta[bias]
                        acc[bias] = term if bias not in acc else acc[bias] + term
                    if weight not in blocks:
                        R = g.shape[2]
                        K = max(1, min(_MAX_BLOCK, trajectory.n_steps * len(t_nodes),
                                       block_elements // max(1, B * R * module.weight.numel())))
                        blocks[weight] = _Block(B, g.shape[0], R, g.shape[3], a.shape[2], K, g)
                    blocks[weight].add(w, g, a, delta[weight])
            if other:
                with torch.no_grad():
                    jac = jacobian({n: theta[n] for n in other},
                                   {n: theta[n].detach() for n in names if n not in other}, xs)
                for n in other:
                    term = w * jac[n] * delta[n]
                    acc[n] = term if n not in acc else acc[n] + term
        current = following
    for weight, block in blocks.items():
        block.flush()
        acc[weight] = block.acc.permute(0, 2, 1, 3)  # (B, O, out, in)
    if len(acc) < len(names):  # no steps, or parameters that never moved along a used path
        out_dim = functional_call(template, {**cast(trajectory.params(0)), **constants}, (xs[:1],)).numel()
        final = cast(trajectory.params(trajectory.n_steps))
        for n in names:
            if n not in acc:
                acc[n] = torch.zeros((B, out_dim, *final[n].shape), dtype=final[n].dtype, device=final[n].device)
    return {n: acc[n].detach() for n in names}
