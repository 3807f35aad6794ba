"""Models of the fifteenth round (tests/_round15_cases.py): popular training code as its authors write it.

Float64, small and smooth (tanh) unless a case names ReLU; the data of tests/_stranger_loops_kit.py (inputs
``(24, 4)``, 3 classes) or the token data of :func:`token_data`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from _stranger_loops_kit import DT, N
from torch import nn

TEMPERATURE = 4.0
VOCAB = 6


class ModelEmaV2(nn.Module):
    """timm's ``ModelEmaV2`` as its authors write it: a deep copy in evaluation mode, every ``state_dict`` value
    moved ``1 - decay`` of the way to the model's (``ema_v.copy_(decay * ema_v + (1 - decay) * model_v)``)."""

    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.decay = decay

    def _update(self, model: nn.Module, update_fn) -> None:
        with torch.no_grad():
            for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
                ema_v.copy_(update_fn(ema_v, model_v))

    def update(self, model: nn.Module) -> None:
        self._update(model, update_fn=lambda e, m: self.decay * e + (1.0 - self.decay) * m)


def teacher() -> nn.Sequential:
    """A trained-elsewhere teacher with dropout (its own seed), frozen."""
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).to(DT)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


class Distilled(nn.Module):
    """A student with the frozen teacher as a submodule: the output is the student's logits and the teacher's,
    computed under ``torch.no_grad()``, as columns ``[:, :3]`` and ``[:, 3:]`` (:func:`kd_loss` reads both).
    ``pinned``: ``train()`` keeps the teacher in evaluation mode (else only ``teacher.eval()`` once, before
    training, as many scripts do)."""

    def __init__(self, pinned: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
        self.teacher = teacher()
        self.pinned = pinned

    def train(self, mode: bool = True) -> Distilled:
        super().train(mode)
        if self.pinned:
            self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher(x)
        return torch.cat([self.student(x), t], 1)


def kd_loss(out: torch.Tensor, y: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Hinton's distillation loss on :class:`Distilled`'s columns: ``alpha * CE + (1 - alpha) * T^2 * KL`` with
    ``F.kl_div(..., reduction="batchmean")`` on temperature-scaled logits (a mean over the batch's samples)."""
    s, t = out[:, :3], out[:, 3:]
    kl = F.kl_div(F.log_softmax(s / TEMPERATURE, 1), F.softmax(t / TEMPERATURE, 1), reduction="batchmean")
    return alpha * F.cross_entropy(s, y) + (1 - alpha) * TEMPERATURE ** 2 * kl


class TiedLM(nn.Module):
    """Token ids ``(n, 5)`` -> mean embedding -> LayerNorm -> tanh layer -> logits over the vocabulary through the
    embedding's own weight (``head.weight = emb.weight``, weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 8)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, VOCAB, bias=False)
        self.head.weight = self.emb.weight
        self.to(DT)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.norm(self.emb(ids).mean(1)))))


def token_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids ``(N, 5)`` over :data:`VOCAB`, next-token targets ``(N,)`` and test ids ``(3, 5)``."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (N + 3, 5), generator=gen)
    return ids[:N], torch.randint(0, VOCAB, (N,), generator=gen), ids[N:]


class CheckpointedSequential(nn.Module):
    """A body with dropout inside run through ``torch.utils.checkpoint.checkpoint_sequential(body, 2, x,
    use_reentrant=False)`` in training mode (``self.checkpointed``), then a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.checkpointed = True
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed and self.training:
            h = torch.utils.checkpoint.checkpoint_sequential(self.body, 2, x, use_reentrant=False)
        else:
            h = self.body(x)
        return self.head(h)


def relu_mlp(width: int = 16) -> nn.Sequential:
    """Three ReLU layers of ``width`` (untuned-rate cases)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 3)).to(DT)


class GAN(nn.Module):
    """A generator ``G`` (noise ``(n, 2)`` -> points ``(n, 4)``) and a discriminator ``D`` (points -> one logit);
    ``forward(x) = D(x)``, the discriminator's logit on real points (what the recorder explains)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.G = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 4))
        self.D = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.D(x)


def real_logit_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss on real points, ``BCEWithLogits(D(x), 1)`` (targets all ones)."""
    return F.binary_cross_entropy_with_logits(out[:, 0], y.to(out.dtype))


class SimCLRNet(nn.Module):
    """SimCLR's encoder (``5 -> 6``, tanh) and projection head (``6 -> 4``); ``columns``: the forward returns the
    representation beside the projection, ``torch.cat([head(h), h], 1)``, so that it can be explained after the head
    is dropped."""

    def __init__(self, columns: bool) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.encoder = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.head = nn.Linear(6, 4)
        self.columns = columns
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return torch.cat([self.head(h), h], 1) if self.columns else self.head(h)


def focal_loss(out: torch.Tensor, y: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Multi-class focal loss as detection repositories write it: ``((1 - pt) ** gamma * ce).mean()`` with
    ``pt = exp(-ce)`` from the per-sample cross entropy."""
    ce = F.cross_entropy(out, y, reduction="none")
    return ((1 - torch.exp(-ce)) ** gamma * ce).mean()
