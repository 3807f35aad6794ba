"""Models of the fourteenth round (tests/_round14_cases.py): regularisers from papers written in ``forward`` as their
authors write them (stochastic depth per sample, DropConnect, DropBlock, cutout, mixup with per-sample lambdas),
a forward with keyword-only arguments returning a dataclass, part of a forward under ``torch.autocast``.

Float64, the 4 input features and 3 classes of tests/_stranger_loops_kit.py; every draw in a training forward comes
from torch's global generator (recorded with ``capture_random=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _stranger_loops_kit import DT
from torch import nn


class StochasticDepth(nn.Module):
    """Two residual blocks ``h + keep_k tanh(W h) / survival`` whose branch is dropped per sample in training mode
    (``keep_k = torch.rand(n, 1) < survival``, the row mode of stochastic depth); ``act``: the blocks' activation."""

    def __init__(self, act: type[nn.Module] = nn.Tanh, survival: float = 0.7) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), act()) for _ in range(2)])
        self.act, self.survival = act(), survival
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        for block in self.blocks:
            if self.training:
                keep = (torch.rand(h.shape[0], 1, dtype=h.dtype) < self.survival).to(h.dtype)
                h = h + keep * block(h) / self.survival
            else:
                h = h + block(h)
        return self.head(h)


class DropConnect(nn.Module):
    """DropConnect (Wan et al. 2013): the hidden layer's *weight* (not its output) dropped with ``p = 0.3`` in
    training mode, ``F.dropout(self.hidden.weight, ...)``, one mask per forward."""

    def __init__(self, act: type[nn.Module] = nn.Tanh) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.head, self.act = nn.Linear(4, 8), nn.Linear(8, 3), act()
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.dropout(self.hidden.weight, 0.3, self.training)
        return self.head(self.act(F.linear(x, w, self.hidden.bias)))


class DropBlock(nn.Module):
    """A small convolutional net whose feature map (2 channels of 4 x 4, from a linear layer) goes through DropBlock
    (Ghiasi et al. 2018) in training mode: seeds ``bernoulli(gamma)``, grown to 2 x 2 blocks by ``max_pool2d``, the
    kept units rescaled by ``numel / kept``."""

    def __init__(self, gamma: float = 0.15) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lift, self.conv, self.head = nn.Linear(4, 32), nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3, 3)
        self.gamma = gamma
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lift(x)).reshape(-1, 2, 4, 4)
        if self.training:
            seeds = torch.bernoulli(torch.full_like(h, self.gamma))
            mask = 1 - F.max_pool2d(seeds, kernel_size=2, stride=1, padding=1)[..., :4, :4]
            h = h * mask * (mask.numel() / mask.sum().clamp(min=1.0))
        return self.head(torch.tanh(self.conv(h)).mean(dim=(2, 3)))


class CutoutInForward(nn.Module):
    """Cutout on the inputs inside the training forward: one random feature of every sample set to 0 (``torch.rand``
    argmin per row), the tanh MLP after it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            hole = torch.rand(x.shape, dtype=x.dtype).argmin(dim=1, keepdim=True)
            x = x.scatter(1, hole, 0.0)
        return self.net(x)


class MixupInForward(nn.Module):
    """Input mixup inside the training forward with a lambda per sample and ``torch.randperm`` pairing; the outputs
    are the logits, the lambdas and the partner's index as columns ``[logits (3), lam, partner]`` (in evaluation
    mode lambda 1 and partner 0, unread), which :func:`mixup_terms` reads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.training:
            lam = torch.distributions.Beta(0.4, 0.4).sample((n, 1)).to(x.dtype)
            partner = torch.randperm(n)
            x = lam * x + (1 - lam) * x[partner]
        else:
            lam, partner = torch.ones(n, 1, dtype=x.dtype), torch.zeros(n, dtype=torch.long)
        return torch.cat([self.net(x), lam, partner.to(x.dtype).unsqueeze(1)], dim=1)


def mixup_terms(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mixup's per-sample terms ``lam_k CE(out_k, y_k) + (1 - lam_k) CE(out_k, y_partner(k))``, ``(n,)``: a term
    reads another row's target, so the loss is batch-coupled."""
    logits, lam, partner = out[:, :3], out[:, 3].detach(), out[:, 4].detach().long()
    return (lam * F.cross_entropy(logits, y, reduction="none")
            + (1 - lam) * F.cross_entropy(logits, y[partner], reduction="none"))


def mixup_mean(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean of :func:`mixup_terms`: the loss the loop minimises."""
    return mixup_terms(out, y).mean()


@dataclass
class Output:
    """What :class:`KeywordOnly` returns: a plain dataclass (no ``ModelOutput``)."""

    logits: torch.Tensor
    hidden: torch.Tensor


class KeywordOnly(nn.Module):
    """``forward(self, *, features, temperature=1.0)`` (keyword-only arguments) returning :class:`Output`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.to(DT)

    def forward(self, *, features: torch.Tensor, temperature: float = 1.0) -> Output:
        h = torch.tanh(self.a(features))
        return Output(logits=self.head(h) / temperature, hidden=h)


class PartAutocast(nn.Module):
    """The tanh MLP whose first layer runs under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (which leaves a
    float64 model's operations in float64) and whose head under ``torch.autocast("cpu", enabled=False)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.tanh(self.a(x))
        with torch.autocast("cpu", enabled=False):
            return self.head(h)


class ThreeLayers(nn.Module):
    """Three hidden layers of 8 units and a head (``act`` between), for layer-wise learning-rate decay."""

    def __init__(self, act: type[nn.Module] = nn.Tanh) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8)])
        self.head, self.act = nn.Linear(8, 3), act()
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


class TokenPool(nn.Module):
    """Sequences of 6 token ids (vocabulary 10): embeddings averaged over the first ``max_len`` positions, a tanh
    layer and a head. ``max_len`` is a buffer (a sequence-length curriculum the loop raises by ``fill_``); with
    ``counted`` the training forward sets it from a step counter it counts up, ``min(6, steps + 2)``."""

    def __init__(self, counted: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.a, self.head = nn.Embedding(10, 5), nn.Linear(5, 6), nn.Linear(6, 3)
        self.register_buffer("max_len", torch.tensor(6.0))
        self.register_buffer("steps", torch.tensor(0.0))
        self.counted = counted
        self.to(DT)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.counted and self.training:  # the curriculum from a step counter the training forward counts up
            self.max_len.copy_(torch.clamp(self.steps + 2, max=6.0))
            self.steps.add_(1)
        keep = (torch.arange(ids.shape[1], dtype=DT) < self.max_len).to(DT)
        pooled = (self.emb(ids) * keep[None, :, None]).sum(1) / keep.sum()
        return self.head(torch.tanh(self.a(pooled)))


@dataclass
class Prediction:
    """A dataclass output without a ``logits`` field."""

    scores: torch.Tensor
    hidden: torch.Tensor


class KeywordOnlyScores(KeywordOnly):
    """:class:`KeywordOnly` returning :class:`Prediction` (its logits under the name ``scores``)."""

    def forward(self, *, features: torch.Tensor, temperature: float = 1.0) -> Prediction:  # type: ignore[override]
        out = super().forward(features=features, temperature=temperature)
        return Prediction(scores=out.logits, hidden=out.hidden)


class WeightDrop(nn.Module):
    """AWD-LSTM's ``WeightDrop`` on the hidden ``Linear`` of the tanh MLP: the layer's ``weight`` parameter removed
    and kept as ``weight_raw``, and before every call ``layer.weight = F.dropout(weight_raw, p, training)`` assigned
    as a plain attribute (a clone in evaluation mode, where ``F.dropout`` returns the Parameter itself, which
    ``__setattr__`` would register as the layer's parameter)."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.head, self.p = nn.Linear(4, 8), nn.Linear(8, 3), p
        self.weight_raw = nn.Parameter(self.hidden.weight.data.clone())
        del self.hidden._parameters["weight"]
        self.hidden.weight = self.weight_raw.data.clone()
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.dropout(self.weight_raw, self.p, self.training)
        self.hidden.weight = w if self.training else w.clone()  # in evaluation mode F.dropout returns the Parameter
        return self.head(torch.tanh(self.hidden(x)))


class HiddenColumns(nn.Module):
    """The tanh MLP returning its logits and its hidden units side by side, ``[logits (3), h (6)]``: an activation
    penalty (AWD-LSTM's activation regularisation) read by the loss callable :func:`penalised`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return torch.cat([self.head(h), h], dim=1)


AR = 2.0


def penalised(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy of the logits plus ``AR`` times the mean squared hidden unit, per sample averaged: the loss
    with activation regularisation, split exactly per sample."""
    return F.cross_entropy(out[:, :3], y) + AR * out[:, 3:].pow(2).mean()
