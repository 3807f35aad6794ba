"""Parametrized, tied and shared weights, another memory format and non-tensor outputs.

Each run is checked end to end against the trained model and the slow loop reference (tests/hard_models_kit.py).
Weight norm runs as plain operations (its fused kernel has no forward-mode derivative); spectral norm's power
iteration updates buffers that the same forward reads, so its training forwards are replayed from the recorded
buffers, micro-batch after micro-batch.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from hard_models_kit import QUAD, assert_exact, data, measure, seeded, train
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import explaind
from explaind.exceptions import ExplaindWarning, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")

X, Y = data(14, (4,), 3)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def run_exact(build, opt="sgd", *, X=X, Y=Y, buffers=False, **kw) -> None:
    model = seeded(build)
    traj, copies = train(model, opt, X[:12], Y[:12], **kw)
    assert_exact(measure(model, traj, copies, X[12:], buffers=buffers, logits=kw.get("logits", lambda o: o)))


def weight_norms() -> nn.Module:
    model = mlp()
    weight_norm(model[0])  # norm per output row (dim=0)
    weight_norm(model[2], dim=None)  # one norm over the whole matrix
    return model


def old_weight_norm() -> nn.Module:
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based API is deprecated, still in use
        nn.utils.weight_norm(model[0])
    return model


@pytest.mark.parametrize(("build", "opt"), [(weight_norms, "sgd"), (weight_norms, "adam"), (old_weight_norm, "sgd")],
                         ids=["parametrizations-sgd", "parametrizations-adam", "hook-sgd"])
def test_weight_norm_is_exact(build, opt):
    run_exact(build, opt)


def spectral() -> nn.Module:
    model = mlp()
    spectral_norm(model[0])
    spectral_norm(model[2])
    return model


def test_spectral_norm_power_iteration_is_replayed_exactly():
    model = seeded(spectral)
    traj, copies = train(model, "sgd", X[:12], Y[:12])
    assert traj.manifest.coupled == ["0.parametrizations.weight.0", "2.parametrizations.weight.0"]
    assert float(np.nanmax(traj.gradient_check())) <= 1e-12  # recomputed from the buffers the step started from
    got = measure(model, traj, copies, X[12:], buffers=True)
    assert_exact(got)


def test_spectral_norm_with_accumulation_carries_the_buffers_through_micro_batches():
    """Two micro-batches per step: the second forward starts from the first one's power iteration."""
    model = seeded(spectral)
    traj, _ = train(model, "adam", X[:12], Y[:12], micro=2, check_gradients=True)
    assert np.isfinite(traj.gradient_check()).all() and float(np.nanmax(traj.gradient_check())) <= 1e-12
    X_test = X[12:]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu", **QUAD).fit(traj).transform(X_test)
    assert att.meta["residual_share"] <= 1e-9  # the per-sample gradients add up to the loop's, step by step
    model.eval()
    with torch.no_grad():
        trained = model(X_test)
    assert float((att.total() - trained).abs().max() / trained.abs().max()) <= 1e-6
    # the counterfactual differentiates the power iteration (tests/test_counterfactual_stochastic.py checks it
    # against finite differences); its final value is the trained model in evaluation mode, buffers included
    cf = explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(X_test)
    assert float((cf.final - trained).abs().max() / trained.abs().max()) <= 1e-12


def test_spectral_norm_from_a_sparse_store_is_replayed_exactly(tmp_path):
    """Two micro-batches per step, theta stored every 2nd step: the replayed optimizer steps start from beta_s too."""
    model = seeded(spectral)
    train(model, "adam", X[:12], Y[:12], steps=4, micro=2, store=tmp_path / "run", checkpoint_every=2)
    disk = explaind.Trajectory.load(tmp_path / "run", model=seeded(spectral).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)  # a replay that missed the next checkpoint would warn
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu", **QUAD).fit(disk).transform(X[12:])
    assert att.meta["residual_share"] <= 1e-9
    model.eval()
    with torch.no_grad():
        trained = model(X[12:])
    assert float((att.total() - trained).abs().max() / trained.abs().max()) <= 1e-6


class Symmetric(nn.Module):
    def forward(self, W: Tensor) -> Tensor:
        return W.triu() + W.triu(1).transpose(-1, -2)


class Positive(nn.Module):
    def forward(self, b: Tensor) -> Tensor:
        return torch.exp(b)


def custom_parametrizations() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    parametrize.register_parametrization(model[2], "bias", Positive())
    return model


def test_custom_parametrization_is_exact():
    run_exact(custom_parametrizations)


class Tied(nn.Module):
    """Token ids ``(n, 3)`` -> mean embedding -> ReLU layer -> logits through the embedding matrix (tied)."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.act = nn.Embedding(7, 4), nn.Linear(4, 4), nn.ReLU()
        self.out = nn.Linear(4, 7)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.act(self.mid(self.emb(ids).mean(1))))


def test_tied_embedding_and_output_projection_is_exact():
    Xi, Yi = data(14, (3,), 4, classes=7, vocab=7)
    run_exact(Tied, X=Xi, Y=Yi)
    assert [n for n, _ in Tied().named_parameters()] == ["emb.weight", "mid.weight", "mid.bias", "out.bias"]


class Shared(nn.Module):
    """One weight in two layers, and one block applied twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.r1, self.r2 = nn.ReLU(), nn.ReLU()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.block(self.block(self.r2(self.b(self.r1(self.a(x)))))))


def test_shared_parameter_and_module_used_twice_are_exact():
    run_exact(Shared, "adam")


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.r, self.h = nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Linear(27, 3)

    def forward(self, x):
        return self.h(self.r(self.c(x)).flatten(1))


XC, YC = data(14, (2, 5, 5), 6)


def test_channels_last_model_and_inputs_are_exact():
    Xcl = XC.contiguous(memory_format=torch.channels_last)
    run_exact(lambda: Conv().to(memory_format=torch.channels_last), X=Xcl, Y=YC)


@dataclasses.dataclass
class Output:
    logits: Tensor
    hidden: Tensor


class Returns(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.r, self.b = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)

    def forward(self, x):
        h = self.r(self.a(x))
        out = self.b(h)
        return {"dict": {"logits": out, "hidden": h}, "tuple": (out, h), "dataclass": Output(out, h),
                "unnamed": {"scores": out}}[self.kind]


@pytest.mark.parametrize(("kind", "logits"), [("dict", lambda o: o["logits"]), ("tuple", lambda o: o[0]),
                                              ("dataclass", lambda o: o.logits)], ids=["dict", "tuple", "dataclass"])
def test_dict_tuple_and_dataclass_outputs_are_exact(kind, logits):
    run_exact(lambda: Returns(kind), logits=logits)


def test_a_mapping_without_logits_is_refused_by_name():
    model = seeded(lambda: Returns("unnamed"))
    with pytest.raises(UnsupportedModelError, match=r"returned dict, which holds no output tensor.*'logits'"):
        train(model, "sgd", X[:12], Y[:12], logits=lambda o: o["scores"])
