"""Validation round 3: batch norm at small batches, a run nobody tuned (``relu_untuned``), the report's leave-out table.

Each run is checked against the recorded run (bit for bit) and against the slow loop references of
tests/_validation_kit.py; the options of ``python -m explaind.validation`` that size these runs are checked to
reach the config, the file names and the HTML report.
"""

from __future__ import annotations

import json

import pytest
import torch
from _validation_kit import leave_out_reference, weighted_mlp_reference

import explaind
from explaind import viz
from explaind.exceptions import ConfigError
from explaind.studies.report_text import validation_section
from explaind.validation import ValidationResult
from explaind.validation.__main__ import main
from explaind.validation.benchmark import retrainings
from explaind.validation.leave_out import leave_out_logits, leave_out_train, presence_scores, presence_train
from explaind.validation.settings import make_problem, setting_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _untuned():
    return make_problem(setting_config("relu_untuned", quick=True))


def _small_batches(batch_size=4):
    return make_problem(setting_config("batchnorm", quick=True, batch_size=batch_size, epochs=2))


def _moved(problem, model):
    """The largest change of an explained test output over training (the scale of the relative checks)."""
    return float((problem.true_logits(model) - problem.true_logits(problem.build_model().eval())).abs().max())


def _check_derivative(scores, run, n_train, h=1e-5):
    """``scores[:, k]`` against the central difference of ``run(weights)`` in weight ``k`` (1e-6 relative)."""
    for k in (0, 17, 59):
        up, down = (torch.ones(n_train, dtype=torch.float64) for _ in range(2))
        up[k], down[k] = 1 + h, 1 - h
        fd = (run(up) - run(down)) / (2 * h)
        assert float(fd.abs().max()) > 1e-4
        assert float((scores[:, k] - fd).abs().max()) <= 1e-6 * float(fd.abs().max())


def _keep(problem, removed):
    keep = torch.ones(problem.config.n_train, dtype=torch.bool)
    keep[list(removed)] = False
    return keep


def test_untuned_setting_is_the_relu_mlp_at_a_large_learning_rate():
    config = setting_config("relu_untuned")
    assert (config.activation, config.lr, config.momentum, config.batch_size) == ("relu", 0.3, 0.9, 25)
    assert (config.n_train, config.n_test, config.epochs) == (300, 30, 8)
    model = _untuned().build_model()
    assert isinstance(model[1], torch.nn.ReLU)
    with pytest.raises(ConfigError, match=r"'relu_untuned' is a ReLU MLP; got activation='tanh'.*activation='relu'"):
        setting_config("relu_untuned", activation="tanh")


def test_untuned_loop_reproduces_the_recorded_run_and_the_loop_reference():
    problem = _untuned()
    model, trajectory = problem.train(record=True)
    retrained = problem.train()[0]
    final = trajectory.params(trajectory.n_steps)
    for name, p in retrained.named_parameters():
        assert torch.equal(p.detach(), final[name]), name
    assert torch.equal(problem.retrain_logits(), problem.true_logits(model))
    moved = _moved(problem, model)
    weights = torch.ones(problem.config.n_train, dtype=torch.float64)
    weights[[0, 5, 33]] = 0.0
    weights[[7, 41]] = 2.0
    weighted = problem.retrain_logits(weights)
    assert float((weighted - problem.true_logits(model)).abs().max()) > 1e-3 * moved
    assert float((weighted - weighted_mlp_reference(problem, weights)).abs().max()) <= 1e-10 * moved


def test_untuned_run_is_exact_counterfactual_and_decomposition():
    problem = _untuned()
    model, trajectory = problem.train(record=True)
    trained = problem.true_logits(model)
    moved = _moved(problem, model)
    att = explaind.InfluenceEstimator(keep=("train",), target=problem.targets(), device="cpu").fit(
        trajectory).transform(problem.X_test)
    assert float((att.total()[:, 0] - trained).abs().max()) <= 1e-10 * moved
    assert float(att.residual.reshape(len(trained), -1).sum(1).abs().max()) <= 1e-10 * moved
    tau = explaind.CounterfactualEstimator(target=problem.targets(), device="cpu").fit(trajectory).transform(
        problem.X_test).values[..., 0]
    _check_derivative(tau, lambda w: weighted_mlp_reference(problem, w), problem.config.n_train)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_small_batch_leave_out_with_every_sample_kept_is_the_recorded_run(batch_size):
    problem = _small_batches(batch_size)
    assert problem.config.n_steps == 2 * 60 // batch_size
    model, trajectory = problem.train(record=True)
    retrained = leave_out_train(problem)
    final = trajectory.params(trajectory.n_steps)
    for name, p in retrained.named_parameters():
        assert torch.equal(p.detach(), final[name]), name
    for name, b in retrained.named_buffers():  # the running statistics
        assert torch.equal(b, dict(model.named_buffers())[name]), name
    recorded = problem.true_logits(model)
    assert torch.equal(leave_out_logits(problem), recorded)
    assert float((presence_train(problem) - recorded).abs().max()) <= 1e-12 * _moved(problem, model)


def test_small_batch_leave_out_matches_the_loop_reference_with_a_whole_batch_left_out():
    problem = _small_batches(4)
    first, last = problem.batches[0].tolist(), problem.batches[-1].tolist()
    # a whole batch, three of four samples of another (its statistics come from one sample), one more
    keep = _keep(problem, first + last[:3] + [int(problem.batches[5][2])])
    left_out = leave_out_logits(problem, keep)
    reference = leave_out_reference(problem, keep)
    weighted = problem.retrain_logits(keep.double())
    moved = float((weighted - problem.retrain_logits()).abs().max())
    assert moved > 1e-3
    assert float((left_out - reference).abs().max()) <= 1e-10 * moved
    assert float((left_out - weighted).abs().max()) > 1e-3 * moved  # the statistics differ from the weighted run


def test_small_batch_presence_scores_are_the_derivative_of_the_presence_loop():
    problem = _small_batches(4)
    scores = torch.as_tensor(presence_scores(problem))
    _check_derivative(scores, lambda p: presence_train(problem, p), problem.config.n_train)


def test_small_batch_run_and_the_report_shows_the_leave_out_table(tmp_path, capsys):
    assert main(["--quick", "--setting", "batchnorm", "--batch-size", "4", "--epochs", "2", "--leave-out",
                 "--subsets", "4", "--fractions", "0.5", "--methods", "counterfactual", "leave_out_grad", "random",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "30 steps of 4" in printed and "leave-out retrain with every sample kept vs recorded run: max |Δ logit| " \
                                         "= 0.0e+00" in printed
    path = tmp_path / "validation_batchnorm_tanh_bs4.json"
    data = json.loads(path.read_text())
    assert data["config"]["batch_size"] == 4 and data["config"]["n_steps"] == 30
    assert set(data["lds"]) == {"counterfactual", "leave_out_grad", "random"} == set(data["lds_leave_out"])
    # a weighted-only result in the same folder: its row has no leave-out cells
    assert main(["--quick", "--setting", "relu_untuned", "--subsets", "4", "--fractions", "0.5", "--methods",
                 "counterfactual", "--out", str(tmp_path)]) == 0
    out = tmp_path / "report"
    out.mkdir()
    section = validation_section(tmp_path, out)
    html = viz.write_report(out, [section]).read_text()
    result = ValidationResult.from_json(path)
    assert "<th>left out: LDS 50%</th>" in html and "<th>LDS 50%</th>" in html
    for method in ("counterfactual", "leave_out_grad", "random"):
        weighted, left_out = result.lds[method][0.5], result.lds_leave_out[method][0.5]
        row = next(r for r in section.table if r["method"] == method and r["activation"].startswith("batchnorm"))
        assert row["LDS 50%"] == f"{weighted[0]:+.3f} ± {weighted[1]:.3f}"
        assert row["left out: LDS 50%"] == f"{left_out[0]:+.3f} ± {left_out[1]:.3f}"
    untuned = next(r for r in section.table if r["activation"].startswith("relu_untuned"))
    assert untuned["left out: LDS 50%"] == "—" and untuned["LDS 50%"] != "—"
    assert "batchnorm (tanh), counterfactual, removed samples left out of their batches: its top-5 lowered" in html


def test_size_options_reach_the_config_and_bad_values_are_refused(capsys):
    assert main(["--quick", "--setting", "relu_untuned", "--activation", "tanh"]) == 2
    assert "'relu_untuned' is a ReLU MLP; got activation='tanh'" in capsys.readouterr().err
    assert main(["--quick", "--setting", "batchnorm", "--batch-size", "0"]) == 2
    assert "batch_size must be a positive integer; got 0" in capsys.readouterr().err
    assert main(["--quick", "--setting", "relu_untuned", "--methods", "leave_out_grad"]) == 2
    err = capsys.readouterr().err
    assert "method(s) ['leave_out_grad'] are not run on the setting 'relu_untuned'" in err and "Allowed there" in err
    config = setting_config("batchnorm", batch_size=8, epochs=3, n_train=40, n_test=6)
    assert (config.n_steps, config.n_test) == (15, 6)
    # the announced cost counts the removal retrainings of the methods compared only
    assert retrainings(config, ("counterfactual", "random")) == 3 * (1 + 3 * 100 + 6 * 1)
    assert retrainings(config) == 3 * (1 + 3 * 100 + 6 * 3)


def test_cli_validate_forwards_the_size_options(monkeypatch):
    from explaind import cli
    from explaind.validation import __main__ as validation_main

    seen = []
    monkeypatch.setattr(validation_main, "main", lambda argv: seen.append(list(argv)) or 0)
    assert cli.main(["validate", "--setting", "relu_untuned", "--batch-size", "4", "--epochs", "3", "--n-train", "50",
                     "--n-test", "7", "--methods", "counterfactual", "random"]) == 0
    argv = seen[0]
    for flag, value in (("--batch-size", "4"), ("--epochs", "3"), ("--n-train", "50"), ("--n-test", "7")):
        assert argv[argv.index(flag) + 1] == value
    assert argv[argv.index("--methods") + 1:argv.index("--methods") + 3] == ["counterfactual", "random"]
    assert "--activation" not in argv  # each setting's own default
    parsed = validation_main.build_parser().parse_args(["--batch-size", "4", "--methods", "random"])
    assert parsed.batch_size == 4 and parsed.methods == ["random"] and parsed.activation is None
