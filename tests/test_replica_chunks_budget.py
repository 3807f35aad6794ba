"""``memory_budget`` of the replica: the bytes of the adaptive rule's chunks and of one evaluation's outputs.

The rule refines (step, input) pairs in chunks within half of it and each evaluation holds outputs within an eighth
of it (``explaind.kernel.evaluate.budgets``; docs/engine.md §3, *Chunking*). The tests count the pairs of every call
of the rule and the rows of every evaluation, hold the replica to the default budget's (rounding level) and to the
trained model, and refuse budgets that are not positive sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import rel_err
from test_replica_output_chunks import QUAD, STEPS, UNIT_COPIES, relu_mlp, spy_evaluated_rows, spy_pairs

import explaind
from explaind.kernel import adaptive_chunks, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

PER_PAIR = UNIT_COPIES * 8 * 3  # bytes the rule takes per (step, input) pair of three float64 outputs
PER_ROW = 16 * 8 * 3  # bytes one evaluated row of three float64 outputs takes (evaluate.ROW_OUTPUT_COPIES)


@pytest.fixture(scope="module")
def mlp():
    """A ReLU MLP whose paths cross a few kinks each, its trajectory and eight test inputs."""
    return relu_mlp(32, 0.05)


def test_the_default_budget_is_the_modules_bounds():
    assert evaluate.budgets(None) == (None, None)
    assert evaluate.budgets(2**31) == (adaptive_chunks.RULE_BYTES, evaluate.OUTPUT_BYTES)  # "2GiB"
    assert evaluate.budgets(7) == (3, 1)


@pytest.mark.parametrize(("budget", "calls", "rows_bound"), [
    (3 * PER_ROW * 8, [1] * 8 * STEPS, 3),  # below one pair: one a call; three rows an evaluation
    (2 * 8 * PER_PAIR, [8] * STEPS, 2 * 8 * PER_PAIR // 8 // PER_ROW),  # one step's eight inputs a call
])
def test_memory_budget_sets_the_pairs_of_each_chunk_and_the_rows_of_each_evaluation(mlp, monkeypatch, budget, calls,
                                                                                   rows_bound):
    model, traj, X = mlp
    seen, rows = spy_pairs(monkeypatch), spy_evaluated_rows(monkeypatch)
    default = torch.as_tensor(explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X))
    assert seen == [8 * STEPS] and max(rows) > 3, (seen, max(rows))  # one chunk, longer evaluations
    seen.clear(), rows.clear()
    replica = explaind.KernelReplica(device="cpu", memory_budget=budget, **QUAD).fit(traj)
    assert replica.get_params()["memory_budget"] == budget  # stored as given
    got = torch.as_tensor(replica.predict(X))
    assert seen == calls
    assert max(rows) <= rows_bound, max(rows)  # an eighth of the budget
    assert rel_err(got, default) <= 1e-13
    with torch.no_grad():
        truth = model(X)
    assert rel_err(got, truth) <= 1e-6 and rel_err(default, truth) <= 1e-6


def test_a_budget_given_as_a_size_is_parsed(mlp):
    _, traj, _ = mlp
    replica = explaind.KernelReplica(device="cpu", memory_budget="1GiB").fit(traj)
    assert replica.memory_budget == "1GiB"
    assert replica.engine_.rule_bytes == 2**29
    influence = explaind.InfluenceEstimator(device="cpu", memory_budget="64MB").fit(traj)
    assert influence.engine_.rule_bytes == 32 * 10**6


@pytest.mark.parametrize("bad", [0, -1, "lots", True, math.nan, "2 parsecs"])
def test_a_budget_that_is_not_a_positive_size_is_refused_in_fit(mlp, bad):
    _, traj, _ = mlp
    replica = explaind.KernelReplica(memory_budget=bad)
    assert replica.memory_budget is bad  # stored verbatim, checked in fit
    with pytest.raises(explaind.exceptions.ConfigError, match=r"memory_budget.*(positive|bytes|'2GB')"):
        replica.fit(traj)
