"""Helpers shared by the engine-versus-reference tests: cached references and layout matching."""

from __future__ import annotations

import functools
import os

import numpy as np
from engine_fixtures import recorded_run
from reference import Reference

__all__ = ["DEVICE", "TARGET", "WINDOW", "reference_for", "target_value", "as_numpy", "reference_terms",
           "completeness_total"]

#: Device the engine runs on in these tests (``EXPLAIND_TEST_DEVICE=cuda`` checks the GPU path; the
#: reference always runs on the CPU in float64).
DEVICE = os.environ.get("EXPLAIND_TEST_DEVICE", "cpu")
#: The int-array target used throughout (one output per test point).
TARGET = np.array([2, 0, 1, 1, 0, 2])
#: The step window used throughout.
WINDOW = (2, 6)


@functools.cache
def reference_for(activation: str, optimizer: str, target_kind: str = "none") -> Reference:
    """The (cached) reference of a recorded run for ``target_kind`` in ``{"none", "index", "loss"}``."""
    run = recorded_run(activation, optimizer)
    if target_kind == "none":
        return Reference(run.trajectory, run.X_test)
    if target_kind == "index":
        return Reference(run.trajectory, run.X_test, target=TARGET)
    if target_kind == "loss":
        return Reference(run.trajectory, run.X_test, target="loss", y=run.y_test)
    raise KeyError(target_kind)


def target_value(kind: str):
    return {"none": None, "index": TARGET, "loss": "loss"}[kind]


def as_numpy(x) -> np.ndarray:
    """A float64 numpy copy of a tensor or array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def reference_terms(ref: Reference, att, steps=None) -> dict[str, np.ndarray]:
    """The reference's values, regularization and residual in the layout of the engine's attribution.

    Also checks that layout: ``values`` has axes ``("test", *keep, "output")`` with the training axis
    over every sample ``0..n_train-1`` and the step axis over the window; ``regularization`` and
    ``residual`` have the same axes without ``"train"``.
    """
    keep = tuple(att.axes)[1:-1]
    side = tuple(k for k in keep if k != "train")
    assert tuple(att.side_axes) == ("test", *side, "output"), att.side_axes
    if "train" in keep:
        np.testing.assert_array_equal(np.asarray(att.coords["train"]), np.arange(ref.K))
    if "step" in keep:
        start, stop = (0, ref.N) if steps is None else steps
        np.testing.assert_array_equal(np.asarray(att.coords["step"]), np.arange(start, stop))
    if "group" in keep:
        assert list(att.coords["group"]) == list(ref.names)
    if "param" in keep:
        np.testing.assert_array_equal(np.asarray(att.coords["param"]), np.arange(ref.D))
    return {"values": ref.kept(keep, steps), "regularization": ref.regularization(keep, steps),
            "residual": ref.residual(keep, steps)}


def completeness_total(att) -> np.ndarray:
    """``initial + sum(values) + sum(regularization) + sum(residual) + sum(quadrature_error)``, ``(n, O)``."""
    total = as_numpy(att.initial).copy()
    for term in ("values", "regularization", "residual", "quadrature_error"):
        arr = as_numpy(getattr(att, term))
        total = total + arr.sum(axis=tuple(range(1, arr.ndim - 1)))
    return total
