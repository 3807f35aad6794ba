"""Models, losses and loops of tests/test_stranger_round5.py and tests/stranger_round5_table.py: the fifth round of
cases a new user brings (written from docs/quickstart.md and docs/guide_own_model.md only).

Every case is a float64 plain loop: SGD at the untuned learning rate 0.5 (or the case's optimizer), 3 steps of 4
of 12 samples, explained on 2 held-out inputs. :func:`figures` measures the replica against the trained model in
evaluation mode, the residual share (and every ExplaindWarning), and the ``keep=("train",)`` scores against the slow
loop reference of tests/replay_reference.py, whose own residual from the actual parameter changes it reports too.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hard_models_kit import data
from reference import rel_err
from replay_reference import ReplayReference
from torch import Tensor, nn

import explaind
from explaind.exceptions import ExplaindWarning

DT = torch.float64
QUAD = {"quadrature": "adaptive", "tol": 1e-11, "device": "cpu"}
N_TRAIN, STEPS, BATCH = 12, 3, 4

XV, YV = data(14, (4,), 3)
XI, YI = data(14, (1, 6, 6), 1)
XS, YS = data(14, (6, 3), 2)
XT, YT = data(14, (5,), 4, vocab=7)


def head(mid: Callable[[nn.Module, Tensor], Tensor] | None = None, hidden: int = 8, out: int = 3) -> nn.Module:
    """``x (n, 4) -> tanh(a x) -> mid(h) -> b``."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, hidden), nn.Linear(hidden, out)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h if mid is None else mid(self, h))
    return Head()


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, its real floating tensors in float64."""
    torch.manual_seed(seed)
    model = build()
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and not isinstance(model, MixedDtype):
            t.data = t.data.to(DT)
    return model


def sgd(model: nn.Module, lr: float = 0.5) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def plain_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The textbook step."""
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def fit(build: Callable[[], nn.Module] | nn.Module, X: Any, y: Tensor, *, loss: Any = "cross_entropy",
        batch_loss: Callable | None = None, opt: Callable[[nn.Module], Any] = sgd, step: Callable = plain_step,
        after: Callable[[int, nn.Module], None] | None = None, steps: int = STEPS,
        **recorder: Any) -> tuple[nn.Module, Any]:
    """Train on the first N_TRAIN samples: ``(model, trajectory)``.

    ``batch_loss(out, y)`` is the loop's loss (default: ``loss`` when it is a callable, else cross entropy);
    ``step(model, opt, X, y, idx, rec, batch_loss)`` one step; ``after(s, model)`` runs after step ``s``.
    """
    model = build if isinstance(build, nn.Module) else seeded(build)
    batch_loss = batch_loss or (loss if callable(loss) else F.cross_entropy)
    optim = opt(model)
    Xt, yt = X[:N_TRAIN], y[:N_TRAIN]
    rec = explaind.TrajectoryRecorder(model, optim, loss=loss, train_data=(Xt, yt), **recorder)
    gen = torch.Generator().manual_seed(0)
    model.train()
    with rec:
        for s in range(steps):
            step(model, optim, Xt, yt, torch.randperm(N_TRAIN, generator=gen)[:BATCH], rec, batch_loss)
            if after is not None:
                after(s, model)
    return model, rec.trajectory


def _flat(t: Any) -> np.ndarray:
    t = t.logits if hasattr(t, "logits") else t
    return np.asarray(torch.as_tensor(t).detach(), dtype=np.float64).reshape(len(t), -1)


def figures(model: nn.Module, traj: Any, X_test: Any, *, reference: type = ReplayReference,
            truth: Tensor | None = None, **quad: Any) -> dict[str, Any]:
    """``replica`` (relative to ``model`` in evaluation mode, or to ``truth``), ``share`` (residual share),
    ``scores`` (train scores relative to ``reference``), ``reference_residual`` (its largest per-step residual
    relative to its largest update) and ``warnings`` (every ExplaindWarning of the replica and the estimator)."""
    quad = {**QUAD, **quad}
    with torch.no_grad():
        truth = model.eval()(X_test) if truth is None else truth
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        replica = rel_err(_flat(explaind.KernelReplica(**quad).fit(traj).predict(X_test)), _flat(truth))
        att = explaind.InfluenceEstimator(keep=("train",), **quad).fit(traj).transform(X_test)
    ref = reference(traj, X_test, panels=2)
    expected = ref.kept(("train",))
    return {"replica": replica, "share": float(att.meta["residual_share"]),
            "scores": rel_err(np.asarray(att.values.detach()).reshape(expected.shape), expected),
            "reference_residual": float(ref.E.abs().max()) / max(float(torch.stack(ref.delta).abs().max()), 1e-300),
            "warnings": [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]}


def assert_exact(got: dict[str, Any]) -> None:
    """Replica <= 1e-6, residual share <= 1e-9 with no warning, scores <= 1e-9, reference residual <= 1e-10."""
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and not got["warnings"], got
    assert got["scores"] <= 1e-9 and got["reference_residual"] <= 1e-10, got


# ------------------------------------------------------------------------------------------ layers and models
class RReLUNet(nn.Module):
    """``Linear - RReLU - Linear``: torch draws each unit's negative slope in training mode."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.RReLU(0.1, 0.3), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def mc_dropout() -> nn.Module:
    """Monte Carlo dropout: ``F.dropout(h, 0.2, training=True)``, random in evaluation mode too."""
    return head(lambda m, h: F.dropout(h, 0.2, training=True))


class ChannelDropout(nn.Module):
    """Conv1d over a ``(n, 6, 3)`` sequence (channels last in the data) with ``Dropout1d``, then
    ``FeatureAlphaDropout`` after SELU, a mean over time, a linear head."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 4, 3, padding=1)
        self.d1, self.selu, self.d2 = nn.Dropout1d(0.3), nn.SELU(), nn.FeatureAlphaDropout(0.2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.d1(torch.tanh(self.c(x.transpose(1, 2))))
        return self.head(self.d2(self.selu(h)).mean(-1))


def norms() -> nn.Module:
    """torch's ``nn.RMSNorm`` and a ``LayerNorm(bias=False)`` between tanh layers."""
    return nn.Sequential(nn.Linear(4, 8), nn.RMSNorm(8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8, bias=False),
                         nn.Tanh(), nn.Linear(8, 3))


class PaddedConvs(nn.Module):
    """``padding="same"`` dilated Conv2d with ``padding_mode="reflect"``, a strided ``"circular"`` Conv2d, a
    ``ConvTranspose2d`` with ``output_padding=1``, ``nn.Unfold`` patches and a head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding="same", dilation=2, padding_mode="reflect")
        self.c2 = nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="circular")
        self.t = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
        self.unfold = nn.Unfold(2, stride=2)
        self.head = nn.Linear(2 * 4 * 9, 3)

    def forward(self, x):
        h = torch.tanh(self.t(torch.tanh(self.c2(torch.tanh(self.c1(x))))))  # (n, 2, 6, 6)
        return self.head(self.unfold(h).flatten(1))


class SpatialTransformer(nn.Module):
    """A localisation net predicts an affine map near the identity; ``F.affine_grid`` and bilinear
    ``F.grid_sample`` resample the 6x6 image; a linear head."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Linear(36, 6)
        self.head = nn.Linear(36, 3)

    def forward(self, x):
        theta = torch.eye(2, 3, dtype=x.dtype) + 0.1 * torch.tanh(self.loc(x.flatten(1))).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return self.head(F.grid_sample(x, grid, mode="bilinear", align_corners=False).flatten(1))


class CellLoop(nn.Module):
    """``nn.GRUCell`` and ``nn.LSTMCell`` stepped by a Python loop over the ``(n, 6, 3)`` sequence."""

    def __init__(self):
        super().__init__()
        self.gru, self.lstm, self.head = nn.GRUCell(3, 4), nn.LSTMCell(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = x.new_zeros(len(x), 4)
        hc = (x.new_zeros(len(x), 4), x.new_zeros(len(x), 4))
        for t in range(x.shape[1]):
            h = self.gru(x[:, t], h)
            hc = self.lstm(h, hc)
        return self.head(hc[0])


class PaddedAttention(nn.Module):
    """Token ids (0 is padding) -> embedding -> ``nn.MultiheadAttention(add_zero_attn=True)`` with the padding as
    ``key_padding_mask`` -> masked mean -> head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True, add_zero_attn=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        pad = x == 0
        e = self.emb(x)
        h, _ = self.att(e, e, e, key_padding_mask=pad, need_weights=False)
        keep = (~pad).to(h.dtype)[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1))


class AdaptiveSoftmax(nn.Module):
    """A tanh layer into ``nn.AdaptiveLogSoftmaxWithLoss`` (cut-off 2 of 5 classes); outputs its ``log_prob``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.out = nn.AdaptiveLogSoftmaxWithLoss(8, 5, cutoffs=[2], div_value=2.0)

    def forward(self, x):
        return self.out.log_prob(torch.tanh(self.a(x)))


class ComplexFilter(nn.Module):
    """A learnable complex128 weight: ``|x W|`` of the inputs seen as complex numbers, a real head."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6, dtype=torch.complex128) / 2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh((x.to(torch.complex128) @ self.w).abs()))


class ComplexAsReal(nn.Module):
    """The fix the refusal names: the complex weight held as a real ``(4, 6, 2)`` parameter, read through
    ``torch.view_as_complex``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.view_as_real(torch.randn(4, 6, dtype=torch.complex128) / 2))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh((x.to(torch.complex128) @ torch.view_as_complex(self.w)).abs()))


class MixedDtype(nn.Module):
    """A float32 first layer inside a float64 model (its input cast down, its output cast up)."""

    def __init__(self, follow: bool = False):
        super().__init__()
        self.a, self.b, self.follow = nn.Linear(4, 8), nn.Linear(8, 3, dtype=DT), follow

    def forward(self, x):
        x = x.to(self.a.weight.dtype) if self.follow else x.float()
        return self.b(torch.tanh(self.a(x)).to(self.b.weight.dtype))


class CosineClassifier(nn.Module):
    """L2-normalised features against L2-normalised class weights, times a learned ``exp(logit_scale)``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.w = nn.Parameter(torch.randn(3, 8))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(5.0)))

    def forward(self, x):
        h = F.normalize(torch.tanh(self.a(x)), dim=-1)
        return self.logit_scale.exp() * h @ F.normalize(self.w, dim=-1).T


class TiedAutoencoder(nn.Module):
    """One weight used as the encoder ``W`` and the decoder ``W.T``; a head reads the reconstruction."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 4) / 2)
        self.b_enc, self.b_dec = nn.Parameter(torch.zeros(6)), nn.Parameter(torch.zeros(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(x @ self.W.T + self.b_enc)
        return self.head(torch.tanh(h @ self.W + self.b_dec))


# ------------------------------------------------------------------------------------------ losses
def pos_weighted_bce(out: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(out, y, pos_weight=torch.tensor([1.0, 3.0, 0.5], dtype=out.dtype))


def multilabel_soft_margin(out: Tensor, y: Tensor) -> Tensor:
    return F.multilabel_soft_margin_loss(out, y, weight=torch.tensor([1.0, 2.0, 0.5], dtype=out.dtype))


def huber(out: Tensor, y: Tensor) -> Tensor:
    return F.huber_loss(out, y, delta=0.5)


def gaussian_nll(out: Tensor, y: Tensor) -> Tensor:
    """Mean and log-variance heads: ``out[:, 0]`` and ``out[:, 1]``, ``y`` a real target."""
    return F.gaussian_nll_loss(out[:, 0], y, out[:, 1].exp())


def poisson_nll(out: Tensor, y: Tensor) -> Tensor:
    return F.poisson_nll_loss(out, y, log_input=True)


def focal(out: Tensor, y: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss written by hand: ``-(1 - p_y)^gamma log p_y``, mean over the batch."""
    logp = F.log_softmax(out, -1).gather(1, y[:, None])[:, 0]
    return (-(1 - logp.exp()) ** gamma * logp).mean()


def multi_margin(out: Tensor, y: Tensor) -> Tensor:
    return F.multi_margin_loss(out, y, margin=1.0)


def triplet(out: Tensor, y: Tensor) -> Tensor:
    """``out (n, 3, e)``: anchor, positive and negative embeddings of each sample (``y`` unused)."""
    return F.triplet_margin_loss(out[:, 0], out[:, 1], out[:, 2], margin=1.0)


def cosine_pairs(out: Tensor, y: Tensor) -> Tensor:
    """``out (n, 2, e)``: the two embeddings of each pair; ``y`` is +1 (similar) or -1."""
    return F.cosine_embedding_loss(out[:, 0], out[:, 1], y, margin=0.2)


def distillation(out: Tensor, y: Tensor) -> Tensor:
    """``y (n, 4)``: the label in column 0, the teacher's log-probabilities after it; KL (log target) plus CE."""
    kl = F.kl_div(F.log_softmax(out, -1), y[:, 1:], reduction="batchmean", log_target=True)
    return 0.5 * kl + 0.5 * F.cross_entropy(out, y[:, 0].long())


def ctc(out: Tensor, y: Tensor) -> Tensor:
    """``out (n, T, 4)`` per-frame logits (class 0 is the blank), ``y (n, 2)`` each sample's two labels."""
    logp = F.log_softmax(out, -1).transpose(0, 1)  # (T, n, C), CTC's layout
    n, T = out.shape[0], out.shape[1]
    return F.ctc_loss(logp, y, torch.full((n,), T, dtype=torch.long), torch.full((n,), 2, dtype=torch.long))


def info_nce(out: Tensor, y: Tensor) -> Tensor:
    """In-batch InfoNCE of two views: ``out (n, 2, e)``, each first view against every second view of the batch."""
    a, b = F.normalize(out[:, 0], dim=-1), F.normalize(out[:, 1], dim=-1)
    return F.cross_entropy(a @ b.T / 0.5, torch.arange(len(out)))


class Views(nn.Module):
    """A shared tanh encoder applied to each of the ``k`` views of a sample: ``x (n, k, 4) -> (n, k, 3)``."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.enc(x)


class Uncertainty(nn.Module):
    """A classifier with a learned loss weight ``log_var`` (Kendall et al.'s uncertainty weighting) that only the
    loss reads: ``exp(-log_var) * CE + log_var``."""

    def __init__(self):
        super().__init__()
        self.net = head()
        self.log_var = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return self.net(x)


class UncertaintyInOutputs(nn.Module):
    """The fix the check names: ``log_var`` returned as a fourth output column, read there by the loss."""

    def __init__(self):
        super().__init__()
        self.net = head()
        self.log_var = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return torch.cat([self.net(x), self.log_var.expand(len(x), 1)], 1)


def uncertainty_in_outputs(out: Tensor, y: Tensor) -> Tensor:
    return (torch.exp(-out[:, 3]) * F.cross_entropy(out[:, :3], y, reduction="none") + out[:, 3]).mean()


def uncertainty_loss(model: Uncertainty) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(out: Tensor, y: Tensor) -> Tensor:
        return torch.exp(-model.log_var) * F.cross_entropy(out, y) + model.log_var
    return loss


def loss_data(kind: str) -> tuple[Tensor, Tensor]:
    """Inputs and targets of the loss cases: ``(14, 4)`` inputs (``(14, k, 4)`` for views) and targets of ``kind``."""
    gen = torch.Generator().manual_seed(11)
    X = torch.randn(14, 4, generator=gen, dtype=DT)
    if kind == "multilabel":
        return X, (torch.rand(14, 3, generator=gen) < 0.4).to(DT)
    if kind == "real":
        return X, torch.randn(14, 3, generator=gen, dtype=DT)
    if kind == "scalar":
        return X, torch.randn(14, generator=gen, dtype=DT)
    if kind == "counts":
        return X, torch.randint(0, 5, (14, 3), generator=gen).to(DT)
    if kind == "triplet":
        return torch.randn(14, 3, 4, generator=gen, dtype=DT), torch.zeros(14, dtype=DT)
    if kind == "pairs":
        return torch.randn(14, 2, 4, generator=gen, dtype=DT), torch.randint(0, 2, (14,), generator=gen).to(DT) * 2 - 1
    if kind == "teacher":
        torch.manual_seed(3)
        teacher = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
        with torch.no_grad():
            soft = F.log_softmax(teacher(X), -1)
        return X, torch.cat([torch.randint(0, 3, (14, 1), generator=gen).to(DT), soft], 1)
    return X, torch.randint(0, 3, (14,), generator=gen)


class FrameConv(nn.Module):
    """Conv1d over ``(n, 6, 3)`` frames to per-frame logits ``(n, 6, 4)`` (class 0 the CTC blank)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 6, 3, padding=1), nn.Conv1d(6, 4, 1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x.transpose(1, 2)))).transpose(1, 2)


# ------------------------------------------------------------------------------------------ loops
def noisy_inputs_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """Gaussian-noise augmentation of the batch inside the loop."""
    opt.zero_grad()
    batch_loss(model(X[idx] + 0.1 * torch.randn_like(X[idx])), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def reseeded_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """``torch.manual_seed(0)`` at the top of every step (the same dropout masks at every step)."""
    torch.manual_seed(0)
    plain_step(model, opt, X, y, idx, rec, batch_loss)


def late_zero_grad_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """``zero_grad()`` between ``backward()`` and ``step()``: the optimizer steps on zero gradients."""
    batch_loss(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.zero_grad(set_to_none=False)
    opt.step()


def halved_grads_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """Every gradient halved by hand after ``log_batch`` (a global factor, as a fixed loss scale)."""
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    for p in model.parameters():
        p.grad.mul_(0.5)
    opt.step()


def mask_logged_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The batch logged as a boolean mask over the training set instead of its indices."""
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[idx] = True
    rec.log_batch(mask)
    opt.step()


def twice_stepped(model, opt, X, y, idx, rec, batch_loss) -> None:
    """``optimizer.step()`` called twice on one logged batch (a copy-paste slip)."""
    plain_step(model, opt, X, y, idx, rec, batch_loss)
    opt.step()


def twice_logged(model, opt, X, y, idx, rec, batch_loss) -> None:
    """``rec.log_batch(idx)`` called twice for one batch (once in the loop, once in a helper)."""
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    rec.log_batch(idx)
    opt.step()


def float32_loss_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """A float64 model whose loss the loop computes on ``out.float()`` (a habit from float32 code)."""
    opt.zero_grad()
    batch_loss(model(X[idx]).float(), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


class AuxRouter(nn.Module):
    """Two tanh experts mixed by a softmax gate; returns ``(logits, aux)`` with ``aux`` a load-balancing loss over
    the batch (the squared mean gate probability per expert, times 2), which the loop adds to its loss."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 2)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)) for _ in range(2)])

    def forward(self, x):
        g = self.gate(x).softmax(-1)
        out = (torch.stack([e(x) for e in self.experts], -1) * g[:, None]).sum(-1)
        return out, 2 * (g.mean(0) ** 2).sum()


def aux_loss_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The loop adds the model's auxiliary (load-balancing) loss, the second output, with weight 0.1."""
    opt.zero_grad()
    out, aux = model(X[idx])
    (F.cross_entropy(out, y[idx]) + 0.1 * aux).backward()
    rec.log_batch(idx)
    opt.step()


def relabel(s: int, model: nn.Module, y: Tensor) -> None:
    """Self-training: after step 0, the training labels are overwritten in place with the model's predictions."""
    if s == 0:
        with torch.no_grad():
            y[:N_TRAIN] = model(XV[:N_TRAIN]).argmax(-1)


class Uint8Images(nn.Module):
    """uint8 6x6 images scaled in the forward (``x.to(float64) / 255`` minus 0.5), a Conv2d, tanh, a head."""

    def __init__(self):
        super().__init__()
        self.c, self.head = nn.Conv2d(1, 2, 3), nn.Linear(2 * 16, 3)

    def forward(self, x):
        h = torch.tanh(self.c(x.to(self.c.weight.dtype) / 255 - 0.5))
        return self.head(h.flatten(1))


XU = (torch.rand(14, 1, 6, 6, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)


def hooked_output() -> nn.Module:
    """A forward hook on the first layer that rescales its output (``out * 2``): part of the model's function."""
    model = head()
    model.a.register_forward_hook(lambda m, inp, out: out * 2)
    return model


class RenormalisedHead(nn.Module):
    """A NormFace-style head that renormalises its weight rows in place in every forward (under ``no_grad``)."""

    def __init__(self):
        super().__init__()
        self.a, self.w = nn.Linear(4, 8), nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        with torch.no_grad():
            self.w.div_(self.w.norm(dim=1, keepdim=True))
        return 5 * torch.tanh(self.a(x)) @ self.w.T


class TwoHeads(nn.Module):
    """Multi-task: a shared tanh trunk, a 3-class head and a 2-dimensional regression head, returned as a tuple, or
    concatenated into one ``(n, 5)`` output when ``concat``."""

    def __init__(self, concat: bool = False):
        super().__init__()
        self.trunk, self.cls, self.reg, self.concat = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 2), concat

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return torch.cat([self.cls(h), self.reg(h)], 1) if self.concat else (self.cls(h), self.reg(h))


REG = torch.randn(14, 2, generator=torch.Generator().manual_seed(8), dtype=DT)


def multi_task_tuple_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """Cross entropy on the first head plus the squared error of the second against REG."""
    opt.zero_grad()
    a, b = model(X[idx])
    (F.cross_entropy(a, y[idx]) + F.mse_loss(b, REG[idx])).backward()
    rec.log_batch(idx)
    opt.step()


def multi_task_loss(out: Tensor, y: Tensor) -> Tensor:
    """The fix: one output ``(n, 5)``, ``y (n, 3)`` holding the label and the two regression targets."""
    return F.cross_entropy(out[:, :3], y[:, 0].long()) + F.mse_loss(out[:, 3:], y[:, 1:])


def sam_step(model, opt, X, y, idx, rec, batch_loss, rho: float = 0.05) -> None:
    """Sharpness-aware minimisation: ascend to ``theta + rho g / |g|``, take the gradient there, come back, step."""
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    eps = [rho * p.grad / norm for p in params]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    rec.log_batch(idx)
    opt.step()


class Prototypes(nn.Module):
    """A prototype classifier: negative squared ``torch.cdist`` distances of tanh features to 3 learned prototypes;
    ``by_hand``: the same distances as the refusal's fix writes them."""

    def __init__(self, by_hand: bool = False):
        super().__init__()
        self.a, self.protos, self.by_hand = nn.Linear(4, 8), nn.Parameter(torch.randn(3, 8)), by_hand

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.by_hand:
            return -((h[..., :, None, :] - self.protos[..., None, :, :]) ** 2).sum(-1)
        return -torch.cdist(h, self.protos) ** 2


class Reparameterised(nn.Module):
    """A VAE-style bottleneck: ``Normal(mu, softplus(s)).rsample()`` in training mode, ``mu`` in evaluation mode."""

    def __init__(self):
        super().__init__()
        self.a, self.mu, self.s, self.head = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        mu = self.mu(h)
        z = torch.distributions.Normal(mu, F.softplus(self.s(h))).rsample() if self.training else mu
        return self.head(z)


def reset_head(s: int, model: nn.Module) -> None:
    """``reset_parameters()`` of the head after step 1 (re-initialising a layer mid-run)."""
    if s == 1:
        model.b.reset_parameters()


class StatefulGRU(nn.Module):
    """Truncated back-propagation through time: the GRU's last hidden state, detached, starts the next batch's
    sequences (kept as a plain tensor attribute); evaluation starts from zeros."""

    def __init__(self):
        super().__init__()
        self.gru, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 3)
        self.h = None

    def forward(self, x):
        h0 = self.h if (self.training and self.h is not None and self.h.shape[1] == len(x)) else None
        out, h = self.gru(x, h0)
        if self.training:
            self.h = h.detach()
        return self.head(out[:, -1])


def ema_copy_run() -> tuple[nn.Module, nn.Module, Any]:
    """A hand-written EMA of the weights (a deep copy updated with ``lerp_`` after every step):
    ``(model, ema, trajectory)``."""
    model = seeded(head)
    ema = copy.deepcopy(model)

    def after(s, m):
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), m.parameters()):
                pe.lerp_(p, 0.5)

    _, traj = fit(model, XV, YV, after=after)
    return model, ema, traj


def tensor_lr_adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01, dtype=DT))


def no_decay_adamw(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with biases and norm weights in a group without weight decay (the common recipe)."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=0.05)


# ------------------------------------------------------------------------------------------ the cases
def model_case(build: Callable[[], nn.Module], X: Any, y: Tensor, **recorder: Any) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        model, traj = fit(build, X, y, **recorder)
        return figures(model, traj, X[N_TRAIN:])
    return run


def loss_case(kind: str, loss: Callable, build: Callable[[], nn.Module] = head,
              **recorder: Any) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        X, y = loss_data(kind)
        model, traj = fit(build, X, y, loss=loss, **recorder)
        return figures(model, traj, X[N_TRAIN:])
    return run


def loop_case(**kw: Any) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        build = kw.pop("build", head)
        model, traj = fit(build, XV, YV, **kw)
        return figures(model, traj, XV[N_TRAIN:])
    return run


def uncertainty_case() -> dict[str, Any]:
    model = seeded(Uncertainty)
    model, traj = fit(model, XV, YV, loss=uncertainty_loss(model))
    return figures(model, traj, XV[N_TRAIN:])


def ema_case() -> dict[str, Any]:
    model, ema, traj = ema_copy_run()
    got = figures(model, traj, XV[N_TRAIN:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        report = explaind.KernelReplica(**QUAD).fit(traj).fidelity_report(XV[N_TRAIN:], model=ema)
    got["ema_error"] = float(report["model_max_rel_error"])
    got["warnings"] += [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]
    return got


def relabel_case(**recorder: Any) -> dict[str, Any]:
    y = YV.clone()
    model, traj = fit(head, XV, y, after=lambda s, m: relabel(s, m, y), **recorder)
    return figures(model, traj, XV[N_TRAIN:])


def uncertainty_check_off_case() -> dict[str, Any]:
    model = seeded(Uncertainty)
    model, traj = fit(model, XV, YV, loss=uncertainty_loss(model), check_gradients=False)
    return figures(model, traj, XV[N_TRAIN:])


def multi_task_concat_case() -> dict[str, Any]:
    y = torch.cat([YV[:, None].to(DT), REG], 1)
    model, traj = fit(lambda: TwoHeads(concat=True), XV, y, loss=multi_task_loss)
    return figures(model, traj, XV[N_TRAIN:])


def ctc_case() -> dict[str, Any]:
    y = torch.randint(1, 4, (14, 2), generator=torch.Generator().manual_seed(9))
    model, traj = fit(FrameConv, XS, y, loss=ctc)
    return figures(model, traj, XS[N_TRAIN:])


def inference_mode_data_case() -> dict[str, Any]:
    """Training data made under ``torch.inference_mode()`` (features precomputed there: no version counter)."""
    with torch.inference_mode():
        X, y = XV.clone(), YV.clone()
    model, traj = fit(head, X, y)
    return figures(model, traj, XV[N_TRAIN:])


def normalised_in_place_case() -> dict[str, Any]:
    """The inputs standardised in place after step 1 (``X.sub_(mean).div_(std)``), the loop going on with them."""
    X = XV.clone()

    def after(s, m):
        if s == 1:
            X.sub_(X.mean(0)).div_(X.std(0))

    model, traj = fit(head, X, YV, after=after)
    return figures(model, traj, XV[N_TRAIN:])


def stateful_gru_case() -> dict[str, Any]:
    model, traj = fit(StatefulGRU, XS, YS)
    model.h = None
    return figures(model, traj, XS[N_TRAIN:])


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    # layers and models
    "rrelu": model_case(RReLUNet, XV, YV),
    "rrelu_captured": model_case(RReLUNet, XV, YV, capture_random=True),
    "mc_dropout": model_case(mc_dropout, XV, YV),
    "mc_dropout_captured": model_case(mc_dropout, XV, YV, capture_random=True),
    "dropout1d_feature_alpha": model_case(ChannelDropout, XS, YS),
    "rmsnorm_layernorm_no_bias": model_case(norms, XV, YV),
    "conv_padding_modes_output_padding_unfold": model_case(PaddedConvs, XI, YI),
    "spatial_transformer_grid_sample": model_case(SpatialTransformer, XI, YI),
    "gru_lstm_cells": model_case(CellLoop, XS, YS),
    "mha_add_zero_attn_key_padding": model_case(PaddedAttention, XT, YT),
    "adaptive_log_softmax": model_case(AdaptiveSoftmax, XV, YV % 5),
    "complex_parameter": model_case(ComplexFilter, XV, YV),
    "complex_as_real_pairs": model_case(ComplexAsReal, XV, YV),
    "float32_layer_in_float64_model": model_case(MixedDtype, XV, YV),
    "float32_layer_cast_to_its_weight_dtype": model_case(lambda: MixedDtype(follow=True), XV, YV),
    "cosine_classifier_learned_scale": model_case(CosineClassifier, XV, YV),
    "tied_autoencoder_w_and_wT": model_case(TiedAutoencoder, XV, YV),
    # losses
    "bce_pos_weight": loss_case("multilabel", pos_weighted_bce),
    "multilabel_soft_margin_weight": loss_case("multilabel", multilabel_soft_margin),
    "huber": loss_case("real", huber),
    "gaussian_nll": loss_case("scalar", gaussian_nll, lambda: head(out=2)),
    "poisson_nll": loss_case("counts", poisson_nll),
    "focal_by_hand": loss_case("classes", focal),
    "multi_margin": loss_case("classes", multi_margin),
    "triplet_margin": loss_case("triplet", triplet, Views),
    "cosine_embedding": loss_case("pairs", cosine_pairs, Views),
    "distillation_kl_log_target": loss_case("teacher", distillation),
    "info_nce_check_off": loss_case("pairs", info_nce, Views, check_gradients=False),
    "uncertainty_weighted_loss": uncertainty_case,
    "uncertainty_weighted_loss_check_off": uncertainty_check_off_case,
    "uncertainty_weight_in_outputs": loss_case("classes", uncertainty_in_outputs, UncertaintyInOutputs),
    # loops
    "noise_augmentation_in_loop": loop_case(step=noisy_inputs_step),
    "noise_augmentation_check_off": loop_case(step=noisy_inputs_step, check_gradients=False),
    "manual_seed_each_step_dropout": loop_case(build=lambda: head(lambda m, h: F.dropout(h, 0.3, m.training)),
                                               step=reseeded_step, capture_random=True),
    "zero_grad_between_backward_and_step": loop_case(step=late_zero_grad_step),
    "grads_halved_by_hand": loop_case(step=halved_grads_step),
    "reset_parameters_mid_run": loop_case(after=reset_head),
    "ema_copy_explained": ema_case,
    "tbptt_hidden_state_carried": stateful_gru_case,
    "adam_tensor_lr": loop_case(opt=tensor_lr_adam),
    "log_batch_with_a_boolean_mask": loop_case(step=mask_logged_step),
    "optimizer_step_twice": loop_case(step=twice_stepped),
    "log_batch_twice": loop_case(step=twice_logged),
    "float32_loss_of_float64_model": loop_case(step=float32_loss_step),
    "aux_load_balancing_loss": loop_case(build=AuxRouter, step=aux_loss_step),
    "labels_overwritten_in_place": relabel_case,
    "labels_overwritten_in_place_check_off": lambda: relabel_case(check_gradients=False),
    "inputs_normalised_in_place": normalised_in_place_case,
    "train_data_made_under_inference_mode": inference_mode_data_case,
    "uint8_images_scaled_in_forward": model_case(Uint8Images, XU, YV),
    "ctc_loss": ctc_case,
    "prototypes_cdist": model_case(Prototypes, XV, YV),
    "prototypes_distances_by_hand": model_case(lambda: Prototypes(by_hand=True), XV, YV),
    "vae_rsample": model_case(Reparameterised, XV, YV),
    "vae_rsample_captured": model_case(Reparameterised, XV, YV, capture_random=True),
    "forward_hook_rescaling_output": model_case(hooked_output, XV, YV),
    "weight_renormalised_in_place_in_forward": model_case(RenormalisedHead, XV, YV),
    "multi_task_heads_as_a_tuple": loop_case(build=TwoHeads, step=multi_task_tuple_step),
    "multi_task_heads_concatenated": multi_task_concat_case,
    "sharpness_aware_minimisation": loop_case(step=sam_step),
    "adamw_no_decay_groups": loop_case(opt=no_decay_adamw),
}
