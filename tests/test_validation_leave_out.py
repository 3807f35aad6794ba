"""Leave-out retraining (explaind.validation.leave_out) and its first-order score (explaind.validation.leave_out).

Leave-out retraining takes the removed samples out of their batches (batch statistics and InfoNCE negatives
without them); it is checked against slow loop references (tests/_validation_kit.py), against the recorded run
with every sample kept, and against the weighted retraining: the same where nothing couples a batch, different
where batch norm or InfoNCE does. The influence function on a non-MLP setting is checked against its loop
reference too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _validation_kit import influence_reference, leave_out_reference

import explaind
from explaind.exceptions import ConfigError
from explaind.validation import ValidationConfig, ValidationResult, compute_scores, run_validation
from explaind.validation.__main__ import main
from explaind.validation.benchmark import retrainings
from explaind.validation.leave_out import leave_out_logits, leave_out_train, presence_scores, presence_train
from explaind.validation.settings import make_problem, setting_config

pytestmark = pytest.mark.usefixtures("one_thread")

COUPLED = ("batchnorm", "contrastive")


def _problem(setting):
    return make_problem(setting_config(setting, quick=True, settings_size=True))


def _keep(problem, removed):
    keep = torch.ones(problem.config.n_train, dtype=torch.bool)
    keep[list(removed)] = False
    return keep


def _removed(problem):
    # two samples of the first batch (its statistics and negatives change from step 0 on) and one of the last
    return [int(problem.batches[0][0]), int(problem.batches[0][3]), int(problem.batches[-1][1])]


@pytest.mark.parametrize("setting", ["sgd_mlp", "adamw", "batchnorm", "contrastive"])
def test_leave_out_with_every_sample_kept_is_the_recorded_run(setting):
    problem = _problem(setting)
    model, trajectory = problem.train(record=True)
    retrained = leave_out_train(problem)
    final = trajectory.params(trajectory.n_steps)
    for name, p in retrained.named_parameters():
        assert torch.equal(p.detach(), final[name]), name
    for name, b in retrained.named_buffers():  # batch norm's running statistics
        assert torch.equal(b, dict(model.named_buffers())[name]), name
    assert torch.equal(leave_out_logits(problem), problem.true_logits(model))


@pytest.mark.parametrize("setting", COUPLED)
def test_leave_out_matches_a_loop_reference_and_differs_from_the_weighted_retraining(setting):
    problem = _problem(setting)
    keep = _keep(problem, _removed(problem))
    left_out = leave_out_logits(problem, keep)
    reference = leave_out_reference(problem, keep)
    weighted = problem.retrain_logits(keep.double())
    moved = float((weighted - problem.retrain_logits()).abs().max())  # what removing the three samples does
    assert moved > 1e-3
    assert float((left_out - reference).abs().max()) <= 1e-10 * moved
    # the removed samples still normalise / are negatives in the weighted run, not in the leave-out run
    assert float((left_out - weighted).abs().max()) > 1e-3 * moved
    assert float((reference - problem.retrain_logits(keep.double())).abs().max()) > 1e-3 * moved


@pytest.mark.parametrize("setting, coupled", [("sgd_mlp", False), ("adamw", False), ("batchnorm", True),
                                              ("contrastive", True)])
def test_a_left_out_sample_cannot_matter(setting, coupled):
    # under leave-out a removed sample's input is never read; under the weighted retraining it still is where
    # the batch couples its samples (tests/test_validation_settings.py, test_what_a_zero_weight_removes)
    problem = _problem(setting)
    k = _removed(problem)[0]
    keep = _keep(problem, [k])
    left_out, weighted = leave_out_logits(problem, keep), problem.retrain_logits(keep.double())
    if not coupled:  # the same run up to the order of the sums
        assert float((left_out - weighted).abs().max()) <= 1e-12 * float(weighted.abs().max())
    original = problem.X_train
    problem.X_train = original.clone()
    problem.X_train[k] += 0.5
    try:
        assert torch.equal(leave_out_logits(problem, keep), left_out)
        changed = float((problem.retrain_logits(keep.double()) - weighted).abs().max())
    finally:
        problem.X_train = original
    assert (changed > 1e-6) if coupled else (changed == 0.0)


@pytest.mark.parametrize("setting", COUPLED)
def test_presence_weight_runs_from_the_recorded_run_to_leave_out(setting):
    problem = _problem(setting)
    model, trajectory = problem.train(record=True)
    recorded = problem.true_logits(model)
    moved = float((recorded - problem.true_logits(problem.build_model().eval())).abs().max())
    assert float((presence_train(problem) - recorded).abs().max()) <= 1e-12 * moved
    keep = _keep(problem, _removed(problem))
    reference = leave_out_reference(problem, keep)
    assert float((presence_train(problem, keep.double()) - reference).abs().max()) <= 1e-10 * moved

    scores = torch.as_tensor(presence_scores(problem))
    tau = explaind.CounterfactualEstimator(target=problem.targets(), device="cpu").fit(trajectory).transform(
        problem.X_test).values[..., 0]
    h = 1e-5
    for k in (0, 17, 59):
        up, down = torch.ones(problem.config.n_train, dtype=torch.float64), torch.ones(problem.config.n_train,
                                                                                     dtype=torch.float64)
        up[k], down[k] = 1 + h, 1 - h
        fd = (presence_train(problem, up) - presence_train(problem, down)) / (2 * h)
        assert float(fd.abs().max()) > 1e-4
        assert float((scores[:, k] - fd).abs().max()) <= 1e-6 * float(fd.abs().max())
        # the presence also moves the statistics / negatives: not the counterfactual's derivative
        assert float((scores[:, k] - tau[:, k]).abs().max()) > 1e-3 * float(fd.abs().max())


def test_influence_function_on_the_batch_norm_cnn_matches_the_loop_reference():
    problem = make_problem(setting_config("batchnorm", quick=True, n_train=30, n_test=4, epochs=3))
    model = problem.train()[0]  # evaluation mode: the running statistics, as the explained logit
    scores = compute_scores(problem, None, model, ("influence",))[0]["influence"]
    samples = [0, 7, 29]
    reference = influence_reference(problem, model, tests=range(4), samples=samples)
    assert np.abs(reference).max() > 0
    assert np.abs(scores[:, samples] - reference).max() <= 1e-10 * np.abs(reference).max()


def test_leave_out_errors():
    problem = _problem("batchnorm")
    with pytest.raises(ConfigError, match=r"keep must be a boolean tensor of shape \(60,\).*got dtype torch.float64"):
        leave_out_train(problem, torch.ones(60, dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"presence weight is defined for.*\(batchnorm, contrastive\); got 'adamw'"):
        presence_scores(_problem("adamw"))
    with pytest.raises(ConfigError, match=r"presence must have shape \(60,\)"):
        presence_train(problem, torch.ones(3))
    negative = torch.ones(60)
    negative[4] = -0.5
    with pytest.raises(ConfigError, match=r"must be >= 0 .*got min -0.5"):
        presence_train(problem, negative)
    with pytest.raises(ConfigError, match=r"batches without presence at steps \[0\]"):
        presence_train(problem, _keep(problem, problem.batches[0].tolist()).double())


def test_benchmark_measures_both_retrainings(tmp_path, capsys):
    config = setting_config("adamw", quick=True, leave_out=True, n_subsets=5)
    assert retrainings(config) == 2 * retrainings(setting_config("adamw", quick=True, n_subsets=5))
    # nothing couples AdamW's batches: the two retrainings agree, and so do the tables
    result = run_validation(config, methods=("counterfactual", "random"))
    assert result.checks["leave_out_full_max_abs_diff"] == 0.0
    for method in ("counterfactual", "random"):
        for fraction in (0.5, 0.9, 0.99):
            assert result.lds_leave_out[method][fraction] == pytest.approx(result.lds[method][fraction], abs=1e-12)
    assert result.removal_leave_out["counterfactual"] == pytest.approx(result.removal["counterfactual"], abs=1e-9)

    assert main(["--quick", "--setting", "contrastive", "--leave-out", "--subsets", "5", "--fractions", "0.5",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "against leave-out retraining (the removed samples taken out of their batches)" in printed
    assert "leave-out retrain with every sample kept vs recorded run: max |Δ logit| = 0.0e+00" in printed
    data = json.loads((tmp_path / "validation_contrastive_tanh.json").read_text())
    assert data["config"]["leave_out"] is True and set(data["lds_leave_out"]) == set(data["lds"])
    assert "leave_out_grad" in data["lds"] and set(data["removal_leave_out"]) == set(data["removal"])
    assert data["lds_leave_out"]["counterfactual"] != data["lds"]["counterfactual"]  # InfoNCE couples the pairs
    assert ValidationResult.from_json(tmp_path / "validation_contrastive_tanh.json").to_dict() == data
    assert "leave_out" in ValidationConfig().as_dict() and ValidationConfig().leave_out is False


def test_cli_validate_forwards_leave_out(monkeypatch):
    from explaind import cli
    from explaind.validation import __main__ as validation_main

    seen = []
    monkeypatch.setattr(validation_main, "main", lambda argv: seen.append(list(argv)) or 0)
    assert cli.main(["validate", "--quick", "--setting", "batchnorm", "--leave-out"]) == 0
    assert "--leave-out" in seen[0] and seen[0][:2] == ["--setting", "batchnorm"]
    assert validation_main.build_parser().parse_args(["--leave-out"]).leave_out is True
