"""Named ExPLAIND scores, on hand-built Attributions with known values and on a recorded run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from engine_testkit import engine_run

from explaind.exceptions import ConfigError
from explaind.kernel.attribution import Attribution
from explaind.kernel.layout import ParamLayout
from explaind.scores import (
    data_influence,
    group_influence,
    kernel_regularization_balance,
    parameter_influence,
    score_similarity,
    step_influence,
)

LAYOUT = ParamLayout(("w", "b"), ((2, 2), (1,)))  # D = 5


def _att(axes: tuple[str, ...], values: torch.Tensor, reg: torch.Tensor | None = None) -> Attribution:
    side = tuple(a for a in axes if a != "train")
    side_shape = [values.shape[axes.index(a)] for a in side]
    T, O = values.shape[0], values.shape[-1]
    coords = {"test": np.arange(T), "output": np.arange(O)}
    sizes = dict(zip(axes, values.shape))
    if "step" in axes:
        coords["step"] = np.arange(10, 10 + sizes["step"])
    if "param" in axes:
        coords["param"] = np.arange(5)
    if "group" in axes:
        coords["group"] = ["w", "b"]
    if "train" in axes:
        coords["train"] = np.arange(sizes["train"])
    q_shape = [T] + ([sizes["step"]] if "step" in axes else []) + [O]
    return Attribution(axes=axes, values=values, initial=torch.zeros(T, O), final=torch.zeros(T, O),
                       regularization=torch.zeros(side_shape) if reg is None else reg,
                       residual=torch.zeros(side_shape), quadrature_error=torch.zeros(q_shape), coords=coords,
                       layout=LAYOUT)


def test_parameter_influence_sums_before_the_absolute_value():
    # (test=2, step=2, param=5, train=3, output=2)
    v = torch.zeros(2, 2, 5, 3, 2, dtype=torch.float64)
    v[0, 0, 1, 0, 0], v[0, 1, 1, 2, 0] = 2.0, -3.0  # same (test, param, output): sums to -1 -> |.| = 1
    v[1, 0, 4, 1, 1] = -5.0
    v[0, 0, 0, 0, 1], v[1, 1, 0, 0, 1] = 1.5, -1.5  # different test inputs: |1.5| + |-1.5| = 3
    scores = parameter_influence(_att(("test", "step", "param", "train", "output"), v))
    assert set(scores) == {"w", "b"} and scores["w"].shape == (2, 2) and scores["b"].shape == (1,)
    np.testing.assert_allclose(scores["w"].reshape(-1).numpy(), [3.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(scores["b"].numpy(), [5.0])


def test_parameter_influence_with_regularization():
    v = torch.zeros(1, 5, 1, dtype=torch.float64)
    v[0, 2, 0] = 1.0
    reg = torch.zeros(1, 5, 1, dtype=torch.float64)
    reg[0, 2, 0], reg[0, 3, 0] = -3.0, 0.5
    att = _att(("test", "param", "output"), v, reg)
    assert float(parameter_influence(att)["w"].sum()) == 1.0
    with_reg = parameter_influence(att, include_regularization=True)["w"].reshape(-1)
    np.testing.assert_allclose(with_reg.numpy(), [0.0, 0.0, 2.0, 0.5])


def test_step_group_and_data_influence():
    v = torch.zeros(2, 3, 2, 4, 1, dtype=torch.float64)  # test, step, group, train, output
    v[0, 1, 0, 2, 0], v[0, 1, 1, 2, 0] = 4.0, -1.0
    v[1, 2, 1, 0, 0] = -2.0
    att = _att(("test", "step", "group", "train", "output"), v)
    np.testing.assert_allclose(step_influence(att).numpy(), [0.0, 3.0, 2.0])
    assert group_influence(att) == {"w": 4.0, "b": 3.0}
    np.testing.assert_allclose(data_influence(att).numpy(), [2.0, 0.0, 3.0, 0.0])
    signed = data_influence(att, per_input=True)
    assert signed.shape == (2, 4, 1) and float(signed[0, 2, 0]) == 3.0


def test_group_influence_from_a_param_axis():
    v = torch.zeros(1, 5, 1, dtype=torch.float64)
    v[0, :4, 0] = torch.tensor([1.0, -1.0, 2.0, 0.0])
    v[0, 4, 0] = -7.0
    assert group_influence(_att(("test", "param", "output"), v)) == {"w": 2.0, "b": 7.0}


def test_kernel_regularization_balance():
    v = torch.zeros(1, 2, 2, 1, dtype=torch.float64)  # test, step, group, output
    reg = torch.zeros(1, 2, 2, 1, dtype=torch.float64)
    v[0, 0, 0, 0], reg[0, 0, 0, 0] = 3.0, -1.0
    reg[0, 1, 1, 0] = 2.0
    out = kernel_regularization_balance(_att(("test", "step", "group", "output"), v, reg))
    np.testing.assert_allclose(out["kernel"].numpy(), [[3.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(out["regularization"].numpy(), [[1.0, 0.0], [0.0, 2.0]])
    assert float(out["ratio"][0, 0]) == 0.75 and float(out["ratio"][1, 1]) == 0.0
    assert math.isnan(float(out["ratio"][0, 1]))
    assert out["steps"] == [10, 11] and out["groups"] == ["w", "b"]


def test_score_similarity():
    v = torch.zeros(3, 4, 2, dtype=torch.float64)
    v[0, 0, 0], v[1, 0, 0], v[1, 1, 1], v[2, 3, 1] = 1.0, 1.0, 1.0, 1.0
    att = _att(("test", "train", "output"), v)
    assert score_similarity(att, 0, 1) == pytest.approx(1 / math.sqrt(2))
    assert score_similarity(att, 0, 2) == 0.0 and score_similarity(att, 1, 1) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="out of range"):
        score_similarity(att, 0, 3)


def test_scores_need_the_axis_and_run_the_estimator_from_a_trajectory():
    with pytest.raises(ConfigError, match=r"keep=\('step',\)"):
        step_influence(_att(("test", "train", "output"), torch.zeros(1, 2, 1)))
    run = engine_run("tanh", "adamw")
    scores = parameter_influence(run.trajectory, run.X_test, quadrature="gauss-legendre", device="cpu")
    assert {k: tuple(v.shape) for k, v in scores.items()} == {
        k: tuple(v.shape) for k, v in run.trajectory.params(0).items()}
    assert all(bool((v >= 0).all()) for v in scores.values())
    steps = step_influence(run.trajectory, run.X_test, device="cpu")
    assert steps.shape == (6,) and bool((steps > 0).all())
