"""The estimator conformance suite (explaind.testing.estimators) on the engine's estimators."""

from __future__ import annotations

import copy

import pytest
from engine_fixtures import recorded_run

import explaind
from explaind.testing import check_estimator, parametrize_with_checks

ESTIMATORS = [
    explaind.KernelReplica(quadrature="gauss-legendre", nodes=4, device="cpu"),
    explaind.KernelReplica(device="cpu", steps=(1, 5)),
    explaind.InfluenceEstimator(keep=("train",), quadrature="gauss-legendre", nodes=4, device="cpu"),
    explaind.InfluenceEstimator(keep=("step", "group"), target=[0, 1, 2, 0, 1, 2], quadrature="midpoint", nodes=3,
                                device="cpu"),
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run():
    return recorded_run("tanh", "sgd_nesterov_wd")


@parametrize_with_checks(ESTIMATORS)
def test_engine_estimators_conform(estimator, check, run):
    check(estimator, run.trajectory, run.X_test)


@pytest.fixture(scope="module")
def trained(run):
    """The trained model (last state of the run), as pruning strategies take it."""
    model = copy.deepcopy(run.trajectory.model)
    model.load_state_dict({**model.state_dict(), **run.trajectory.params(run.trajectory.n_steps)})
    return model


@pytest.mark.parametrize("name", ["magnitude", "random", "snip", "grasp", "synflow", "explaind"])
def test_pruning_strategies_conform(name, run, trained):
    cls = explaind.get_entry("pruning_strategy", name).implementation
    kw = {"random_state": 0, **({"device": "cpu"} if name == "explaind" else {})}
    check_estimator(cls(**kw), (trained, (run.X_train, run.y_train), run.trajectory), run.X_test)


def test_loss_target_conforms(run):
    est = explaind.InfluenceEstimator(keep=("param",), target="loss", quadrature="gauss-legendre", nodes=2,
                                      device="cpu")
    check_estimator(est, run.trajectory, run.X_test, run.y_test)
