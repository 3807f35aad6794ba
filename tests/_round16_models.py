"""Models, losses and loop steps of the sixteenth round (tests/_round16_cases.py): metric-learning heads (CosFace,
center loss), a peft-style LoRA layer, losses from papers (PolyLoss, soft bootstrapping), and the loops that edit
gradients (gradient centralization, NFNets' adaptive gradient clipping), parameters (``vector_to_parameters``),
the optimizer's state or the loss weight between steps.

Every model is float64 and small (4 inputs, 3 classes; tests/_stranger_loops_kit.py's data).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _stranger_loops_kit import DT, mlp
from torch import nn


class CosFaceNet(nn.Module):
    """A tanh body and a cosine classifier: ``cos = normalize(h) @ normalize(W).T`` (CosFace's head; the margin and
    the scale are the loss's, :func:`cosface_loss`)."""

    def __init__(self, act: type[nn.Module] = nn.Tanh):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), act(), nn.Linear(8, 6))
        self.weight = nn.Parameter(torch.randn(3, 6))
        self.to(DT)

    def forward(self, x):
        return F.normalize(self.body(x), dim=1) @ F.normalize(self.weight, dim=1).T


def cosface_loss(cos: torch.Tensor, y: torch.Tensor, s: float = 4.0, m: float = 0.2) -> torch.Tensor:
    """CosFace (large margin cosine loss): the target's cosine lowered by ``m``, every cosine scaled by ``s``."""
    return F.cross_entropy(s * (cos - m * F.one_hot(y, cos.shape[1]).to(cos.dtype)), y)


class CenterLossNet(nn.Module):
    """Center loss (Wen et al. 2016): a feature ``h``, a linear head, and one learned center per class; the forward
    returns the logits and each sample's squared distances to every center as output columns ``[logits, d2]``."""

    def __init__(self, act: type[nn.Module] = nn.Tanh):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), act(), nn.Linear(8, 5), act())
        self.head = nn.Linear(5, 3)
        self.centers = nn.Parameter(0.1 * torch.randn(3, 5))
        self.to(DT)

    def forward(self, x):
        h = self.body(x)
        return torch.cat([self.head(h), (h[:, None, :] - self.centers[None]).square().sum(-1)], 1)


def center_loss(out: torch.Tensor, y: torch.Tensor, lam: float = 0.3) -> torch.Tensor:
    """Softmax loss plus ``lam / 2`` times the squared distance to the sample's own class center."""
    return F.cross_entropy(out[:, :3], y) + 0.5 * lam * out[:, 3:].gather(1, y[:, None]).mean()


def center_groups(model: CenterLossNet) -> list[dict]:
    """The center-loss recipe's two rates, as one optimizer's two groups: the network at 0.1, the centers at 0.5."""
    net = [p for n, p in model.named_parameters() if n != "centers"]
    return [{"params": net}, {"params": [model.centers], "lr": 0.5}]


class LoraLinear(nn.Module):
    """peft's LoRA layer as written: a frozen base ``Linear``, ``lora_A`` (Kaiming-uniform) and ``lora_B`` (zeros),
    ``lora_dropout`` on the input of ``A``, and ``scaling = alpha / r``."""

    def __init__(self, base: nn.Linear, r: int = 2, alpha: float = 4.0, dropout: float = 0.1):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def lora_mlp() -> nn.Sequential:
    """A tanh MLP "pretrained" (its initial weights) with both layers wrapped in :class:`LoraLinear`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0], model[2] = LoraLinear(model[0]), LoraLinear(model[2])
    return model.to(DT)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (what peft hands to the optimizer)."""
    return [p for n, p in model.named_parameters() if "lora_" in n]


def poly1_loss(out: torch.Tensor, y: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """PolyLoss (Leng et al. 2022), Poly-1: ``CE + eps (1 - p_t)``."""
    pt = F.softmax(out, 1).gather(1, y[:, None])[:, 0]
    return (F.cross_entropy(out, y, reduction="none") + eps * (1 - pt)).mean()


def soft_bootstrap_loss(out: torch.Tensor, y: torch.Tensor, beta: float = 0.9) -> torch.Tensor:
    """Soft bootstrapping (Reed et al. 2015): the target ``beta y + (1 - beta) p`` with the prediction detached."""
    logp = F.log_softmax(out, 1)
    target = beta * F.one_hot(y, out.shape[1]).to(out.dtype) + (1 - beta) * logp.exp().detach()
    return -(target * logp).sum(1).mean()


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Hugging Face's ``get_cosine_schedule_with_warmup`` as its source writes it (a ``LambdaLR``)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def centralize_gradients(model: nn.Module) -> None:
    """Gradient centralization (Yong et al. 2020): each weight's gradient minus its mean over the input axis."""
    for p in model.parameters():
        if p.grad is not None and p.ndim > 1:
            p.grad.sub_(p.grad.mean(dim=tuple(range(1, p.ndim)), keepdim=True))


def adaptive_clip(model: nn.Module, clipping: float = 0.01, eps: float = 1e-3) -> None:
    """NFNets' adaptive gradient clipping, unit-wise: each row's gradient scaled to at most ``clipping`` times its
    weight row's norm (at least ``eps``)."""
    for p in model.parameters():
        if p.grad is None:
            continue
        w = p.detach().reshape(p.shape[0], -1) if p.ndim > 1 else p.detach()[:, None]
        g = p.grad.reshape(w.shape)
        bound = clipping * w.norm(dim=1, keepdim=True).clamp_min(eps)
        g.mul_(torch.where(g.norm(dim=1, keepdim=True) > bound, bound / g.norm(dim=1, keepdim=True).clamp_min(1e-6),
                           torch.ones_like(bound)))


def shrink_through_vector(model: nn.Module, factor: float = 0.999) -> None:
    """Every parameter scaled by ``factor`` through ``parameters_to_vector`` / ``vector_to_parameters`` (which
    assigns ``param.data``: new storage, no version counter moves)."""
    vec = nn.utils.parameters_to_vector(model.parameters())
    nn.utils.vector_to_parameters(vec * factor, model.parameters())


def fgsm_step(eps: float = 0.1) -> Callable:
    """FGSM adversarial training (Goodfellow et al. 2015): the batch perturbed by ``eps * sign(grad_x loss)`` in the
    loop, the model trained on the perturbed inputs, the clean indices logged."""
    def step(s, model, opt, X, y, idx, rec):
        x = X[idx].clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(F.cross_entropy(model(x), y[idx]), x)
        opt.zero_grad()
        F.cross_entropy(model(X[idx] + eps * gx.sign()), y[idx]).backward()
        rec.log_batch(idx)
        opt.step()
    return step


class Centred(nn.Module):
    """The parametrization that makes plain SGD train a weight as gradient centralization does:
    ``W = V - V.mean(axes after the first) + M0``, ``M0`` the initial weight's mean (a buffer)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("m0", weight.detach().mean(dim=tuple(range(1, weight.ndim)), keepdim=True).clone())

    def forward(self, v):
        return v - v.mean(dim=tuple(range(1, v.ndim)), keepdim=True) + self.m0


def centred_mlp() -> nn.Sequential:
    """The kit's MLP with :class:`Centred` on both weights (``V`` starts at the initial weight)."""
    model = mlp()
    for layer in (model[0], model[2]):
        nn.utils.parametrize.register_parametrization(layer, "weight", Centred(layer.weight))
    return model
