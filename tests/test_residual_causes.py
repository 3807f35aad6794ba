"""The likely causes a residual warning names: float32 rounding told apart from an update the adapter misses.

A float32 AdamW run's audited gaps are the rounding of the stored parameters (within a few unit
roundoffs of ``|theta_{s+1}|``), so the cause named is the float32 training, with the fix; a change of
the parameters the optimizer did not make stays named as the adapter's gap, in float32 and float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _recording_helpers import classifier_setup, classifier_step

import explaind
from explaind.estimators.residual import ROUNDING_UNITS, residual_causes


def _run(dtype: torch.dtype, steps: int = 12):
    """A float ``dtype`` AdamW run (weight decay) of a small tanh classifier, recorded."""
    model, opt, X, y = classifier_setup(torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, dtype)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s in range(steps):
            classifier_step(model, opt, X, y, s, rec)
    return rec.trajectory


class _Gap:
    """The trajectory with one step's audit raised to ``gap``: an update the adapter missed by that much."""

    def __init__(self, traj, step: int, gap: float):
        self._traj, self._step, self._gap = traj, step, gap

    def __getattr__(self, name):
        return getattr(self._traj, name)

    def audit(self) -> np.ndarray:
        audit = np.array(self._traj.audit(), dtype=np.float64)
        audit[self._step] = self._gap
        return audit


def _rounding_units(traj) -> np.ndarray:
    """||E_s|| / (u ||theta_{s+1}||) per step (u: float32's unit roundoff), from the audit and the stored parameters."""
    audit = np.asarray(traj.audit())
    unit = torch.finfo(torch.float32).eps / 2
    out = []
    for s in range(traj.n_steps):
        a, b = traj.params(s), traj.params(s + 1)
        step = float(torch.cat([(b[n].double() - a[n].double()).reshape(-1) for n in a]).norm())
        out.append(audit[s] * step / (unit * float(torch.cat([b[n].double().reshape(-1) for n in b]).norm())))
    return np.array(out)


def test_a_float32_run_names_its_rounding_not_the_adapter():
    traj = _run(torch.float32)
    assert float(np.max(traj.audit())) > 1e-6  # above the adapter's threshold ...
    assert float(np.max(_rounding_units(traj))) < ROUNDING_UNITS  # ... but within the rounding of the parameters
    causes = residual_causes(traj, (0, traj.n_steps))
    assert any(c.startswith("the run was trained in float32") and "--dtype float64" in c for c in causes)
    assert not any("does not reproduce" in c for c in causes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_gap_beyond_rounding_is_still_named_as_the_adapters(dtype):
    # 1e-3 of a step is far beyond the float32 rounding of the parameters (a few 1e-5 of these steps)
    traj = _Gap(_run(dtype), step=5, gap=1e-3)
    assert _rounding_units(traj)[5] > 10 * ROUNDING_UNITS
    causes = residual_causes(traj, (0, traj.n_steps))
    (named,) = [c for c in causes if "does not reproduce" in c]
    assert "reaches 0.001 at step 5," in named and "beyond the rounding of the stored parameters" in named
    assert not any(c.startswith("the run was trained in") for c in causes)
    # a window without that step: rounding again in float32, nothing above the threshold in float64
    later = residual_causes(traj, (6, traj.n_steps))
    assert not any("does not reproduce" in c for c in later)
    assert any(c.startswith("the run was trained in float32") for c in later) == (dtype == torch.float32)
