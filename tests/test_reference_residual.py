"""Residual, gradient scales, uneven and repeated sample weights: engine against the reference.

The run of :func:`engine_fixtures.perturbed_run` has the recorded parameters but altered step sizes,
gradient scales and sample weights, so its residual ``E_s`` is of the same order as the data part and
every coefficient of the recurrence (``c_s``, ``w_{s,k}``, repeats) enters the atoms.
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_compare import DEVICE, as_numpy, completeness_total, reference_terms
from engine_fixtures import perturbed_run
from reference import Reference, rel_err

import explaind

KEEPS = [("train",), ("step",), ("param",), ("step", "group", "train")]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def case():
    run = perturbed_run()
    return run, Reference(run.trajectory, run.X_test)


def test_the_residual_is_substantial(case):
    _, ref = case
    ratio = float(ref.E.norm() / ref.Dk.sum(1).norm())
    assert ratio > 0.05


CASES = [(k, "forward") for k in KEEPS] + [(("train",), "reverse"), (("param", "train"), "reverse")]


@pytest.mark.parametrize("keep, momentum", CASES, ids=[f"{'+'.join(k)}-{m}" for k, m in CASES])
def test_every_term_matches_reference(case, keep, momentum):
    run, ref = case
    est = explaind.InfluenceEstimator(keep=keep, momentum=momentum, quadrature="gauss-legendre", nodes=8,
                                      device=DEVICE).fit(run.trajectory)
    att = est.transform(run.X_test)
    want = reference_terms(ref, att, None)
    assert rel_err(as_numpy(att.values), want["values"]) <= 1e-9
    assert rel_err(as_numpy(att.residual), want["residual"]) <= 1e-9
    assert rel_err(as_numpy(att.regularization), want["regularization"]) <= 1e-9
    assert rel_err(completeness_total(att), ref.final()) <= 1e-10


def test_replica_is_unaffected_by_the_bookkeeping(case):
    """The replica only uses the parameters: the altered coefficients do not change it."""
    run, ref = case
    pred = explaind.KernelReplica(quadrature="gauss-legendre", nodes=8, device=DEVICE).fit(run.trajectory).predict(
        run.X_test)
    assert rel_err(pred, ref.final()) <= 1e-12
    np.testing.assert_allclose(pred, ref.replica(), rtol=0, atol=1e-12)
