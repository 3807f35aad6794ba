r"""The ExPLAIND paper's modular-arithmetic transformer shape, and the 100-point midpoint baselines.

Used by ``benchmarks/bench_engine.py --workload reference``. The repository's own transformer
(``explaind_architectures.transformer``) is a residual one-layer model with causal multi-head
attention and one ReLU; the paper's experiments use another shape, rebuilt here from its
description so that the engine is measured on a model it was not tuned for:

.. math::

    x &= \sqrt{d}\, W_E[\text{tokens}]                          &&(n, 4, d) \\
    z_h &= A_h x,\quad a &= \textstyle\sum_{h=1}^{4} B_h\, \mathrm{softmax}(z_h z_h^\top / \sqrt{d/4})\, z_h
                                                                &&\text{(no mask, no residual)} \\
    y &= a + \mathrm{ReLU}(W_2\, \mathrm{ReLU}(W_1 a + b_1) + b_2) &&\text{(two ReLU layers)} \\
    \text{out} &= \log\mathrm{softmax}(W_U\, y_{[:, -1]})          &&(n, p + 2)

Each of the four heads has a single bias-free projection ``A_h`` (d -> d/4) that serves as its
query, key and value, and an output projection ``B_h`` (d/4 -> d). The log-probabilities of all
``p + 2`` tokens are the outputs.

The replica baseline follows the paper's method, written here from the maths (docs/maths.md):
the 100-point midpoint rule on every step's segment, one forward-mode JVP per node, batched over
the test inputs (:func:`midpoint_replica`). The ``train`` axis baseline is ``paper_baseline`` in
``bench_engine.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

__all__ = ["ReferenceShapeTransformer", "midpoint_replica", "relu_kinks"]


class ReferenceShapeTransformer(nn.Module):
    """Four single-projection heads, a two-ReLU MLP, log-probabilities of the last position."""

    def __init__(self, p: int, d_model: int = 64, d_mlp: int = 512, n_heads: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        n_token, d_head = p + 2, d_model // n_heads
        self.d_model, self.d_head = d_model, d_head
        self.embed = nn.Embedding(n_token, d_model)
        self.heads_in = nn.ModuleList(nn.Linear(d_model, d_head, bias=False) for _ in range(n_heads))
        self.heads_out = nn.ModuleList(nn.Linear(d_head, d_model, bias=False) for _ in range(n_heads))
        self.linear1 = nn.Linear(d_model, d_mlp)
        self.linear2 = nn.Linear(d_mlp, d_model)
        self.unembed = nn.Linear(d_model, n_token, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(n, 4)`` int64 tokens -> log-probabilities ``(n, p + 2)`` at the last position."""
        x = self.embed(tokens) * math.sqrt(self.d_model)
        a = 0
        for proj_in, proj_out in zip(self.heads_in, self.heads_out):
            z = proj_in(x)
            weights = torch.softmax(z @ z.transpose(-1, -2) / math.sqrt(self.d_head), dim=-1)
            a = a + proj_out(weights @ z)
        y = a + F.relu(self.linear2(F.relu(self.linear1(a))))
        return torch.log_softmax(self.unembed(y[:, -1]), dim=-1)


def midpoint_replica(f, theta: list[Tensor], X: Tensor, nodes: int = 100) -> Tensor:
    r"""The replica :math:`f(x;\theta_0) + \sum_s \frac1n \sum_q \partial_t f(x; \theta_s + t_q \Delta\theta_s)`.

    Parameters
    ----------
    f : callable
        ``f(vec, X) -> (T, O)`` on a flat parameter vector.
    theta : list of Tensor
        Flat parameters :math:`\theta_0 .. \theta_N`, each ``(D,)``.
    X : Tensor
        Test inputs ``(T, ...)``.
    nodes : int
        Midpoint nodes per step: ``t_q = (q + 1/2) / n``.

    Returns
    -------
    Tensor
        ``(T, O)``; one JVP per (step, node), each batched over the ``T`` inputs.
    """
    with torch.no_grad():
        out = f(theta[0], X)
        for s in range(len(theta) - 1):
            delta = theta[s + 1] - theta[s]
            for q in range(nodes):
                t = (q + 0.5) / nodes
                out = out + jvp(lambda v: f(v, X), (theta[s] + t * delta,), (delta,))[1] / nodes
    return out


def relu_kinks(model: ReferenceShapeTransformer, theta: list[dict[str, Tensor]], X: Tensor,
               grid: int = 2000) -> list[tuple[int, int, int]]:
    r"""Activation kinks each step's segment crosses, per test input: ``(min, median, max)`` per step.

    A kink is a sign change of a pre-activation of either ReLU layer at the last position (the only
    one the output reads) between neighbouring points of a ``grid``-cell grid on
    :math:`\theta_s + t\Delta\theta_s`, ``t`` in ``[0, 1]`` (kinks closer than a cell are missed).
    """
    signs: dict[str, Tensor] = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda mod, inp, out, name=name: signs.__setitem__(name, out[:, -1] > 0)) for name in ("linear1", "linear2")]
    counts = []
    try:
        with torch.no_grad():
            for a, b in zip(theta[:-1], theta[1:]):
                pattern = []
                for t in torch.linspace(0.0, 1.0, grid + 1, dtype=torch.float64):
                    functional_call(model, {k: a[k] + float(t) * (b[k] - a[k]) for k in a}, (X,))
                    pattern.append(torch.cat([signs["linear1"], signs["linear2"]], dim=-1))
                P = torch.stack(pattern)
                flips = (P[1:] != P[:-1]).sum(dim=(0, 2))  # (T,)
                counts.append((int(flips.min()), int(flips.median()), int(flips.max())))
    finally:
        for h in hooks:
            h.remove()
    return counts
