r"""What the NAdam, RAdam and Adamax tests share: option sets, a recorded loop, and a reference that derives the
optimizer's coefficients itself from the maths (docs/optimizers.md), never from the adapter.

:class:`CoefficientReference` is the slow loop reference of tests/replay_reference.py (recorded dropout masks
replayed, each sample's own loss gradient) whose coefficients come from an independent float64 replay of the
optimizer: from its own per-sample gradients ``G[s, k]`` it forms the gradient the optimizer saw,
``g_s = sum_k G[s, k]``, and runs

.. math::

    u_s &= g_s + \lambda^c \theta_s, \qquad a = \beta_1, \quad b = 1 - \beta_1 \\
    \text{NAdam:}\quad & v_s = \beta_2 v_{s-1} + (1-\beta_2) u_s^2, \quad
        \mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi}), \quad \Pi_t = \Pi_{t-1} \mu_t, \\
        & P = \pm 1 / (\sqrt{v_s / (1-\beta_2^t)} + \epsilon), \quad
        q = \mathrm{lr}\,\mu_{t+1} / (1 - \Pi_t \mu_{t+1}), \quad n = \mathrm{lr} (1-\mu_t) / (1-\Pi_t) \\
    \text{RAdam:}\quad & P = \pm \frac{\mathrm{lr}}{1-\beta_1^t}
        \cdot \begin{cases} r_t \sqrt{1-\beta_2^t} / (\sqrt{v_s} + \epsilon) & \rho_t > 5 \\ 1 & \text{else}
        \end{cases} \\
    \text{Adamax:}\quad & e_s = \max(\beta_2 e_{s-1}, |u_s| + \epsilon), \quad
        P = \pm \frac{\mathrm{lr}}{1-\beta_1^t} / e_s

(``±``: ``-`` under ``maximize``, which also negates ``lambda_c``; ``lambda_d = lr wd`` when decoupled). Torch keeps
``mu_product`` in its scalar dtype (float32 unless the default dtype is float64); the reference rounds
:math:`\Pi_t` the same way, as the maths of torch's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from replay_reference import ReplayReference
from torch import Tensor, nn

import explaind

__all__ = ["DT", "Setup", "CoefficientReference", "data", "relu_mlp", "dropout_mlp", "tanh_mlp", "record"]

DT = torch.float64


@dataclass(frozen=True)
class Setup:
    """One optimizer and its options (torch semantics), with the per-step learning rates of the loop."""

    kind: str  # "nadam", "radam" or "adamax"
    lr: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    maximize: bool = False
    momentum_decay: float = 4e-3
    foreach: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, params: Any) -> torch.optim.Optimizer:
        kw = {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay,
              "maximize": self.maximize, "foreach": self.foreach, **self.extra}
        if self.kind == "nadam":
            return torch.optim.NAdam(params, momentum_decay=self.momentum_decay,
                                     decoupled_weight_decay=self.decoupled, **kw)
        if self.kind == "radam":
            return torch.optim.RAdam(params, decoupled_weight_decay=self.decoupled, **kw)
        return torch.optim.Adamax(params, **kw)

    def rate(self, s: int) -> float:
        """The learning rate of step ``s`` (the loop anneals it: ``lr / (1 + 0.2 s)``)."""
        return self.lr / (1.0 + 0.2 * s)


def data(n: int = 23, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)


def relu_mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)


def dropout_mlp() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Dropout(0.3), nn.Linear(10, 3)).to(DT)


def tanh_mlp() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def batches(n_train: int, steps: int, batch: int = 6) -> list[Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randperm(n_train, generator=gen)[:batch] for _ in range(steps)]


def record(model: nn.Module, setup: Setup, X: Tensor, y: Tensor, steps: int, *, before: int = 0,
           **recorder_kwargs: Any) -> tuple[explaind.TrajectoryRecorder, torch.optim.Optimizer]:
    """``before`` unrecorded steps, then ``steps`` recorded ones (learning rate ``setup.rate(s)`` at step ``s``)."""
    optimizer = setup.build(model.parameters())
    plan = batches(X.shape[0], before + steps)

    def one(s: int, rec: Any = None) -> None:
        for group in optimizer.param_groups:
            group["lr"] = setup.rate(s)
        optimizer.zero_grad()
        idx = plan[s]
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        if rec is not None:
            rec.log_batch(idx)
        optimizer.step()

    model.train()
    for s in range(before):
        one(s)
    rec = explaind.TrajectoryRecorder(model, optimizer, loss="cross_entropy", train_data=(X, y), **recorder_kwargs)
    with rec:
        for s in range(before, before + steps):
            one(s, rec)
    model.eval()
    return rec, optimizer


def _torch_scalar(x: float) -> float:
    """``x`` as torch stores a step scalar such as ``mu_product`` (its default scalar dtype)."""
    return float(x) if torch.get_default_dtype() == torch.float64 else float(np.float32(x))


class CoefficientReference(ReplayReference):
    """The replaying loop reference with the optimizer's coefficients derived from the maths (module docstring)."""

    def __init__(self, traj: Any, X: Tensor, setup: Setup, **kwargs: Any):
        self.setup = setup
        super().__init__(traj, X, **kwargs)

    def _compute_coefficients(self) -> None:  # the coefficients need the gradients: computed after them
        self.coef = [{"scale": float(self.traj.grad_scale(s))} for s in range(self.N)]

    def _compute_gradients(self) -> None:
        super()._compute_gradients()
        st = self.setup
        beta1, beta2 = st.betas
        sign = -1.0 if st.maximize else 1.0
        lam_c = sign * st.weight_decay if not st.decoupled else 0.0
        second = torch.zeros(self.D, dtype=DT)  # v (NAdam, RAdam) or e (Adamax)
        mu_product = 1.0
        for s in range(self.N):
            lr, t = st.rate(s), float(s + 1)
            u = self.G[s].sum(0) + lam_c * self.theta[s]
            q, n = 1.0, 0.0
            if st.kind == "adamax":
                second = torch.maximum(beta2 * second, u.abs() + st.eps)
                P = lr / (1 - beta1**t) / second
            else:
                second = beta2 * second + (1 - beta2) * u * u
            if st.kind == "nadam":
                mu = beta1 * (1 - 0.5 * 0.96 ** (t * st.momentum_decay))
                mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * st.momentum_decay))
                mu_product = _torch_scalar(mu_product * _torch_scalar(mu))
                P = 1.0 / ((second / (1 - beta2**t)).sqrt() + st.eps)
                q = lr * mu_next / (1 - mu_product * mu_next)
                n = lr * (1 - mu) / (1 - mu_product)
            elif st.kind == "radam":
                rho_inf = 2 / (1 - beta2) - 1
                rho = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
                P = torch.full((self.D,), lr / (1 - beta1**t), dtype=DT)
                if rho > 5:
                    rect = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
                    P = P * rect * (1 - beta2**t) ** 0.5 / (second.sqrt() + st.eps)
            full = lambda x: torch.full((self.D,), float(x), dtype=DT)  # noqa: E731
            self.coef[s].update(a=full(beta1), b=full(1 - beta1), P=sign * P, q=full(q), n=full(n),
                                lambda_c=full(lam_c), lambda_d=full(lr * st.weight_decay if st.decoupled else 0.0))
