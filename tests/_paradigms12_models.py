"""Models of the twelfth round's training paradigms (tests/_paradigms12_kit.py), written from the papers' ideas.

Float64, tiny, smooth (tanh) unless a case names ReLU; every input is one flat float tensor per sample, which the
model slices (so the slow loop references see ordinary rows). Where a paradigm draws random numbers per step (a
diffusion timestep and noise, a masked autoencoder's mask, an actor's action, scheduled sampling's coin) the draw
is written inside the training forward with torch's generator; evaluation mode is the deterministic function
explained.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

DT = torch.float64
T_STEPS = 10  #: diffusion timesteps
ALPHA_BAR = torch.cumprod(1.0 - torch.linspace(0.05, 0.3, T_STEPS, dtype=DT), 0)


def timestep_embedding(t: torch.Tensor, dim: int = 4) -> torch.Tensor:
    """The transformer's sinusoidal embedding of timesteps ``t`` ``(B,)``: ``(B, dim)``."""
    freqs = torch.exp(-math.log(100.0) * torch.arange(dim // 2, dtype=DT) / (dim // 2))
    angles = t.to(DT)[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], 1)


def noised(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """DDPM's forward process ``sqrt(a_t) x0 + sqrt(1 - a_t) eps``."""
    a = ALPHA_BAR[t][:, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


class Denoiser(nn.Module):
    """An MLP denoiser ``eps(x_t, t)``: input ``[x_t (4), t (1)]``, the timestep embedded sinusoidally."""

    def __init__(self, act: type = nn.Tanh) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 12), act(), nn.Linear(12, 4)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x[:, :4], timestep_embedding(x[:, 4])], 1))


class DiffusionInForward(nn.Module):
    """DDPM with its draws in the training forward: input the clean ``x0``; in training a timestep and noise are
    drawn per sample and the output is ``eps_hat - eps`` (trained towards 0 by MSE); in evaluation the denoiser at
    ``t = T/2`` on ``x0`` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.denoiser = Denoiser()

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.denoiser(torch.cat([x0, torch.full((len(x0), 1), T_STEPS / 2, dtype=DT)], 1))
        t = torch.randint(0, T_STEPS, (len(x0),))
        eps = torch.randn(x0.shape, dtype=x0.dtype)
        return self.denoiser(torch.cat([noised(x0, t, eps), t[:, None].to(DT)], 1)) - eps


class DenoisingAE(nn.Module):
    """A denoising autoencoder: Gaussian noise (0.3) on the input in training, a tanh bottleneck of 3."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.Linear(4, 3).to(DT), nn.Linear(3, 4).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = x + 0.3 * torch.randn_like(x)
        return self.dec(torch.tanh(self.enc(x)))


class ActorCritic(nn.Module):
    """A policy over 3 actions and a value head on a shared tanh trunk. Output ``[logits (3), V (1), a (3)]``: in
    training ``a`` is the one-hot of an action drawn from the policy (``torch.multinomial``), in evaluation the
    policy's probabilities (the expected action)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.pi, self.v = nn.Linear(4, 8).to(DT), nn.Linear(8, 3).to(DT), nn.Linear(8, 1).to(DT)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.trunk(s))
        logits = self.pi(h)
        probs = torch.softmax(logits, -1)
        if self.training:
            drawn = torch.multinomial(probs.detach(), 1)[:, 0]
            action = nn.functional.one_hot(drawn, 3).to(DT)
        else:
            action = probs
        return torch.cat([logits, self.v(h), action], 1)


class Seq2Seq(nn.Module):
    """A GRU encoder-decoder over sequences of 3 positions. Input ``[src (3 x 2 features), tgt_in (3 token ids)]``;
    output the decoder's logits over 4 tokens per position ``(B, 12)``. Teacher forcing feeds ``tgt_in``; with
    ``sampling`` each position after the first is, with probability ``p``, the model's own previous argmax instead
    (scheduled sampling, in training only). ``p`` is a Python float (``schedule="attribute"``) or read from a
    step-counter buffer that each training forward counts up (``schedule="buffer"``)."""

    def __init__(self, sampling: bool = False, schedule: str = "attribute") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.GRU(2, 5, batch_first=True)
        self.emb = nn.Embedding(4, 3)
        self.dec = nn.GRUCell(3, 5)
        self.out = nn.Linear(5, 4)
        self.sampling, self.schedule, self.p = sampling, schedule, 0.2
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self.to(DT)

    def prob(self) -> float | torch.Tensor:
        if self.schedule == "attribute":
            return self.p
        self.forwards += 1
        return torch.clamp(0.1 * self.forwards.to(DT), max=0.6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src, tgt = x[:, :6].reshape(len(x), 3, 2), x[:, 6:].long()
        _, h = self.enc(src)
        h = h[0]
        p = self.prob() if self.sampling and self.training else 0.0
        token, logits = tgt[:, 0], []
        for i in range(3):
            h = self.dec(self.emb(token), h)
            logits.append(self.out(h))
            if i < 2:
                token = tgt[:, i + 1]
                if self.sampling and self.training:
                    own = logits[-1].argmax(-1)
                    token = torch.where(torch.rand(len(x), dtype=DT) < p, own, token)
        return torch.cat(logits, 1)


class TwoTowers(nn.Module):
    """CLIP's two towers: ``[image (4), text (4)]`` to two unit-norm embeddings ``(B, 2 x 3)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(4, 3).to(DT), nn.Linear(4, 3).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = nn.functional.normalize(torch.tanh(self.image(x[:, :4])), dim=1)
        b = nn.functional.normalize(torch.tanh(self.text(x[:, 4:])), dim=1)
        return torch.cat([a, b], 1)


class SimSiam(nn.Module):
    """SimSiam on two views ``[x1 (4), x2 (4)]``: an encoder ``z`` and a predictor ``p``. Output ``[p1, p2, z1, z2]``
    (the stop-gradient applied by the loss), or with ``stop_in_forward`` the symmetric negative cosine per sample
    ``(B, 1)`` with ``z.detach()`` inside ``forward``."""

    def __init__(self, stop_in_forward: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
        self.predictor = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).to(DT)
        self.stop_in_forward = stop_in_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.encoder(x[:, :4]), self.encoder(x[:, 4:])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if not self.stop_in_forward:
            return torch.cat([p1, p2, z1, z2], 1)
        cos = nn.functional.cosine_similarity
        return -(cos(p1, z2.detach()) + cos(p2, z1.detach()))[:, None] / 2


class MaskedAE(nn.Module):
    """A masked autoencoder over 4 "patches" (features): in training 2 of them, drawn per sample (``torch.rand``
    then ``argsort``), are zeroed before the encoder; evaluation masks none. Output ``[reconstruction (4), mask
    (4)]``, the mask 1 where a patch was hidden (the loss reconstructs those). ``draw=False``: no mask at all (the
    loop masks), the mask columns 0."""

    def __init__(self, draw: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.Linear(4, 6).to(DT), nn.Linear(6, 4).to(DT)
        self.draw = draw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.zeros_like(x)
        if not self.draw:
            return torch.cat([self.dec(torch.tanh(self.enc(x))), hidden], 1)
        if self.training:
            order = torch.rand(x.shape, dtype=x.dtype).argsort(1)
            hidden.scatter_(1, order[:, :2], 1.0)
        else:
            hidden.fill_(1.0)
        recon = self.dec(torch.tanh(self.enc(x * (1 - hidden) if self.training else x)))
        return torch.cat([recon, hidden], 1)


class NeRF(nn.Module):
    """NeRF's positional encoding ``[sin(2^k pi x), cos(2^k pi x)]``, ``k < 3``, of 2-D points, then an MLP to RGB."""

    def __init__(self, act: type = nn.Tanh) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("freqs", (2.0 ** torch.arange(3, dtype=DT)) * math.pi)
        self.net = nn.Sequential(nn.Linear(14, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ang = (x[:, :2, None] * self.freqs).flatten(1)
        return self.net(torch.cat([x[:, :2], torch.sin(ang), torch.cos(ang)], 1))


class UNet1d(nn.Module):
    """A 1-D U-Net over signals of 8: a strided ``Conv1d`` down, a ``ConvTranspose1d`` up, the skip concatenated."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inc = nn.Conv1d(1, 3, 3, padding=1)
        self.down = nn.Conv1d(3, 4, 4, stride=2, padding=1)
        self.up = nn.ConvTranspose1d(4, 3, 4, stride=2, padding=1)
        self.outc = nn.Conv1d(6, 1, 1)
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.inc(x[:, None]))
        b = torch.tanh(self.down(a))
        return self.outc(torch.cat([a, torch.tanh(self.up(b))], 1))[:, 0]


class Siamese(nn.Module):
    """A Siamese pair model ``[x1 (4), x2 (4)]`` to the Euclidean distance of their tanh embeddings ``(B, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.embed(x[:, :4]) - self.embed(x[:, 4:])
        return torch.sqrt((d ** 2).sum(1, keepdim=True) + 1e-12)


class MAML(nn.Module):
    """MAML with the inner step inside ``forward``: a task is ``[support (4 x (2 + 1)), query x (2)]`` of a 1-D
    regression; one inner SGD step (lr ``alpha``) on the support's MSE by ``torch.func.grad`` over
    ``functional_call`` (differentiable: second order), then the adapted net on the query point."""

    def __init__(self, alpha: float = 0.3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
        self.alpha = alpha

    def adapted(self, params: dict[str, torch.Tensor], task: torch.Tensor) -> torch.Tensor:
        support = task[:12].reshape(4, 3)

        def inner(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return ((functional_call(self.net, p, (support[:, :2],))[:, 0] - support[:, 2]) ** 2).mean()

        g = grad(inner)(params)
        fast = {n: params[n] - self.alpha * g[n] for n in params}
        return functional_call(self.net, fast, (task[None, 12:14],))[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.net.named_parameters())
        return vmap(self.adapted, in_dims=(None, 0))(params, x)


class TargetQ(nn.Module):
    """DQN with its target network inside the model as buffers: input ``[s (4), a, r, s' (4)]``, output ``[Q(s)[a],
    r + gamma max Q'(s')]``. Every training forward counts up ``forwards``; the ``period``-th, ``2 period``-th, ...
    copy the online weights into the target buffers first (the target network copied every ``period`` steps)."""

    def __init__(self, period: int = 2, gamma: float = 0.9) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.online = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
        for name, p in self.online.named_parameters():
            self.register_buffer("target_" + name.replace(".", "_"), p.detach().clone())
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self.period, self.gamma = period, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.forwards += 1
            if int(self.forwards) > 1 and int(self.forwards) % self.period == 1:
                with torch.no_grad():
                    for name, p in self.online.named_parameters():
                        getattr(self, "target_" + name.replace(".", "_")).copy_(p)
        q = self.online(x[:, :4]).gather(1, x[:, 4:5].long())
        h = torch.tanh(nn.functional.linear(x[:, 6:], self.target_0_weight, self.target_0_bias))
        q_next = nn.functional.linear(h, self.target_2_weight, self.target_2_bias).amax(1, keepdim=True)
        return torch.cat([q, x[:, 5:6] + self.gamma * q_next], 1)


class SkipGram(nn.Module):
    """word2vec's skip-gram with negative sampling over 8 words: input ``[center, context, n1, n2, n3]`` (ids as
    floats), output the scores ``[<u_c, v_ctx>, <u_c, v_n1>, ...]``. With ``draw`` the training forward draws the 3
    negatives itself (``torch.randint``) in place of the input's; evaluation scores the input's."""

    def __init__(self, draw: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.u, self.v = nn.Embedding(8, 4).to(DT), nn.Embedding(8, 4).to(DT)
        self.draw = draw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        if self.draw and self.training:
            ids = torch.cat([ids[:, :2], torch.randint(0, 8, (len(x), 3))], 1)
        return (self.u(ids[:, :1]) * self.v(ids[:, 1:])).sum(-1)
