"""Runs that are not clean MLP loops: attention through SDPA, tuple and ModelOutput-style outputs, dropout and
BatchNorm (the residual share is measured and made loud), fidelity against the user's own model."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from engine_testkit import rel
from torch import Tensor, nn

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError, UnsupportedModelError
from explaind.outputs import model_output

DT = torch.float64


@dataclass
class LMOutput:
    """Stands in for a Hugging Face ModelOutput: an object with a ``logits`` field."""

    logits: Tensor
    hidden: Tensor


class TinyAttention(nn.Module):
    """Embedding, one causal self-attention head through F.scaled_dot_product_attention, a read-out."""

    def __init__(self, vocab: int = 7, d: int = 8, n_out: int = 5, output: str = "tensor"):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, n_out)
        self.output = output

    def forward(self, tokens: Tensor):
        h = self.emb(tokens)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, 0]
        logits = self.head(torch.tanh(a).mean(1))
        if self.output == "tuple":
            return logits, a
        if self.output == "model_output":
            return LMOutput(logits, a)
        return logits


def _train(model: nn.Module, X: Tensor, y: Tensor, steps: int = 5, opt: str = "adamw", batch: int = 6,
           **record: Any):
    model = model.to(DT)
    optimizer = (torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1) if opt == "adamw"
                 else torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9))
    rec = explaind.TrajectoryRecorder(model, optimizer, loss="cross_entropy", train_data=(X, y), **record)
    gen = torch.Generator().manual_seed(0)
    model.train()
    with rec:
        for _ in range(steps):
            idx = torch.randperm(X.shape[0], generator=gen)[:batch]
            optimizer.zero_grad()
            F.cross_entropy(model_output(model(X[idx])), y[idx]).backward()
            rec.log_batch(idx)
            optimizer.step()
    return model, rec.trajectory


def _tokens(n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, (n, 4), generator=gen), torch.randint(0, 5, (n,), generator=gen)


def _eval(model: nn.Module, X: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        return model_output(model(X))


@pytest.mark.parametrize("output", ["tensor", "tuple", "model_output"])
def test_sdpa_attention_and_structured_outputs_are_exact(output):
    torch.manual_seed(0)
    X, y = _tokens(16)
    model, traj = _train(TinyAttention(output=output), X[:12], y[:12])
    X_test = X[12:]
    rep = explaind.KernelReplica(device="cpu").fit(traj)
    assert rel(torch.as_tensor(rep.predict(X_test)), _eval(model, X_test)) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)  # a clean run: no residual warning
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X_test)
    assert att.completeness_error() <= 1e-10
    assert att.meta["residual_share"] <= 1e-9


def test_model_output_picks_the_logits_and_names_a_bad_return():
    t = torch.ones(2, 3)
    assert model_output(t) is t
    assert model_output((t, t + 1)) is t
    assert model_output({"logits": t, "loss": t.sum()}) is t
    assert model_output(LMOutput(t, t + 1)) is t
    with pytest.raises(UnsupportedModelError, match=r"returned str.*'logits' tensor"):
        model_output("not a tensor")


def _dropout_run(**record: Any):
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(24, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (24,), generator=gen)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    model, traj = _train(model, X[:20], y[:20], steps=6, opt="sgd", batch=8, **record)
    return model, traj, X[20:]


def test_dropout_residual_share_is_loud_with_its_cause():
    _, traj, X_test = _dropout_run(capture_random=False)
    with pytest.warns(ExplaindWarning, match=r"residual share .* > residual_tol=1e-07 \(auto: for a float64 run\)"
                                             r".*dropout p=0.3.*"
                                             r"capture_random='auto'.*strict=True"):
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X_test)
    assert att.meta["residual_share"] > 0.1  # dropout masks of the loop are not replayed: a large share
    assert att.completeness_error() <= 1e-10  # complete, but the residual carries part of the change
    with pytest.raises(TrajectoryError, match="residual share"):
        explaind.InfluenceEstimator(keep=("train",), strict=True, device="cpu").fit(traj).transform(X_test)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        share = explaind.InfluenceEstimator(keep=("train",), residual_tol=10.0, device="cpu").fit(traj).transform(
            X_test).meta["residual_share"]
    assert share == att.meta["residual_share"]


def test_residual_share_is_the_ratio_of_absolute_sums():
    _, traj, X_test = _dropout_run(capture_random=False)
    att = explaind.InfluenceEstimator(keep=("step",), residual_tol=10.0, device="cpu").fit(traj).transform(X_test)
    res = att.residual.sum(1).abs()
    change = (att.final - att.initial).abs()
    assert att.residual_share() == pytest.approx(float(res.sum() / change.sum()), rel=1e-12)
    per_input = att.residual_share(per_input=True)
    assert torch.allclose(per_input, res.sum(-1) / change.sum(-1), rtol=1e-12)


def test_fidelity_against_the_users_model_with_batchnorm_statistics():
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(24, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (24,), generator=gen)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    model, traj = _train(model, X[:20], y[:20], steps=4, opt="sgd", batch=8)
    rep = explaind.KernelReplica(device="cpu").fit(traj)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        report = rep.fidelity_report(X[20:], model=model)  # the running statistics are recorded per step
    assert report["model_vs_recorded"] <= 1e-12 and report["model_max_rel_error"] <= 1e-6
    assert model.training  # fidelity_report ran it in eval mode and restored the training mode
    with torch.no_grad():
        model[1].running_mean.add_(1.0)  # changed after recording
    with pytest.warns(ExplaindWarning, match=r"differs from the recorded final state.*changed after recording"):
        report = rep.fidelity_report(X[20:], model=model)
    assert report["model_vs_recorded"] > 1e-3
    assert report["model_max_rel_error"] > 1e-3  # the replica explains the recorded run, not this model


def test_fidelity_against_a_matching_model_is_silent():
    torch.manual_seed(0)
    X, y = _tokens(16)
    model, traj = _train(TinyAttention(), X[:12], y[:12])
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        report = explaind.KernelReplica(device="cpu").fit(traj).fidelity_report(X[12:], model=model)
    assert report["model_vs_recorded"] <= 1e-12
    assert report["model_max_rel_error"] <= 1e-6
    assert model.training  # restored


def test_test_inputs_of_the_wrong_shape_get_a_clear_error():
    from explaind.exceptions import ConfigError

    _, traj, X_test = _dropout_run()  # trained on 4 features
    wrong = torch.cat([X_test, X_test[:, :1]], dim=1)
    with pytest.raises(ConfigError, match=r"the model fails on X of shape \(4, 5\).*shaped like the training"):
        explaind.KernelReplica(device="cpu").fit(traj).predict(wrong)
    with pytest.raises(ConfigError, match=r"the model fails on X of shape \(4, 5\)"):
        explaind.InfluenceEstimator(residual_tol=10.0, device="cpu").fit(traj).transform(wrong)
    with pytest.raises(ConfigError, match="cannot be turned into a tensor"):
        explaind.KernelReplica(device="cpu").fit(traj).predict([[1.0, 2.0], [3.0]])


def test_fidelity_against_a_model_of_another_shape_is_refused():
    from explaind.exceptions import ConfigError

    torch.manual_seed(0)
    X, y = _tokens(16)
    _, traj = _train(TinyAttention(), X[:12], y[:12], steps=2)
    other = TinyAttention(n_out=3).to(DT)
    with pytest.raises(ConfigError, match=r"the model returns \(4, 3\) outputs for X, the replica \(4, 5\)"):
        explaind.KernelReplica(device="cpu").fit(traj).fidelity_report(X[12:], model=other)


def test_a_large_quadrature_error_is_loud_but_not_for_the_tracin_rule():
    _, traj, X_test = _dropout_run()  # ReLU paths: two Gauss-Legendre nodes miss kinks
    with pytest.warns(ExplaindWarning, match=r"quadrature error share .* quadrature='gauss-legendre'"):
        att = explaind.InfluenceEstimator(keep=("step",), split=False, quadrature="gauss-legendre", nodes=1,
                                          device="cpu").fit(traj).transform(X_test)
    assert att.meta["quadrature_share"] > 1e-3 and att.completeness_error() <= 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        left = explaind.InfluenceEstimator(keep=("step",), split=False, quadrature="left",
                                           device="cpu").fit(traj).transform(X_test)
    assert left.meta["quadrature_share"] > 1e-3
