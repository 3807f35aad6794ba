"""Models of the thirteenth round (tests/_paradigms13_kit.py): fine-tuning modules written by hand as papers write
them (LoRA, bottleneck adapters, soft prompts, an offset from pretrained weights, an EWC penalty column), and the
two-network and two-view models of self-training (mutual learning, R-drop, FixMatch's weak and strong views).

Every model is float64 and small (4 inputs, 3 classes unless said), tanh unless the case names ReLU, built under
a fixed seed. :func:`pretrained` is the start every fine-tuning case loads: an MLP trained unrecorded on other labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from _stranger_loops_kit import DT, N, data
from torch import nn


def body(width: int = 6, seed: int = 0) -> nn.Sequential:
    """``Linear(4, width) -> Tanh -> Linear(width, width) -> Tanh -> Linear(width, 3)`` under ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 3)).to(DT)


def pretrained() -> nn.Sequential:
    """:func:`body` after 20 unrecorded SGD steps on the pretraining task (labels by the sign pattern of the first
    two inputs), the start a fine-tuning run loads with ``load_state_dict``."""
    X, _, _ = data()
    labels = ((X[:, 0] > 0).long() + (X[:, 1] > 0).long())
    model = body(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(X), labels).backward()
        opt.step()
    return model


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T``: the pretrained ``base`` frozen, ``A`` (rank x in) drawn small, ``B`` zero."""

    def __init__(self, base: nn.Linear, rank: int = 2, scale: float = 2.0):
        super().__init__()
        self.base, self.scale = frozen(base), scale
        self.A = nn.Parameter(0.3 * torch.randn(rank, base.in_features, dtype=DT))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T

    @torch.no_grad()
    def merge(self) -> None:
        """LoRA's merge as its paper writes it: ``W += scale * B A``, the low-rank factors zeroed."""
        self.base.weight += self.scale * self.B @ self.A
        self.B.zero_()


def lora(model: nn.Sequential) -> nn.Sequential:
    """Every ``Linear`` of ``model`` wrapped in :class:`LoRALinear` (under seed 1)."""
    torch.manual_seed(1)
    return nn.Sequential(*[LoRALinear(m) if isinstance(m, nn.Linear) else m for m in model])


class Adapter(nn.Module):
    """A bottleneck adapter ``h + up(tanh(down(h)))`` (Houlsby et al.), ``up`` zero-initialised."""

    def __init__(self, width: int = 6, bottleneck: int = 2):
        super().__init__()
        torch.manual_seed(2)
        self.down, self.up = nn.Linear(width, bottleneck).to(DT), nn.Linear(bottleneck, width).to(DT)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.tanh(self.down(h)))


def adapters(model: nn.Sequential) -> nn.Sequential:
    """The frozen pretrained ``model`` with an :class:`Adapter` after each hidden activation; its head trains."""
    frozen(model)
    model[4].requires_grad_(True)
    return nn.Sequential(model[0], model[1], Adapter(), model[2], model[3], Adapter(), model[4])


class SoftPrompt(nn.Module):
    """Prompt tuning: the 4 inputs are tokens (a frozen scalar embedding plus position), two learned prompt
    vectors are prepended, one frozen softmax attention layer reads them all, mean-pooled, a frozen head."""

    def __init__(self, dim: int = 4, prompts: int = 2):
        super().__init__()
        torch.manual_seed(4)
        self.embed, self.pos = nn.Linear(1, dim).to(DT), nn.Parameter(torch.randn(4, dim, dtype=DT))
        self.q, self.k, self.v = (nn.Linear(dim, dim).to(DT) for _ in range(3))
        self.head = nn.Linear(dim, 3).to(DT)
        frozen(self)
        self.prompt = nn.Parameter(0.5 * torch.randn(prompts, dim, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x[..., None]) + self.pos
        h = torch.cat([self.prompt.expand(len(x), -1, -1), tokens], 1)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(h.shape[-1]), -1)
        return self.head(torch.tanh(att @ self.v(h)).mean(1))


class Offset(nn.Module):
    """L2-SP written as an offset: the pretrained weights ``theta_0`` held as buffers, the trained parameters the
    offsets ``delta = theta - theta_0`` (zero at the start), the forward that of ``theta_0 + delta``; coupled weight
    decay ``2 lam`` on ``delta`` is then L2-SP's ``lam ||theta - theta_0||^2``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net, self.names = model, [n for n, _ in model.named_parameters()]
        for i, (_, p) in enumerate(model.named_parameters()):
            self.register_buffer(f"anchor{i}", p.detach().clone())
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for p in model.parameters()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {n: getattr(self, f"anchor{i}") + d for i, (n, d) in enumerate(zip(self.names, self.delta))}
        return torch.func.functional_call(self.net, params, (x,))


class EWC(nn.Module):
    """EWC's penalty as an output column: ``[logits, sum_i F_i (theta_i - theta_0,i)^2]`` with the diagonal
    Fisher ``F`` and the anchor ``theta_0`` as buffers; the loss callable adds ``lam`` times that column."""

    def __init__(self, model: nn.Module, fisher: list[torch.Tensor]):
        super().__init__()
        self.net = model
        for i, (p, f) in enumerate(zip(model.parameters(), fisher)):
            self.register_buffer(f"anchor{i}", p.detach().clone())
            self.register_buffer(f"fisher{i}", f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pen = sum((getattr(self, f"fisher{i}") * (p - getattr(self, f"anchor{i}")) ** 2).sum()
                  for i, p in enumerate(self.net.parameters()))
        return torch.cat([self.net(x), pen.expand(len(x), 1)], 1)


def fisher(model: nn.Module) -> list[torch.Tensor]:
    """The diagonal empirical Fisher of ``model`` on the pretraining rows (mean of squared per-sample gradients)."""
    X, _, _ = data()
    labels = ((X[:, 0] > 0).long() + (X[:, 1] > 0).long())
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (x[None],)), t[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, X, labels)
    return [(g ** 2).mean(0) for g in grads.values()]


class TwoViews(nn.Module):
    """FixMatch's model on a pair ``[weak | strong]`` of views (8 columns): ``[net(strong), net(weak)]``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(x[:, 4:]), self.net(x[:, :4])], 1)


class Students(nn.Module):
    """Deep mutual learning: two students side by side, ``[student1(x), student2(x)]``."""

    def __init__(self, act: type = nn.Tanh):
        super().__init__()
        torch.manual_seed(6)
        self.one = nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 3)).to(DT)
        self.two = nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.one(x), self.two(x)], 1)


class RDrop(nn.Module):
    """R-drop: in training two dropout forwards of the same batch side by side (``[pass1, pass2]``); in evaluation
    the deterministic forward twice, so the output has the same six columns."""

    def __init__(self, p: float = 0.3):
        super().__init__()
        torch.manual_seed(7)
        self.hidden, self.drop, self.head = nn.Linear(4, 8).to(DT), nn.Dropout(p), nn.Linear(8, 3).to(DT)

    def one(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.hidden(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.one(x), self.one(x)], 1)


def small(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def views(n: int = N + 3) -> torch.Tensor:
    """FixMatch's weak and strong views of every train and test row, drawn once: ``(N + 3, 8)``."""
    X, _, X_test = data()
    g = torch.Generator().manual_seed(81)
    both = torch.cat([X, X_test])[:n]
    weak = both + 0.05 * torch.randn(both.shape, generator=g, dtype=DT)
    strong = both + 0.4 * torch.randn(both.shape, generator=g, dtype=DT)
    return torch.cat([weak, strong], 1)


class MeanTeacher(nn.Module):
    """Mean teacher with the teacher inside the model as buffers: ``[student(x), teacher(x)]``. Every training
    forward first moves the teacher buffers to ``decay * teacher + (1 - decay) * student`` (the EMA the loop would
    take after the previous step), so step ``s`` reads the teacher of ``theta_0 .. theta_s``."""

    def __init__(self, student: nn.Sequential, decay: float = 0.6):
        super().__init__()
        self.student, self.decay = student, decay
        self.names = [n for n, _ in student.named_parameters()]
        for n, p in student.named_parameters():
            self.register_buffer("ema_" + n.replace(".", "_"), p.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ema = {n: getattr(self, "ema_" + n.replace(".", "_")) for n in self.names}
        if self.training:
            with torch.no_grad():
                for n, p in self.student.named_parameters():
                    ema[n].mul_(self.decay).add_((1 - self.decay) * p)
        teacher = torch.func.functional_call(self.student, ema, (x,))
        return torch.cat([self.student(x), teacher], 1)


class Mixout(nn.Module):
    """Mixout (Lee et al.) on the pretrained MLP's hidden layer: in training each weight is swapped for its
    pretrained value with probability ``p`` (``torch.rand`` in forward), rescaled as ``(M w + (1 - M) u - p u) /
    (1 - p)`` so its expectation is ``w``; in evaluation the weight itself."""

    def __init__(self, model: nn.Sequential, p: float = 0.3):
        super().__init__()
        self.net, self.p = model, p
        self.register_buffer("anchor", model[2].weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.net[2]
        w = lin.weight
        if self.training:
            keep = (torch.rand(w.shape, dtype=w.dtype) > self.p).to(w.dtype)
            w = (keep * w + (1 - keep) * self.anchor - self.p * self.anchor) / (1 - self.p)
        h = torch.tanh(F.linear(self.net[1](self.net[0](x)), w, lin.bias))
        return self.net[4](h)
