"""Small recorded training runs for the engine verification tests.

Each run trains a tiny float64 MLP (3 -> 5 -> 3, tanh or ReLU) on 12 samples with batches of 4 for
8 optimizer steps, with one of four optimizer set-ups that together exercise every coefficient of
the linear recurrence (docs/maths.md §3):

========================  =============================================================
name                      optimizer
========================  =============================================================
``sgd_momentum``          SGD, momentum 0.9, dampening 0.3
``sgd_nesterov_wd``       SGD, Nesterov momentum 0.8, weight decay 0.01 (coupled)
``adam_l2_amsgrad``       Adam, L2 weight decay 0.01 (coupled), amsgrad
``adamw_steplr``          AdamW, weight decay 0.1 (decoupled), StepLR(step_size=3, 0.5)
========================  =============================================================

Runs are recorded with :class:`explaind.TrajectoryRecorder` (the user's own loop, observed), and
cached per process, so every test module that asks for the same run shares one recording.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import explaind

__all__ = [
    "ACTIVATIONS",
    "OPTIMIZERS",
    "Run",
    "make_model",
    "make_data",
    "make_optimizer",
    "recorded_run",
]

ACTIVATIONS = ("tanh", "relu")
OPTIMIZERS = ("sgd_momentum", "sgd_nesterov_wd", "adam_l2_amsgrad", "adamw_steplr")

N_TRAIN = 12
N_TEST = 6
BATCH = 4
N_STEPS = 8
N_IN, N_HIDDEN, N_OUT = 3, 5, 3


@dataclass(frozen=True)
class Run:
    """A recorded run and the data around it."""

    trajectory: explaind.Trajectory
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    activation: str
    optimizer: str


def make_model(activation: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A 3 -> 5 -> 3 MLP with the given activation, initialised from ``seed``."""
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(N_IN, N_HIDDEN), act(), nn.Linear(N_HIDDEN, N_OUT))
    return model.to(dtype)


def make_data(seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X_train (12, 3), y_train (12,), X_test (6, 3), y_test (6,))``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N_TRAIN + N_TEST, N_IN, generator=gen, dtype=torch.float64) * 1.5
    y = torch.randint(0, N_OUT, (N_TRAIN + N_TEST,), generator=gen)
    return X[:N_TRAIN].to(dtype), y[:N_TRAIN], X[N_TRAIN:].to(dtype), y[N_TRAIN:]


def make_optimizer(name: str, model: nn.Module) -> tuple[torch.optim.Optimizer, object | None]:
    """The optimizer (and scheduler, or ``None``) of a named set-up."""
    params = model.parameters()
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.4, momentum=0.9, dampening=0.3), None
    if name == "sgd_nesterov_wd":
        return torch.optim.SGD(params, lr=0.4, momentum=0.8, nesterov=True, weight_decay=0.01), None
    if name == "adam_l2_amsgrad":
        return torch.optim.Adam(params, lr=0.1, betas=(0.8, 0.95), weight_decay=0.01, amsgrad=True), None
    if name == "adamw_steplr":
        opt = torch.optim.AdamW(params, lr=0.1, betas=(0.85, 0.97), weight_decay=0.1)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    raise KeyError(f"unknown optimizer set-up {name!r}; choose one of {OPTIMIZERS}")


def batch_schedule(seed: int = 2) -> list[Tensor]:
    """Dataset indices of each step: a fresh permutation per epoch, cut into batches of 4."""
    gen = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    while len(out) < N_STEPS:
        perm = torch.randperm(N_TRAIN, generator=gen)
        out.extend(perm[i : i + BATCH] for i in range(0, N_TRAIN, BATCH))
    return out[:N_STEPS]


@functools.cache
def recorded_run(activation: str, optimizer: str) -> Run:
    """Train and record one run (cached per process)."""
    X_train, y_train, X_test, y_test = make_data()
    model = make_model(activation)
    opt, sched = make_optimizer(optimizer, model)
    loss_fn = nn.CrossEntropyLoss()
    # the recorder's own gradient check is off: the reference recomputes every per-sample gradient anyway
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X_train, y_train),
                                      check_gradients=False)
    with rec:
        for idx in batch_schedule():
            opt.zero_grad()
            loss_fn(model(X_train[idx]), y_train[idx]).backward()
            rec.log_batch(idx)
            opt.step()
            if sched is not None:
                sched.step()
    return Run(rec.trajectory, X_train, y_train, X_test, y_test, activation, optimizer)


@functools.cache
def perturbed_run(activation: str = "tanh", optimizer: str = "adam_l2_amsgrad") -> Run:
    """A recorded run re-assembled with altered bookkeeping, so every term of the decomposition is exercised.

    The parameters are the recorded ones, but the step sizes ``P_s`` are scaled by ``1 + 0.3 sin(s)``, the
    gradient scales are ``c_s = 0.5 + 0.1 s``, the sample weights are uneven and step 3 repeats a sample.
    The modelled updates then no longer match the actual ones: the residual ``E_s`` is large and must be
    attributed exactly like the other parts.
    """
    from explaind.recurrence import LinearUpdate
    from explaind.trajectory import InMemoryTrajectory

    base = recorded_run(activation, optimizer)
    traj = base.trajectory
    gen = torch.Generator().manual_seed(7)
    params = [traj.params(s) for s in range(traj.n_steps + 1)]
    updates, batches, scales = [], [], []
    for s in range(traj.n_steps):
        factor = 1.0 + 0.3 * float(torch.sin(torch.tensor(float(s))))
        ups = {}
        for name, u in traj.updates(s).items():
            ups[name] = LinearUpdate(a=u.a, b=u.b, P=u.P * factor, q=u.q, n=u.n, lambda_c=u.lambda_c,
                                     lambda_d=u.lambda_d)
        updates.append(ups)
        idx, _ = traj.batch(s)
        if s == 3:
            idx = torch.cat([idx, idx[:1]])
        w = (0.1 + 0.4 * torch.rand(len(idx), generator=gen)).to(torch.float64)
        batches.append((idx, w))
        scales.append(0.5 + 0.1 * s)
    new = InMemoryTrajectory.from_steps(traj.model, loss=traj.loss, params=params, updates=updates,
                                        batches=batches, grad_scales=scales, train_data=(base.X_train, base.y_train),
                                        constants=traj.constants())
    return Run(new, base.X_train, base.y_train, base.X_test, base.y_test, activation, optimizer)
