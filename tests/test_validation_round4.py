"""Validation round 4: leave-out retraining with dropout, and the token-model setting ``tiny_lm``.

Each run is checked against the recorded run (bit for bit) and against the slow loop references of
tests/_validation_kit.py.
"""

from __future__ import annotations

import pytest
import torch
from _validation_kit import dropout_leave_out_reference

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
