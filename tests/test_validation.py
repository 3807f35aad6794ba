"""The validation benchmark (explaind.validation): the pipeline end to end at a tiny size, and what holds exactly."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from _png import check_png
from _validation_kit import influence_reference
from scipy.stats import spearmanr

import explaind
from explaind.exceptions import ConfigError
from explaind.validation import (
    METHODS,
    OPTIONAL_METHODS,
    ValidationConfig,
    ValidationProblem,
    ValidationResult,
    bootstrap_mean,
    compute_scores,
    draw_subsets,
    external,
    lds,
    run_validation,
    spearman,
    subset_predictions,
)
from explaind.validation.__main__ import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick():
    problem = ValidationProblem(ValidationConfig.quick())
    model, trajectory = problem.train(record=True)
    return problem, model, trajectory


def test_quick_benchmark_end_to_end(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| method | score time (s) | LDS 50% | LDS 90% | LDS 99% |" in printed
    assert all(f"| {m} |" in printed for m in METHODS + OPTIONAL_METHODS)
    assert "score time per seed: counterfactual" in printed and "ratio" in printed
    data = json.loads((tmp_path / "validation_tanh.json").read_text())
    assert data["config"]["n_train"] == 60 and data["config"]["n_steps"] == 20 and data["config"]["n_subsets"] == 8
    assert data["config"]["seeds"] == 1
    assert data["checks"]["full_retrain_max_abs_diff"] <= 1e-12
    scored = [m for m in METHODS + OPTIONAL_METHODS if m not in data["unavailable"]]
    assert set(data["lds"]) == set(scored) and set(METHODS) <= set(scored)
    for method in scored:
        for fraction in ("0.5", "0.9", "0.99"):
            mean, std = data["lds"][method][fraction]
            per_test = np.asarray(data["lds_per_test"][method][fraction], dtype=float)
            assert per_test.shape == (1, 10) and np.nanmax(np.abs(per_test)) <= 1 + 1e-12
            assert mean == pytest.approx(np.nanmean(per_test), abs=1e-12) and std >= 0
    assert set(data["removal"]) == {"counterfactual", "explaind"}
    assert all(0 <= r["fraction_lowered"] <= 1 for r in data["removal"].values())
    with open(tmp_path / "validation_tanh.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3 * len(scored)
    check_png((tmp_path / "validation_tanh.png").read_bytes())
    assert ValidationResult.from_json(tmp_path / "validation_tanh.json").to_dict() == data


def test_seeds_pool_independent_runs(monkeypatch):
    monkeypatch.setattr(external, "missing", lambda method: "its package")  # the optional methods: not installed
    two = run_validation(ValidationConfig.quick(seeds=2, n_subsets=5), methods=("counterfactual", "random", "trak"))
    second = run_validation(ValidationConfig.quick(seed=1, n_subsets=5), methods=("counterfactual", "random"))
    assert two.unavailable == {"trak": "its package"} and "| trak | not installed (its package;" in two.table()
    for method in ("counterfactual", "random"):
        for fraction in (0.5, 0.9, 0.99):
            rows = np.asarray(two.lds_per_test[method][fraction])
            assert rows.shape == (2, 10)
            assert np.array_equal(rows[1], np.asarray(second.lds_per_test[method][fraction])[0], equal_nan=True)
            assert two.lds[method][fraction][0] == pytest.approx(np.nanmean(rows), abs=1e-12)
    assert two.config["seeds"] == 2 and two.removal["counterfactual"]["fraction_lowered_std"] >= 0


def test_two_level_bootstrap_resamples_seeds_then_test_points():
    one = np.random.default_rng(3).standard_normal(40)
    assert bootstrap_mean(one[None], 300, 5) == bootstrap_mean(one, 300, 5)
    # seeds that disagree completely: the spread is that of the mean of two fair coins, 0.5 / sqrt(2)
    mean, std = bootstrap_mean(np.stack([np.zeros(30), np.ones(30)]), 4000, 0)
    assert mean == 0.5 and std == pytest.approx(0.5 / np.sqrt(2), abs=0.02)
    # within one seed, the spread is the standard error of the test points
    values = np.random.default_rng(4).standard_normal(400)
    assert bootstrap_mean(values, 2000, 1)[1] == pytest.approx(values.std() / 20, rel=0.1)


def test_influence_function_matches_an_explicit_loop_reference():
    problem = ValidationProblem(ValidationConfig.quick(hidden=3, epochs=10))
    model = problem.train()[0]
    scores = compute_scores(problem, None, model, ("influence",))[0]["influence"]
    reference = influence_reference(problem, model)
    assert np.abs(scores - reference).max() <= 1e-10 * np.abs(reference).max()


def test_captum_influence_is_the_same_damped_influence_function():
    # a run whose damped Hessian H + 0.1 I is positive definite (smallest eigenvalue of H: -0.037), where
    # Captum keeps every eigen-direction; with a negative damped eigenvalue it drops that direction
    problem = ValidationProblem(ValidationConfig.quick(hidden=4, epochs=20))
    model = problem.train()[0]
    scores = compute_scores(problem, None, model, ("influence", "captum_influence"))[0]
    ours, captum = scores["influence"], scores["captum_influence"]
    assert np.abs(captum - ours).max() <= 1e-8 * np.abs(ours).max()


def test_retraining_on_the_full_set_is_the_recorded_run(quick):
    problem, model, trajectory = quick
    assert trajectory.n_steps == problem.config.n_steps == len(problem.batches) == 20
    retrained = problem.train()[0]
    for name, p in retrained.named_parameters():
        assert float((p.detach() - trajectory.params(trajectory.n_steps)[name]).abs().max()) <= 1e-12
    assert float((problem.retrain_logits() - problem.true_logits(model)).abs().max()) <= 1e-12


def test_zero_weight_removes_a_sample_from_every_batch(quick):
    problem = quick[0]
    k = int(problem.batches[0][0])
    weights = torch.ones(problem.config.n_train, dtype=torch.float64)
    weights[k] = 0.0
    without = problem.retrain_logits(weights)
    original = problem.X_train  # the recorded trajectory holds it: edit a copy (x + 1 - 1 need not give x back)
    problem.X_train = original.clone()
    problem.X_train[k] += 1.0  # a removed sample's data cannot matter
    try:
        assert float((problem.retrain_logits(weights) - without).abs().max()) == 0.0
    finally:
        problem.X_train = original


def test_counterfactual_is_the_derivative_of_retraining(quick):
    problem, _, trajectory = quick
    est = explaind.CounterfactualEstimator(target=problem.y_test.tolist(), device="cpu")
    tau = est.fit(trajectory).transform(problem.X_test).values[..., 0]
    h = 1e-5
    for k in (0, 17, 59):
        up, down = (torch.ones(problem.config.n_train, dtype=torch.float64) for _ in range(2))
        up[k], down[k] = 1 + h, 1 - h
        fd = (problem.retrain_logits(up) - problem.retrain_logits(down)) / (2 * h)
        assert float((tau[:, k] - fd).abs().max()) <= 1e-6 * float(fd.abs().max())


def test_lds_is_one_for_rank_correlated_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 30))
    assert np.allclose(lds(x, np.exp(3 * x) + 2), 1.0, atol=1e-12)
    assert np.allclose(lds(x, -x), -1.0, atol=1e-12)
    y = rng.standard_normal(30)
    y[:5] = y[5]  # ties take their average rank
    assert spearman(x[0], y) == pytest.approx(spearmanr(x[0], y)[0], abs=1e-12)
    assert np.isnan(spearman(x[0], np.ones(30)))
    with pytest.raises(ConfigError):
        spearman(x, x[:, :1])


def test_removal_and_subset_conventions_give_the_same_lds():
    rng = np.random.default_rng(1)
    scores, actual = rng.standard_normal((3, 40)), rng.standard_normal((3, 12))
    masks = draw_subsets(40, 0.9, 12, rng)
    assert (masks.sum(1) == 36).all()
    kept = subset_predictions(scores, masks)
    removed = -subset_predictions(scores, ~masks)  # predicted change -sum over the removed samples
    assert np.allclose(kept - removed, scores.sum(1, keepdims=True))
    assert np.allclose(lds(kept, actual), lds(removed, actual), atol=1e-12)


def test_bootstrap_and_config_errors():
    mean, std = bootstrap_mean(np.array([0.5, 0.5, np.nan, 0.5]), 50)
    assert mean == 0.5 and std == 0.0
    with pytest.raises(ConfigError, match="activation"):
        ValidationConfig(activation="gelu")
    with pytest.raises(ConfigError, match="fractions"):
        ValidationConfig(fractions=(0.5, 1.0))
    with pytest.raises(ConfigError, match="top_k"):
        ValidationConfig.quick(top_k=61)
    with pytest.raises(ConfigError, match="damping"):
        ValidationConfig(damping=0.0)
    with pytest.raises(ConfigError, match="trak_proj_dim"):
        ValidationConfig(trak_proj_dim=500)
    with pytest.raises(ConfigError, match="seeds"):
        ValidationConfig.quick(seeds=0)
    with pytest.raises(ConfigError, match="unknown method"):
        compute_scores(None, None, None, ("shapley",))


def test_cli_validate_runs_the_benchmark(tmp_path, capsys, monkeypatch):
    import sys

    from explaind.cli import main
    from explaind.validation.problem import ValidationProblem

    # the retrainings of the benchmark itself: from retrain_logits or from the benchmark module (not TRAK's models)
    callers = []
    train = ValidationProblem.train

    def counted(self, *args, **kwargs):
        frame = sys._getframe(1)
        callers.append((frame.f_code.co_name, frame.f_code.co_filename.endswith("benchmark.py"),
                        kwargs.get("record", False)))
        return train(self, *args, **kwargs)

    monkeypatch.setattr(ValidationProblem, "train", counted)
    assert main(["validate", "--quick", "--subsets", "4", "--fractions", "0.5", "--seeds", "2", "--out",
                 str(tmp_path)]) == 0
    captured = capsys.readouterr()
    made = sum(1 for name, in_benchmark, record in callers if not record and (in_benchmark or name == "retrain_logits"))
    assert made == 2 * (1 + 4 + 10 * 2)  # seeds x (full set + subsets + 10 test points x 2 removal methods)
    assert f"validate (tanh): 2 seed(s), {made:,} retrainings of 20 steps (a smoke test" in captured.err
    out = captured.out
    assert "## tanh" in out and "counterfactual" in out and "2 seed(s) from 0" in out
    data = json.loads((tmp_path / "validation_tanh.json").read_text())
    assert data["config"]["seeds"] == 2 and data["config"]["fractions"] == [0.5]
    assert np.asarray(data["lds_per_test"]["counterfactual"]["0.5"]).shape == (2, 10)
