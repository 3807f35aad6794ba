"""Models of the ninth round (tests/_round9_cases.py) that take gradients inside ``forward`` or change them: an
energy model returning its input gradient (``torch.func.grad`` or ``torch.autograd.grad``), input Jacobians as
features, a gradient reversal by a tensor hook, ``weight.data`` and ``retain_grad()`` in ``forward``, and custom
``torch.autograd.Function`` layers: a gradient reversal layer (DANN), the same with a ``jvp`` that mirrors its
backward, and a straight-through rounding, each on ``XV`` (n, 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EnergyGradient(nn.Module):
    """A gradient-of-energy model (Hamiltonian or force-field style): the per-sample input gradient of a scalar
    energy ``E(x)`` from ``torch.func.grad`` (or, with ``autograd``, ``torch.autograd.grad(create_graph=True)``) fed
    to a Linear head."""

    def __init__(self, autograd: bool = False):
        super().__init__()
        self.e1, self.e2, self.head, self.autograd = nn.Linear(4, 6), nn.Linear(6, 1), nn.Linear(4, 3), autograd

    def energy(self, x: Tensor) -> Tensor:
        return self.e2(torch.tanh(self.e1(x))).sum()

    def forward(self, x):
        if self.autograd:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                (force,) = torch.autograd.grad(self.energy(x), x, create_graph=True)
        else:
            force = torch.func.vmap(torch.func.grad(self.energy))(x)
        return self.head(force)


class HeavisideGate(nn.Module):
    """Hidden units plus ``torch.heaviside(h, 0.5)`` (a step of height 1 at 0)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h) + torch.heaviside(h, torch.tensor(0.5, dtype=h.dtype)))


class JacobianFeatures(nn.Module):
    """The input Jacobian of a small map ``g: R^4 -> R^2`` as features, by ``torch.func.vmap(torch.func.jacrev(g))``
    or, with ``autograd``, ``torch.autograd.functional.jacobian(create_graph=True)``."""

    def __init__(self, autograd: bool = False):
        super().__init__()
        self.e1, self.e2, self.head, self.autograd = nn.Linear(4, 5), nn.Linear(5, 2), nn.Linear(8, 3), autograd

    def g(self, x: Tensor) -> Tensor:
        return self.e2(torch.tanh(self.e1(x)))

    def forward(self, x):
        if self.autograd:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                jac = torch.autograd.functional.jacobian(lambda z: self.g(z).sum(0), x, create_graph=True)
            return self.head(jac.permute(1, 0, 2).flatten(1))
        return self.head(torch.func.vmap(torch.func.jacrev(self.g))(x).flatten(1))


class HookReversal(nn.Module):
    """DANN with the gradient reversed by ``Tensor.register_hook(lambda g: -g)`` on the domain branch's copy of the
    features (in training forwards that build a graph)."""

    def __init__(self):
        super().__init__()
        self.f, self.c, self.d = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.f(x))
        r = h.clone()
        if r.requires_grad:
            r.register_hook(lambda g: -g)
        return torch.cat([self.c(h), self.d(r)], 1)


class DataNormalised(nn.Module):
    """A weight divided by the row norms of ``weight.data`` (a detached view read as a property), tanh, Linear head."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        w = self.a.weight / self.a.weight.data.norm(dim=1, keepdim=True)
        return self.b(torch.tanh(F.linear(x, w, self.a.bias)))


class RetainsGrad(nn.Module):
    """Keeps its hidden units with ``retain_grad()`` in training forwards (to read their gradient after backward)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.requires_grad:
            h.retain_grad()
        return self.b(h)


class _ReverseGrad(torch.autograd.Function):
    """The identity whose backward multiplies by ``-1`` (domain-adversarial training); ``jvp`` is the identity's."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return -g

    @staticmethod
    def jvp(ctx, t):
        return t


class _ReverseGradMirrored(_ReverseGrad):
    """The same layer whose ``jvp`` mirrors its backward (``-t``): not the derivative of its forward."""

    @staticmethod
    def jvp(ctx, t):
        return -t


class GradientReversal(nn.Module):
    """DANN: features, a class head (3 logits) and a domain head (2 logits) behind a gradient reversal layer (with
    ``mirrored``, one whose ``jvp`` mirrors the backward)."""

    def __init__(self, mirrored: bool = False):
        super().__init__()
        self.f, self.c, self.d = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 2)
        self.reverse = _ReverseGradMirrored if mirrored else _ReverseGrad

    def forward(self, x):
        h = torch.tanh(self.f(x))
        return torch.cat([self.c(h), self.d(self.reverse.apply(h))], 1)


class _RoundSTE(torch.autograd.Function):
    """Rounding to halves with the straight-through gradient, backward and ``jvp`` both the identity's."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.round(x * 2) / 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g

    @staticmethod
    def jvp(ctx, t):
        return t


class QuantizedSTE(nn.Module):
    """Hidden units quantised by a straight-through custom Function (quantisation-aware training)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(_RoundSTE.apply(torch.tanh(self.a(x))))


def dann_loss(out: Tensor, y: Tensor) -> Tensor:
    """Class cross entropy plus domain cross entropy; ``y (n, 2)`` holds the class and the domain."""
    return F.cross_entropy(out[:, :3], y[:, 0]) + F.cross_entropy(out[:, 3:], y[:, 1])
