"""What the start-state tests share: a tanh MLP trained k steps before the recorder opens, and an independent
reference of the part of the recorded updates that the optimizer's start buffers carry (docs/maths.md §4,
"Optimizer state at the start")."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from reference import Reference
from torch import Tensor, nn

import explaind

__all__ = ["DT", "BATCH", "BEFORE", "OPTIMIZERS", "mlp", "data", "step", "batches", "train", "carried_part"]

DT = torch.float64
N_TRAIN, BATCH, BEFORE, RECORDED = 40, 8, 3, 4
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.95), weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02, betas=(0.8, 0.95), weight_decay=0.1),
}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(DT)


def data() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N_TRAIN, 5, generator=gen, dtype=DT)
    return X, torch.randint(0, 4, (N_TRAIN,), generator=gen), torch.randn(3, 5, generator=gen, dtype=DT)


def step(model, opt, X, y, idx, rec=None) -> None:
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    if rec is not None:
        rec.log_batch(idx)
    opt.step()


def batches(n: int) -> list[Tensor]:
    """The index batches of ``n`` steps (a fixed shuffle, cycled)."""
    order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(2))
    return [order[(BATCH * s) % N_TRAIN:][:BATCH] for s in range(n)]


def train(kind: str, *, recorded: int = RECORDED, **recorder_kwargs):
    """``BEFORE`` unrecorded steps, then ``recorded`` recorded ones; returns what the checks need.

    Returns ``(model, trajectory, state, rates)``: the optimizer's ``state_dict`` when the recorder opened (a deep
    copy) and the learning rate of every recorded step.
    """
    X, y, _ = data()
    model = mlp()
    opt = OPTIMIZERS[kind](model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s))
    plan = batches(BEFORE + recorded)
    for idx in plan[:BEFORE]:
        step(model, opt, X, y, idx)
        sched.step()
    state = copy.deepcopy(opt.state_dict())
    rates = []
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), **recorder_kwargs)
    with rec:
        for idx in plan[BEFORE:]:
            rates.append(float(opt.param_groups[0]["lr"]))
            step(model, opt, X, y, idx, rec)
            sched.step()
    return model.eval(), rec.trajectory, state, rates


def carried_part(kind: str, ref: Reference, state: dict, rates: list[float], steps: tuple[int, int] | None = None
                 ) -> Tensor:
    r"""``sum_s phi_s(x) . v_s`` over the window, ``(T, O)``, with ``v_s`` the part of update ``s`` carried by ``m_-1``.

    SGD (no dampening): ``m_s = mu m_{s-1} + u_s`` and ``Delta theta_s = -lr_s m_s``, so the carried part is
    ``-lr_s mu^{s+1} m_-1``. Adam/AdamW: ``m_s = beta1 m_{s-1} + (1 - beta1) u_s`` and the update divides ``m_s`` by
    ``(1 - beta1^t) (sqrt(v_s / (1 - beta2^t)) + eps)`` at the continued step count ``t = t_0 + s + 1``, with
    ``v_s = beta2 v_{s-1} + (1 - beta2) u_s^2`` rebuilt here from the saved ``v_-1`` and the reference's batch
    gradients (``u_s = g_s + wd theta_s`` for Adam's L2 decay), so the carried part is
    ``-lr_s beta1^{s+1} m_-1 / ((1 - beta1^t) (sqrt(v_s / (1 - beta2^t)) + eps))``.
    """
    hp = state["param_groups"][0]
    saved = [state["state"][i] for i in range(len(ref.names))]  # parameters in model order
    key = "momentum_buffer" if kind == "sgd" else "exp_avg"
    m = torch.cat([s[key].reshape(-1) for s in saved]).to(DT)
    start, stop = (0, ref.N) if steps is None else steps
    out = torch.zeros(ref.X.shape[0], ref.O, dtype=DT)
    if kind == "sgd":
        for s in range(ref.N):
            m = hp["momentum"] * m
            if s >= start:
                out += torch.einsum("xod,d->xo", ref.phi[s], -rates[s] * m)
        return out
    beta1, beta2 = hp["betas"]
    v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in saved]).to(DT)
    t0 = float(saved[0]["step"])
    for s in range(ref.N):
        u = ref.G[s].sum(0) + (hp["weight_decay"] * ref.theta[s] if kind == "adam" else 0.0)
        v = beta2 * v + (1 - beta2) * u * u
        m = beta1 * m
        t = t0 + s + 1
        part = -rates[s] * m / ((1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + hp["eps"]))
        if s >= start:
            out += torch.einsum("xod,d->xo", ref.phi[s], part)
    return out
