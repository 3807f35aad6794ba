"""Attribution.cancellation_ratio and Attribution.top_k against plain loops."""

from __future__ import annotations

import math

import pytest
import torch
from engine_testkit import engine_run

import explaind
from explaind.exceptions import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def att():
    run = engine_run("tanh", "adamw")
    est = explaind.InfluenceEstimator(keep=("step", "train"), quadrature="gauss-legendre", device="cpu")
    return est.fit(run.trajectory).transform(run.X_test)


def test_cancellation_ratio_is_sum_of_magnitudes_over_magnitude_of_sum(att):
    ratio = att.cancellation_ratio("train")
    T, S, M, O = att.values.shape
    assert ratio.shape == (T, S, O)
    for t in range(T):
        for s in range(S):
            for o in range(O):
                col = [float(att.values[t, s, k, o]) for k in range(M)]
                if any(col):
                    expected = sum(abs(c) for c in col) / abs(sum(col))
                    assert math.isclose(float(ratio[t, s, o]), expected, rel_tol=1e-12)
    finite = [float(r) for r in ratio.reshape(-1) if math.isfinite(float(r))]
    assert att.cancellation_ratio("train", reduce="max") == max(finite)
    assert all(r >= 1 - 1e-12 for r in finite)


def test_top_k_lists_proponents_and_opponents(att):
    per_sample = att.sum("step")
    top = per_sample.top_k("train", 3)
    idx, vals = top["proponents"]
    oidx, ovals = top["opponents"]
    T, M, O = per_sample.values.shape
    assert idx.shape == vals.shape == (T, O, 3)
    for t in range(T):
        for o in range(O):
            col = [float(per_sample.values[t, k, o]) for k in range(M)]  # unused samples tie at 0
            assert vals[t, o].tolist() == sorted(col, reverse=True)[:3]
            assert ovals[t, o].tolist() == sorted(col)[:3]
            assert [col[k] for k in idx[t, o].tolist()] == vals[t, o].tolist()
            assert [col[k] for k in oidx[t, o].tolist()] == ovals[t, o].tolist()
            assert len(set(idx[t, o].tolist())) == 3


def test_top_k_on_steps_returns_step_numbers(att):
    idx, _ = att.sum("train").top_k("step", 2)["proponents"]
    assert set(idx.reshape(-1).tolist()) <= set(att.coords["step"].tolist())


def test_diagnostics_errors(att):
    with pytest.raises(ConfigError, match="not a kept axis.*'step', 'train'"):
        att.cancellation_ratio("param")
    with pytest.raises(ConfigError, match="'k': 0. Allowed: 1..12"):
        att.top_k("train", 0)
    with pytest.raises(ConfigError, match="'reduce'"):
        att.cancellation_ratio("train", reduce="mean")
    assert isinstance(att.top_k("train", 1)["opponents"][0], torch.Tensor)
