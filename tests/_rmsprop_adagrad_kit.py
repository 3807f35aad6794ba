"""What the RMSprop and Adagrad tests share: small float64 models, a plain recorded loop, and a slow reference whose
optimizer coefficients come from the maths, not from the adapter.

:class:`MathCoefficients` replaces the coefficients the slow loop reference (tests/reference.py) reads from the
trajectory by its own: the batch gradient ``g_s = sum_k G[s, k]`` of the reference's per-sample gradient loop, and
torch's documented RMSprop or Adagrad recursion in float64 from the optimizer's state at the start,

* RMSprop: ``u = (+-) g + wd theta``, ``v = alpha v + (1 - alpha) u^2``, ``gbar = alpha gbar + (1 - alpha) u``,
  ``d = sqrt(v [- gbar^2]) + eps``; momentum 0: ``a, b, P = 0, 1, lr / d``; momentum ``mu``: ``a, b, P = mu, 1 / d,
  lr``;
* Adagrad: ``sum = sum + u^2``, ``t = t_0 + s + 1``, ``P = lr / (1 + (t - 1) lr_decay) / (sqrt(sum) + eps)``,
  ``a, b = 0, 1``;

with ``P`` and ``lambda_c = wd`` negated under ``maximize`` (the recurrence's sign, docs/maths.md §3). Its residual
``Delta theta_s - sum_k D_{s,k} - R_s`` is then a check of these coefficients against torch's actual updates.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from engine_compare import as_numpy, reference_terms
from reference import Reference, rel_err
from replay_reference import ReplayReference
from torch import Tensor, nn

import explaind
from explaind.exceptions import ExplaindWarning

__all__ = ["DT", "MODELS", "MathCoefficients", "assert_exact", "assert_metagradients_match_retraining", "batch_plan",
           "data", "math_reference", "record"]

DT = torch.float64
N_TRAIN, N_TEST, BATCH = 20, 3, 5


def data() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N_TRAIN + N_TEST, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (N_TRAIN + N_TEST,), generator=gen)
    return X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:]


def _tanh() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def _relu() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3)).to(DT)


def _dropout() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).to(DT)


#: name -> (builder, reference class, engine quadrature): the ReLU MLP's kinks need the adaptive rule.
MODELS: dict[str, tuple[Callable[[], nn.Module], type, dict[str, Any]]] = {
    "tanh": (_tanh, Reference, {"quadrature": "gauss-legendre", "nodes": 8}),
    "relu": (_relu, Reference, {"quadrature": "adaptive", "tol": 1e-11}),
    "dropout": (_dropout, ReplayReference, {"quadrature": "gauss-legendre", "nodes": 8}),
}


def batch_plan(n: int) -> list[Tensor]:
    """The index batches of the first ``n`` steps of :func:`record` (unrecorded ones included)."""
    gen = torch.Generator().manual_seed(3)
    return [torch.randperm(N_TRAIN, generator=gen)[:BATCH] for _ in range(n)]


def record(model: nn.Module, optimizer: torch.optim.Optimizer, *, steps: int, schedule: Any = None,
           before: int = 0, **recorder_kwargs) -> tuple[Any, list[float], dict[str, Any]]:
    """``before`` unrecorded steps, then ``steps`` recorded ones of a plain loop.

    Returns ``(trajectory, lrs, start)``: the learning rate of every recorded step (read from the group, as a user
    would) and the optimizer's ``state_dict()`` when the recorder opened (a deep copy).
    """
    X, y, _ = data()
    plan = iter(batch_plan(before + steps))
    sched = None if schedule is None else schedule(optimizer)

    def one_step(rec=None):
        idx = next(plan)
        optimizer.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        if rec is not None:
            rec.log_batch(idx)
        optimizer.step()
        if sched is not None:
            sched.step()

    model.train()
    for _ in range(before):
        one_step()
    start = copy.deepcopy(optimizer.state_dict())
    lrs = []
    rec = explaind.TrajectoryRecorder(model, optimizer, loss="cross_entropy", train_data=(X, y), **recorder_kwargs)
    with rec:
        for _ in range(steps):
            lr = optimizer.param_groups[0]["lr"]
            lrs.append(None if lr is None else float(lr))  # None: transformers' Adafactor with relative_step
            one_step(rec)
    model.eval()
    return rec.trajectory, lrs, start


class MathCoefficients:
    """Mixin for a reference class: the optimizer coefficients from the maths (module docstring).

    Set before construction: ``kind`` (``"rmsprop"`` or ``"adagrad"``), ``hp`` (the one group's hyperparameters),
    ``lrs`` (per recorded step) and ``start`` (the optimizer's ``state_dict()`` when recording opened, or empty).
    """

    kind: str
    hp: Mapping[str, Any]
    lrs: list[float]
    start: Mapping[int, Mapping[str, Any]]

    def _state_vec(self, key: str, default: float) -> Tensor:
        parts = []
        for i, shape in enumerate(self.shapes):
            entry = self.start.get("state", {}).get(i, {})
            t = entry.get(key)
            parts.append((torch.full(shape, default, dtype=DT) if t is None else t.to(DT)).reshape(-1))
        return torch.cat(parts)

    def _compute_decomposition(self) -> None:
        hp, sign = self.hp, (-1.0 if self.hp.get("maximize", False) else 1.0)
        wd = float(hp.get("weight_decay", 0.0))
        if self.kind == "rmsprop":
            alpha, eps, mu = float(hp.get("alpha", 0.99)), float(hp.get("eps", 1e-8)), float(hp.get("momentum", 0.0))
            v, gbar = self._state_vec("square_avg", 0.0), self._state_vec("grad_avg", 0.0)
        else:
            eps, decay = float(hp.get("eps", 1e-10)), float(hp.get("lr_decay", 0.0))
            total = self._state_vec("sum", float(hp.get("initial_accumulator_value", 0.0)))
            t0 = float(self.start["state"][0]["step"]) if self.start.get("state") else 0.0
        for s, c in enumerate(self.coef):
            u = sign * self.G[s].sum(0) + wd * self.theta[s]  # torch's input (maximize negates the gradient)
            if self.kind == "rmsprop":
                v = alpha * v + (1 - alpha) * u * u
                gbar = alpha * gbar + (1 - alpha) * u
                d = (v - gbar * gbar if hp.get("centered", False) else v).sqrt() + eps
                a, b, P = (mu, 1.0 / d, sign * self.lrs[s]) if mu > 0 else (0.0, 1.0, sign * self.lrs[s] / d)
            else:
                total = total + u * u
                t = t0 + s + 1
                a, b, P = 0.0, 1.0, sign * self.lrs[s] / (1 + (t - 1) * decay) / (total.sqrt() + eps)
            c.update(a=torch.as_tensor(a, dtype=DT).expand(self.D), b=torch.as_tensor(b, dtype=DT).expand(self.D),
                     P=torch.as_tensor(P, dtype=DT).expand(self.D), q=torch.ones(self.D, dtype=DT),
                     n=torch.zeros(self.D, dtype=DT), lambda_c=torch.full((self.D,), sign * wd, dtype=DT),
                     lambda_d=torch.zeros(self.D, dtype=DT))
        super()._compute_decomposition()


def math_reference(base: type, kind: str, hp: Mapping[str, Any], lrs: list[float],
                   start: Mapping[str, Any] | None = None) -> type:
    """A reference class (``base``: ``Reference`` or ``ReplayReference``) with :class:`MathCoefficients`."""
    return type(f"Math{base.__name__}", (MathCoefficients, base),
                {"kind": kind, "hp": dict(hp), "lrs": list(lrs), "start": dict(start or {})})


def assert_exact(model: nn.Module, traj: Any, X_test: Tensor, reference: type, quadrature: Mapping[str, Any]) -> Any:
    """Replica <= 1e-6 relative to the trained model (eval mode), residual share <= 1e-9 with no warning, the math
    reference's own residual <= 1e-12 and ``keep=("train",)`` scores <= 1e-9 relative to it. Returns the reference."""
    with torch.no_grad():
        trained = model(X_test)
    replica = explaind.KernelReplica(device="cpu", **quadrature).fit(traj).predict(X_test)
    assert rel_err(as_numpy(replica), as_numpy(trained)) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu", **quadrature).fit(traj).transform(X_test)
    assert att.meta["residual_share"] <= 1e-9
    ref = reference(traj, X_test)
    scale = max(float(torch.stack(ref.delta).abs().max()), 1.0)
    assert float(ref.E.abs().max()) <= 1e-12 * scale, float(ref.E.abs().max())
    want = reference_terms(ref, att)
    assert rel_err(as_numpy(att.values), want["values"]) <= 1e-9
    assert np.isfinite(as_numpy(att.values)).all()
    return ref


def assert_metagradients_match_retraining(build: Callable[[], nn.Module],
                                          make_optimizer: Callable[[Any], torch.optim.Optimizer], traj: Any,
                                          steps: int, h: float = 1e-5) -> None:
    """``CounterfactualEstimator`` on ``traj`` (recorded by :func:`record` from ``build()`` with ``steps`` steps)
    replays the run to 1e-12 and its metagradient in the first sample of the first batch matches central differences
    of re-training from ``build()`` with that sample's loss weight scaled by ``1 +- h``, to 1e-6 relative."""
    X, y, X_test = data()
    att = explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(X_test)
    assert att.meta["replay_residual"] <= 1e-12
    k = int(batch_plan(steps)[0][0])

    def retrained(scale: float) -> Tensor:
        net = build()
        opt = make_optimizer(net.parameters())
        net.train()
        for idx in batch_plan(steps):
            weights = torch.where(idx == k, torch.tensor(scale, dtype=DT), torch.tensor(1.0, dtype=DT))
            opt.zero_grad()
            (weights * F.cross_entropy(net(X[idx]), y[idx], reduction="none")).mean().backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            return net(X_test)

    finite = (retrained(1 + h) - retrained(1 - h)) / (2 * h)
    tau = torch.as_tensor(as_numpy(att.values))[:, k, :]
    assert float(finite.abs().max()) > 1e-4  # the sample moves the outputs
    assert rel_err(as_numpy(tau), as_numpy(finite)) <= 1e-6
