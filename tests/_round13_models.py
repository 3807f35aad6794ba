"""Models of the thirteenth round (tests/_round13_cases.py): a trainable parameter the optimizer does not hold, an
input normaliser with running statistics, manifold mixup, a frozen teacher inside the model, a PReLU network, one
weight used through two transforms, a batch-norm MLP."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from _stranger_loops_kit import DT, batches, data, sgd
from torch import nn

import explaind


def _body(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


class OutsideTemperature(nn.Module):
    """The MLP's logits times ``exp(t)``, ``t`` a parameter with ``requires_grad=True`` that the loop's optimizer
    does not hold (its ``.grad`` accumulates; it never moves)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _body(0)
        self.t = nn.Parameter(torch.tensor(0.3, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.t.exp()


class RunningNormaliser(nn.Module):
    """An RL-style input normaliser: in training mode each forward merges its batch into running count, mean and
    variance buffers (Chan's parallel update) and normalises by the merged statistics; in evaluation mode by the
    buffers as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.tensor(1.0, dtype=DT))
        self.register_buffer("mean", torch.zeros(4, dtype=DT))
        self.register_buffer("var", torch.ones(4, dtype=DT))
        self.net = _body(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                n, m, v = x.shape[0], x.mean(0), x.var(0, unbiased=False)
                total = self.count + n
                delta = m - self.mean
                self.var.copy_((self.var * self.count + v * n + delta ** 2 * self.count * n / total) / total)
                self.mean.add_(delta * n / total)
                self.count.copy_(total)
        return self.net((x - self.mean) / torch.sqrt(self.var + 1e-8))


class ManifoldMixup(nn.Module):
    """Manifold mixup of the hidden units in training mode: ``h <- 0.7 h + 0.3 h[randperm]`` (the labels not
    mixed)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.training:
            h = 0.7 * h + 0.3 * h[torch.randperm(h.shape[0])]
        return self.head(h)


class FrozenTeacher(nn.Module):
    """A student and a frozen teacher (``requires_grad=False``) of the same shape, returning both logits side by
    side (6 columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.student, self.teacher = _body(0), _body(1)
        self.teacher.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.student(x), self.teacher(x)], dim=-1)


TAU = 2.0


def kd_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Half cross entropy, half ``TAU^2`` times the KL divergence of the student's tempered prediction from the
    teacher's (its columns detached)."""
    s, t = out[:, :3], out[:, 3:].detach()
    kl = F.kl_div(F.log_softmax(s / TAU, -1), F.log_softmax(t / TAU, -1), log_target=True, reduction="batchmean")
    return 0.5 * F.cross_entropy(s, y) + 0.5 * TAU ** 2 * kl


def teacher_run() -> tuple[nn.Module, Any]:
    """:class:`FrozenTeacher` distilled with :func:`kd_loss`, SGD momentum over the student, ``loss=kd_loss``."""
    model, (X, y, _) = FrozenTeacher(), data()
    opt = sgd(model.student)
    rec = explaind.TrajectoryRecorder(model, opt, loss=kd_loss, train_data=(X, y))
    with rec:
        for idx in batches():
            opt.zero_grad()
            kd_loss(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model, rec.trajectory


class PReluNet(nn.Module):
    """Two PReLU layers of 16 units (learned slopes) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 16), nn.PReLU(), nn.Linear(16, 16), nn.PReLU())
        self.head = nn.Linear(16, 3)
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TwoTransforms(nn.Module):
    """One weight used twice with different transforms: ``tanh(x W^T)`` and ``x exp(W)^T``, summed before the
    head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(0.3 * torch.randn(6, 4, dtype=DT))
        self.head = nn.Linear(6, 3).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x @ self.w.T) + 0.1 * x @ self.w.exp().T)


class NormNet(nn.Module):
    """``Linear -> BatchNorm1d -> tanh -> Linear``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
