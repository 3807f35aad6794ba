"""Models and loops of tests/test_stranger_round4.py and tests/stranger_round4_table.py: the fourth round of cases
a new user brings (written from docs/quickstart.md and docs/guide_own_model.md only).

Model cases train with tests/hard_models_kit.py (float64, SGD 0.5, 3 steps of 4 of 12 samples, measured on 2
held-out inputs against tests/replay_reference.py); loop cases with tests/_stranger_loops_kit.py (a float64 tanh
or ReLU MLP, 6 steps of 6 samples, against tests/reference.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from _stranger_loops_kit import DT, QUAD, batches, data, measure, mlp, plain, sgd, train
from hard_models_kit import data as hard_data
from reference import Reference, rel_err
from torch import nn
from torch.optim import lr_scheduler

import explaind
from explaind.exceptions import ExplaindWarning

XV, YV = hard_data(14, (4,), 3)
XI, YI = hard_data(14, (1, 4, 4), 1)
XS, YS = hard_data(14, (4, 3), 1)
XT, YT = hard_data(14, (5,), 4, vocab=6)


def stack(*acts: nn.Module) -> Callable[[], nn.Module]:
    """``Linear(4, 8)``, then for each activation ``act, Linear(8, 8)``, and a ``Linear(8, 3)`` head."""
    def build() -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(4, 8)]
        for act in acts:
            layers += [act, nn.Linear(8, 8)]
        return nn.Sequential(*layers[:-1], nn.Linear(8, 3))
    return build


class Square(torch.autograd.Function):
    """``x * x`` as a custom autograd.Function in torch.func's style (setup_context, jvp, generated vmap rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return 2 * x * tangent


class OldSquare(torch.autograd.Function):
    """The same function in the old style: ``forward(ctx, x)``, no ``setup_context``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class Head(nn.Module):
    """``x -> tanh(a x) -> mid(h) -> b``; ``mid`` is what each case puts in the middle (identity by default)."""

    def __init__(self, mid: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None, hidden: int = 8):
        super().__init__()
        self.a, self.b = nn.Linear(4, hidden), nn.Linear(hidden, 3)
        self.mid = mid

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h if self.mid is None else self.mid(self, h))


def custom_function(old: bool = False) -> nn.Module:
    fn = OldSquare if old else Square
    return Head(lambda m, h: fn.apply(h))


def straight_through() -> nn.Module:
    """Quantisation-aware training: ``h`` rounded to halves, gradients passed straight through."""
    return Head(lambda m, h: h + (torch.round(h * 2) / 2 - h).detach())


def fft_mixing() -> nn.Module:
    """FNet-style mixing: the real part of the FFT of the hidden units."""
    return Head(lambda m, h: torch.fft.fft(h).real)


def batch_centred() -> nn.Module:
    """Hidden units centred on the batch mean in training (a hand-written batch statistic, no BatchNorm module)."""
    return Head(lambda m, h: h - h.mean(0, keepdim=True) if m.training else h)


def gumbel() -> nn.Module:
    """Hidden units gated by ``F.gumbel_softmax`` of themselves in training (draws from torch's generator)."""
    return Head(lambda m, h: h * F.gumbel_softmax(h, tau=1.0) if m.training else h)


def one_hot_router() -> nn.Module:
    """Two experts, the argmax of a softmax gate picks one per sample through ``F.one_hot``."""
    return Router(one_hot=True)


class Router(nn.Module):
    """Top-1 mixture of two linear experts; the chosen expert's output times its gate probability."""

    def __init__(self, one_hot: bool = False):
        super().__init__()
        self.gate, self.one_hot = nn.Linear(4, 2), one_hot
        self.experts = nn.ModuleList([nn.Linear(4, 3) for _ in range(2)])

    def forward(self, x):
        g = self.gate(x).softmax(-1)
        top = g.argmax(-1, keepdim=True)
        outs = torch.stack([e(x) for e in self.experts], 1)  # (n, 2, 3)
        if self.one_hot:
            return (outs * (F.one_hot(top[:, 0], 2).to(x.dtype) * g)[..., None]).sum(1)
        return outs.gather(1, top[..., None].expand(-1, 1, 3)).squeeze(1) * g.gather(-1, top)


class AdaptivePool(nn.Module):
    """Conv2d, tanh, ``AdaptiveMaxPool2d(2)`` on 4x4 maps, a linear head."""

    def __init__(self):
        super().__init__()
        self.c, self.pool, self.head = nn.Conv2d(1, 3, 3, padding=1), nn.AdaptiveMaxPool2d(2), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.pool(torch.tanh(self.c(x))).flatten(1))


class Tokens(nn.Module):
    """Token rows through ``nn.Embedding(6, 4, scale_grad_by_freq=...)``, tanh, a mean over positions, a head."""

    def __init__(self, scale_grad_by_freq: bool = True):
        super().__init__()
        self.emb, self.head = nn.Embedding(6, 4, scale_grad_by_freq=scale_grad_by_freq), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).mean(1))


class SequenceFirst(nn.Module):
    """``nn.Transformer`` with ``batch_first=False``, ``norm_first=True``, dropout 0.1, GELU and a causal target
    mask (``tgt_is_causal``); the sequence attends to itself; a head on the last position."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(3, 8), nn.Linear(8, 3)
        self.t = nn.Transformer(8, 2, 1, 1, 16, dropout=0.1, activation="gelu", batch_first=False, norm_first=True)

    def forward(self, x):
        src = self.inp(x).transpose(0, 1)  # (length, n, d)
        mask = nn.Transformer.generate_square_subsequent_mask(src.shape[0], dtype=src.dtype)
        return self.head(self.t(src, src, tgt_mask=mask, tgt_is_causal=True)[-1])


def pruned() -> nn.Module:
    """``torch.nn.utils.prune.l1_unstructured`` on the first layer before training (weight_orig * weight_mask)."""
    model = stack(nn.Tanh())()
    prune.l1_unstructured(model[0], "weight", 0.5)
    return model


def scripted() -> nn.Module:
    """A ``torch.jit.script`` block inside an eager model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        block = torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.Tanh()))
    return nn.Sequential(block, nn.Linear(8, 3))


def hooked(scale: float | None) -> Callable[[], nn.Module]:
    """A full backward hook on the head: ``None`` only reads the gradient, a number rescales its input gradient."""
    def build() -> nn.Module:
        model = stack(nn.Tanh())()
        seen = []
        if scale is None:
            model[2].register_full_backward_hook(lambda m, gi, go: seen.append(float(go[0].norm())))
        else:
            model[2].register_full_backward_hook(lambda m, gi, go: (gi[0] * scale,))
        return model
    return build


# ----------------------------------------------------------------------------------------------- loop cases
WARM_UP = [0.0, 0.5, 1.0, 0.0, 1.0, 1.0, 1.0]  # LambdaLR factors: lr 0 at steps 0 and 3


def relu_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)


def warm_up(opt_kind: str) -> dict[str, Any]:
    """``LambdaLR`` with a factor 0 at two steps, stepped after every step (SGD momentum or Adam)."""
    model = mlp()
    opt = sgd(model) if opt_kind == "sgd" else torch.optim.Adam(model.parameters(), lr=0.01)
    sched = lr_scheduler.LambdaLR(opt, lambda s: WARM_UP[s])
    return measure(model, train(model, opt, after=lambda s: sched.step()))


class Float32Inputs(nn.Module):
    """A float64 model fed float32 rows; its forward casts them to float64."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x.to(torch.float64))


def float32_inputs() -> dict[str, Any]:
    """train_data and test inputs in float32, the model in float64."""
    model = Float32Inputs()
    opt = sgd(model)
    X, y, X_test = data()
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X.float(), y))
    with rec:
        for idx in batches():
            plain(0, model, opt, X.float(), y, idx, rec)
    with torch.no_grad():
        truth = model.eval()(X_test.float())
    replica = rel_err(explaind.KernelReplica(**QUAD).fit(rec.trajectory).predict(X_test.float()), truth)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), **QUAD).fit(rec.trajectory).transform(X_test.float())
    ref = Reference(rec.trajectory, X_test.float(), panels=1)
    expected = ref.kept(("train",))
    return {"replica": replica, "share": float(att.meta["residual_share"]),
            "scores": rel_err(att.values.reshape(expected.shape), expected),
            "reference_residual": float(ref.E.abs().max()) / float(torch.stack(ref.delta).abs().max()),
            "warnings": [str(w.message) for w in caught]}


class Annealed(nn.Module):
    """Logits divided by a temperature: a plain Python attribute (``counted=False``, raised by the loop after every
    step) or ``1 + 0.5 t`` with ``t`` an integer buffer the training forward counts up."""

    def __init__(self, counted: bool = False):
        super().__init__()
        self.net, self.tau, self.counted = mlp(), 1.0, counted
        self.register_buffer("t", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if not self.counted:
            return self.net(x) / self.tau
        out = self.net(x) / (1.0 + 0.5 * self.t)
        if self.training:
            self.t += 1
        return out


def annealed(counted: bool, **recorder: Any) -> tuple[nn.Module, Any]:
    """``(model, trajectory)`` of an :class:`Annealed` run (SGD momentum); ``recorder``: the recorder's options."""
    model = Annealed(counted)
    after = None if counted else (lambda s: setattr(model, "tau", 1.5 + 0.5 * s))
    return model, train(model, sgd(model), after=after, **recorder)


def scaled_run(lr: float, build: Callable[[], nn.Module] = mlp, opt: type = torch.optim.SGD) -> tuple[nn.Module, Any]:
    """Plain SGD (or ``opt``) at an untuned learning rate: ``(model, trajectory)``."""
    model = build()
    return model, train(model, opt(model.parameters(), lr=lr))


def default_figures(model: nn.Module, traj: Any) -> dict[str, Any]:
    """What :func:`_stranger_loops_kit.measure` measures, with the default (adaptive) estimators."""
    _, _, X_test = data()
    replica, caught = replica_warnings(model, traj)
    share, more = estimator_warnings(traj)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X_test)
    ref = Reference(traj, X_test, panels=1)
    expected = ref.kept(("train",))
    return {"replica": replica, "share": share, "scores": rel_err(att.values.reshape(expected.shape), expected),
            "reference_residual": float(ref.E.abs().max()) / float(torch.stack(ref.delta).abs().max()),
            "warnings": caught + more}


def replica_warnings(model: nn.Module, traj: Any, **kw: Any) -> tuple[float, list[str]]:
    """The default replica's relative error against ``model`` in evaluation mode and its ExplaindWarnings."""
    _, _, X_test = data()
    with torch.no_grad():
        truth = model.eval()(X_test)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        got = explaind.KernelReplica(device="cpu", **kw).fit(traj).predict(X_test)
    return rel_err(got, truth), [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]


def estimator_warnings(traj: Any) -> tuple[float, list[str]]:
    """The default estimator's residual share and its ExplaindWarnings."""
    _, _, X_test = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X_test)
    return float(att.meta["residual_share"]), [str(w.message) for w in caught
                                               if issubclass(w.category, ExplaindWarning)]
