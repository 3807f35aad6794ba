"""Test inputs of the wrong shape or type, and unbounded budgets: one explaind error each, never a raw one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import explaind
from explaind.exceptions import ConfigError


@pytest.fixture(scope="module")
def trajectory():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    model = explaind.build_model("mlp", {"in_features": 4, "hidden_sizes": [5], "out_features": 3})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for idx in (torch.arange(6), torch.arange(6, 12)):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory


def _apply(name, trajectory, X):
    if name == "replica":
        return explaind.KernelReplica().fit(trajectory).predict(X)
    if name == "influence":
        return explaind.InfluenceEstimator(keep=("train",)).fit(trajectory).transform(X)
    return explaind.CounterfactualEstimator().fit(trajectory).transform(X)


@pytest.mark.parametrize("name", ["replica", "influence", "counterfactual"])
@pytest.mark.parametrize("X, fragment", [
    (torch.randn(3, 5), "the model fails on X of shape (3, 5)"),
    (torch.randn(4), "the model fails on X of shape (4,)"),
    (torch.randint(0, 3, (3, 4)), "dtype torch.int64"),
    (torch.randn(0, 4), "at least one input"),
    ([[1.0, "a"]], "cannot be turned into a tensor"),
])
def test_wrong_test_inputs_are_config_errors(trajectory, name, X, fragment):
    with pytest.raises(ConfigError) as err:
        _apply(name, trajectory, X)
    assert fragment in str(err.value)


@pytest.mark.parametrize("budget", [float("inf"), float("-inf"), float("nan"), "inf", "1e400GB", 0])
def test_unbounded_or_empty_memory_budgets_are_config_errors(trajectory, budget):
    with pytest.raises(ConfigError, match="invalid value for 'memory_budget'"):
        explaind.InfluenceEstimator(keep=("train",), memory_budget=budget).fit(trajectory)
