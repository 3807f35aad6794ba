"""The validation settings beyond the SGD MLP (explaind.validation.settings): what retraining means and what holds.

AdamW with a cosine schedule, dropout with replayed masks, a train-mode BatchNorm CNN and InfoNCE on two
augmented views. Each retraining is the settings module's plain torch loop (float64, no explaind code):
with all weights 1 it must be the recorded run, and the counterfactual must be its derivative.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import explaind
from explaind.exceptions import ConfigError
from explaind.studies.report_text import validation_section
from explaind.validation import ValidationConfig, compute_scores, run_validation
from explaind.validation.__main__ import main
from explaind.validation.methods import flat_sample_grads
from explaind.validation.settings import (
    CLASSIFICATION_METHODS,
    info_nce_terms,
    make_problem,
    setting_config,
    setting_methods,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ("adamw", "dropout", "batchnorm", "contrastive")


@pytest.fixture(scope="module", params=SETTINGS)
def recorded(request):
    problem = make_problem(setting_config(request.param, quick=True))
    model, trajectory = problem.train(record=True)
    return problem, model, trajectory


def _weights(problem, changes):
    w = torch.ones(problem.config.n_train, dtype=torch.float64)
    for k, value in changes.items():
        w[k] = value
    return w


def test_retraining_with_all_weights_one_is_the_recorded_run(recorded):
    problem, model, trajectory = recorded
    assert trajectory.n_steps == problem.config.n_steps == len(problem.batches) == 20
    retrained = problem.train()[0]
    final = trajectory.params(trajectory.n_steps)
    for name, p in retrained.named_parameters():
        assert torch.equal(p.detach(), final[name]), name
    for name, b in retrained.named_buffers():  # batch norm's running statistics: the recorded run's, too
        assert torch.equal(b, dict(model.named_buffers())[name]), name
    assert torch.equal(problem.retrain_logits(), problem.true_logits(model))


def test_counterfactual_is_the_derivative_of_the_settings_retraining(recorded):
    # central differences of the plain loop, h = 1e-5; their truncation and rounding floor is far below the 1e-6
    # held here (1.5e-9 to 1.8e-8 at the benchmark's size, benchmarks/bench_validation_linearity.py)
    problem, _, trajectory = recorded
    est = explaind.CounterfactualEstimator(target=problem.targets(), device="cpu")
    tau = est.fit(trajectory).transform(problem.X_test).values[..., 0]
    assert est.replay_residual_ <= 1e-12
    h = 1e-5
    for k in (0, 17, 59):
        fd = (problem.retrain_logits(_weights(problem, {k: 1 + h}))
              - problem.retrain_logits(_weights(problem, {k: 1 - h}))) / (2 * h)
        assert float(fd.abs().max()) > 1e-4  # the sample moves the explained outputs: the check has teeth
        assert float((tau[:, k] - fd).abs().max()) <= 1e-6 * float(fd.abs().max())


def test_decomposition_is_complete_on_every_setting(recorded):
    problem, model, trajectory = recorded
    att = explaind.InfluenceEstimator(keep=("train",), target=problem.targets(), device="cpu").fit(
        trajectory).transform(problem.X_test)
    trained = problem.true_logits(model)
    moved = float((trained - att.initial[:, 0]).abs().max())
    assert float((att.total()[:, 0] - trained).abs().max()) <= 1e-10 * moved
    assert float(att.residual.abs().sum()) <= 1e-10 * moved


@pytest.mark.parametrize("setting, matters", [("adamw", False), ("dropout", False), ("batchnorm", True),
                                              ("contrastive", True)])
def test_what_a_zero_weight_removes(setting, matters):
    # dropout masks are per sample, so weight 0 removes the sample; a batch-norm batch still normalises with it
    # and InfoNCE still uses it as a negative, so its input still matters there (docs/scores_meaning.md)
    problem = make_problem(setting_config(setting, quick=True))
    k = int(problem.batches[0][0])
    weights = _weights(problem, {k: 0.0})
    without = problem.retrain_logits(weights)
    original = problem.X_train
    problem.X_train = original.clone()
    problem.X_train[k] += 0.5
    try:
        changed = float((problem.retrain_logits(weights) - without).abs().max())
    finally:
        problem.X_train = original
    assert (changed > 1e-6) if matters else (changed == 0.0)


def test_dropout_masks_matter_and_retraining_draws_the_recorded_ones():
    problem = make_problem(setting_config("dropout", quick=True))
    model = problem.train(record=True)[0]
    assert torch.equal(problem.retrain_logits(), problem.true_logits(model))  # the recorded masks
    problem.mask_seed += 1  # other masks, the same initialisation and batches
    assert float((problem.retrain_logits() - problem.true_logits(model)).abs().max()) > 1e-3


def test_final_gradients_match_a_vmap_reference():
    for setting in ("adamw", "batchnorm"):
        problem = make_problem(setting_config(setting, quick=True))
        model = problem.train()[0]
        g_test, g_train = problem.final_grads(model)
        ref_test, ref_train = flat_sample_grads(model, problem)
        assert torch.allclose(g_test, ref_test, rtol=0, atol=1e-12)
        assert torch.allclose(g_train, ref_train, rtol=0, atol=1e-12)


def test_contrastive_grad_dot_uses_each_terms_last_batch():
    problem = make_problem(setting_config("contrastive", quick=True))
    model = problem.train()[0]
    g_test, g_train = problem.final_grads(model)
    idx = problem.batches[-1]
    params = list(model.parameters())
    k = 2
    term = info_nce_terms(model(problem.X_train[idx]), problem.y_train[idx], problem.config.temperature)[k]
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(term, params)])
    assert torch.allclose(g_train[int(idx[k])], ref, rtol=0, atol=1e-12)
    sim = model(problem.X_test[:1])[0, problem.targets()[0]]
    ref_test = torch.cat([g.reshape(-1) for g in torch.autograd.grad(sim, params)])
    assert torch.allclose(g_test[0], ref_test, rtol=0, atol=1e-12)
    scores = compute_scores(problem, None, model, ("grad_dot",))[0]["grad_dot"]
    assert np.allclose(scores, -(g_test @ g_train.T).numpy(), rtol=0, atol=1e-12)


def test_every_setting_end_to_end(tmp_path, capsys):
    assert main(["--quick", "--setting", *SETTINGS, "--subsets", "5", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for setting in SETTINGS:
        assert f"## {setting} (tanh): digits 60 train / 10 test" in printed
        data = json.loads((tmp_path / f"validation_{setting}_tanh.json").read_text())
        scored = set(setting_methods(setting)) - set(data["unavailable"])
        assert data["config"]["setting"] == setting and set(data["lds"]) == scored
        assert ("influence" in scored) == (setting != "contrastive")  # a per-sample cross-entropy loss only
        assert data["checks"]["full_retrain_max_abs_diff"] == 0.0
        coupled = setting in ("batchnorm", "contrastive")  # leave_out_grad: where a batch couples its samples
        assert set(data["removal"]) == {"counterfactual", "explaind"} | ({"leave_out_grad"} if coupled else set())
        assert (tmp_path / f"validation_{setting}_tanh.png").stat().st_size > 0
    assert "AdamW lr 0.01 weight decay 0.05, cosine schedule" in printed and "BatchNorm2d (train mode)" in printed
    out = tmp_path / "report"
    out.mkdir()
    section = validation_section(tmp_path, out)  # the HTML report's section names each setting's run
    assert {row["activation"] for row in section.table} == {f"{s} (tanh)" for s in SETTINGS}
    assert any(c.startswith("LDS of each method, contrastive (tanh): digits 60 train / 10 test, pair encoder")
               for c in section.captions)


def test_setting_errors():
    with pytest.raises(ConfigError, match="'setting'.*Allowed: 'sgd_mlp', 'adamw'"):
        ValidationConfig(setting="lstm")
    with pytest.raises(ConfigError, match="dropout=1.0"):
        ValidationConfig(setting="dropout", dropout=1.0)
    with pytest.raises(ConfigError, match=r"\['influence'\] are not run on the setting 'contrastive'.*InfoNCE"):
        run_validation(setting_config("contrastive", quick=True), methods=("counterfactual", "influence"))
    assert setting_config("sgd_mlp") == ValidationConfig()
    assert setting_config("adamw").n_train == 300 and setting_config("adamw", quick=True).n_train == 60


def test_settings_size_runs_the_sgd_mlp_as_their_baseline(tmp_path, capsys):
    from explaind.cli import main as cli_main

    assert cli_main(["validate", "--quick", "--setting", "sgd_mlp", "--settings-size", "--subsets", "4",
                     "--fractions", "0.5", "--out", str(tmp_path)]) == 0
    assert "## sgd_mlp (tanh): digits 60 train / 10 test, MLP 64-16-10 (tanh), SGD lr 0.05" in capsys.readouterr().out
    data = json.loads((tmp_path / "validation_sgd_mlp_tanh.json").read_text())
    scored = set(CLASSIFICATION_METHODS) - set(data["unavailable"])
    assert set(data["lds"]) == scored and data["checks"]["full_retrain_max_abs_diff"] == 0.0
    assert setting_config("sgd_mlp", settings_size=True) == ValidationConfig(n_train=300, n_test=30, epochs=8,
                                                                             n_subsets=100, top_k=15, seeds=3)
