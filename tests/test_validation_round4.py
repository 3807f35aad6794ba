"""Validation round 4: leave-out retraining with dropout, and the token-model setting ``tiny_lm``.

Each run is checked against the recorded run (bit for bit) and against the slow loop references of
tests/_validation_kit.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _validation_kit import dropout_leave_out_reference, lm_influence_reference, weighted_lm_reference

import explaind
from explaind.exceptions import ConfigError
from explaind.validation import ValidationResult, compute_scores
from explaind.validation.__main__ import main
from explaind.validation.benchmark import run_validation
from explaind.validation.leave_out import leave_out_logits, leave_out_train
from explaind.validation.settings import make_problem, setting_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _keep(problem, removed):
    keep = torch.ones(problem.config.n_train, dtype=torch.bool)
    keep[list(removed)] = False
    return keep


def _dropout():
    return make_problem(setting_config("dropout", quick=True))


def test_dropout_leave_out_with_every_sample_kept_is_the_recorded_run_bit_for_bit():
    problem = _dropout()
    model = problem.train(record=True)[0]
    assert torch.equal(leave_out_logits(problem), problem.true_logits(model))


def test_dropout_leave_out_matches_the_loop_reference_and_the_weighted_retraining():
    problem = _dropout()
    first = problem.batches[0].tolist()
    # a whole first batch left out (its masks are still drawn) and samples scattered over the run
    keep = _keep(problem, first + [3, 17, 41, 59])
    reference = dropout_leave_out_reference(problem, keep)
    left_out = leave_out_logits(problem, keep)
    moved = float((left_out - problem.retrain_logits()).abs().max())
    assert moved > 1e-2  # the removal changes the outputs
    assert float((left_out - reference).abs().max()) <= 1e-10 * moved
    # dropout acts on each row alone: leaving a sample out is weighting it 0
    assert float((left_out - problem.retrain_logits(keep.double())).abs().max()) <= 1e-12 * moved


def test_dropout_leave_out_needs_the_recorded_batch_masks():
    """Drawing masks for the kept rows only (a forward on them alone) is another run, not a leave-out."""
    problem = _dropout()
    keep = _keep(problem, [3, 17, 41])
    naive = problem.build_model()
    opt = problem.optimizer(naive)[0]
    torch.manual_seed(problem.mask_seed)
    for idx in problem.batches:
        kept = idx[keep[idx]]
        opt.zero_grad()
        (problem.terms(naive(problem.X_train[kept]), problem.y_train[kept]).sum() / len(idx)).backward()
        opt.step()
    gap = float((problem.true_logits(naive.eval()) - leave_out_logits(problem, keep)).abs().max())
    assert gap > 1e-3


def test_dropout_leave_out_never_reads_a_removed_input():
    problem = _dropout()
    keep = _keep(problem, [3, 17, 41])
    expected = leave_out_logits(problem, keep)
    problem.X_train = problem.X_train.clone()
    problem.X_train[[3, 17, 41]] = float("nan")
    assert torch.equal(leave_out_logits(problem, keep), expected)
    model = leave_out_train(problem, keep)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_dropout_validation_runs_with_leave_out():
    config = setting_config("dropout", quick=True, leave_out=True, n_subsets=3, top_k=2)
    result = run_validation(config, methods=("counterfactual", "explaind", "random"))
    assert result.checks["leave_out_full_max_abs_diff"] == 0.0
    assert set(result.lds_leave_out) == {"counterfactual", "explaind", "random"}


def _lm():
    return make_problem(setting_config("tiny_lm", quick=True, n_train=30, n_test=4, epochs=2))


def _moved(problem, model):
    """The largest change of an explained test output over training (the scale of the relative checks)."""
    return float((problem.true_logits(model) - problem.true_logits(problem.build_model())).abs().max())


def test_token_model_loop_is_the_recorded_run_and_matches_the_loop_reference():
    problem = _lm()
    model, trajectory = problem.train(record=True)
    assert torch.equal(problem.retrain_logits(), problem.true_logits(model))  # bit for bit
    assert trajectory.n_steps == len(problem.batches) == 6
    moved = _moved(problem, model)
    weights = torch.ones(problem.config.n_train, dtype=torch.float64)
    weights[[0, 5, 21]] = 0.0
    weights[[7, 11]] = 2.0
    weighted = problem.retrain_logits(weights)
    assert float((weighted - problem.true_logits(model)).abs().max()) > 1e-3 * moved
    assert float((weighted - weighted_lm_reference(problem, weights)).abs().max()) <= 1e-10 * moved
    # nothing couples the sequences of a batch: leaving them out is weighting them 0
    keep = weights != 0
    assert float((leave_out_logits(problem, keep) - problem.retrain_logits(keep.double())).abs().max()) <= 1e-12 * moved


def test_token_model_decomposition_sums_to_the_trained_prediction():
    problem = _lm()
    model, trajectory = problem.train(record=True)
    trained = problem.true_logits(model)
    moved = _moved(problem, model)
    att = explaind.InfluenceEstimator(keep=("train",), target=problem.targets(), device="cpu").fit(
        trajectory).transform(problem.X_test)
    parts = [att.values.sum(1)[:, 0], att.initial.reshape(4, -1)[:, 0]]
    parts += [t.reshape(4, -1).sum(1) for t in (att.regularization, att.residual, att.quadrature_error)
              if t is not None]
    assert float((torch.stack(parts).sum(0) - trained).abs().max()) <= 1e-10 * moved
    assert float(att.residual.reshape(4, -1).sum(1).abs().max()) <= 1e-10 * moved
    assert float(att.values.abs().max()) > 1e-3 * moved


def test_token_model_counterfactual_is_the_derivative_of_the_retraining():
    problem = _lm()
    trajectory = problem.train(record=True)[1]
    tau = explaind.CounterfactualEstimator(target=problem.targets(), device="cpu").fit(trajectory).transform(
        problem.X_test).values[..., 0]
    h = 1e-5
    for k in (0, 17, 29):
        up, down = (torch.ones(problem.config.n_train, dtype=torch.float64) for _ in range(2))
        up[k], down[k] = 1 + h, 1 - h
        # the harness's loop, which matches the loop reference to 1e-10 (the test above)
        fd = (problem.retrain_logits(up) - problem.retrain_logits(down)) / (2 * h)
        assert float(fd.abs().max()) > 1e-4
        assert float((tau[:, k] - fd).abs().max()) <= 1e-6 * float(fd.abs().max())


def test_token_model_validation_runs_from_the_command_line(tmp_path, capsys):
    code = main(["--setting", "tiny_lm", "--quick", "--subsets", "3", "--top-k", "2", "--n-train", "30",
                 "--n-test", "3", "--epochs", "2", "--methods", "counterfactual", "grad_dot", "influence", "random",
                 "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "## tiny_lm (tanh): sequences 30 train / 3 test, causal transformer" in out
    assert "max |Δ logit| = 0.0e+00" in out
    result = ValidationResult.from_json(tmp_path / "validation_tiny_lm_tanh.json")
    assert set(result.lds) == {"counterfactual", "grad_dot", "influence", "random"}


def test_token_model_refuses_the_classifier_only_methods():
    config = setting_config("tiny_lm", quick=True)
    with pytest.raises(ConfigError, match=r"\['trak'\] are not run on the setting 'tiny_lm' \(Captum's and "
                       r"TRAK's output .*Allowed there: counterfactual, explaind"):
        run_validation(config, methods=("counterfactual", "trak"))


def test_token_model_influence_function_matches_the_loop_reference():
    problem = _lm()
    model = problem.train()[0]
    scores = compute_scores(problem, None, model, ("influence",))[0]["influence"]
    samples = [0, 7, 29]
    reference = lm_influence_reference(problem, model, tests=range(4), samples=samples)
    assert np.abs(reference).max() > 0
    assert np.abs(scores[:, samples] - reference).max() <= 1e-10 * np.abs(reference).max()
