"""Set-up of tests/test_stranger_round6.py and tests/stranger_round6_table.py: the sixth round of cases a new user
brings (written from docs/quickstart.md and docs/guide_own_model.md only).

Every case trains as tests/_round5_kit.py does (float64 plain loop, SGD 0.5 unless the case names another optimizer
or rate, 3 steps of 4 of 12 samples, 2 held-out inputs, the adaptive rule at tol 1e-11). :func:`figures` adds to
that kit's figures the slow reference's own quadrature error: the reference (tests/replay_reference.py) splits its
Gauss-Legendre panels at the kinks of ReLU-like modules only, so on kinks computed inside ``forward`` (``F.relu``,
a max over points, ``sort``, ``cummax``, ``scatter_reduce("amax")``) and on strongly curved paths its own error,
``[f(theta_{s+1}) - f(theta_s)] - phi_s Delta theta_s`` relative to the largest step change, bounds how closely it
can check the scores. Cases pass ``panels`` to shrink it. The models are in tests/_round6_models.py, the loops and
the cases in tests/_round6_cases.py.
"""

from __future__ import annotations

from typing import Any

import _round5_kit
from replay_reference import ReplayReference
from torch import Tensor, nn


class _Panels:
    """A reference factory with ``panels`` composite panels per smooth piece; it keeps the last reference built."""

    def __init__(self, panels: int, reference: type = ReplayReference) -> None:
        self.panels, self.reference, self.last = panels, reference, None

    def __call__(self, traj: Any, X: Tensor, panels: int) -> ReplayReference:
        self.last = self.reference(traj, X, panels=self.panels)
        return self.last


def figures(model: nn.Module, traj: Any, X_test: Any, *, panels: int = 2, reference: type = ReplayReference,
            **quad: Any) -> dict[str, Any]:
    """tests/_round5_kit.py :func:`figures`, the ``reference`` (default ``ReplayReference``) on ``panels`` panels,
    plus ``reference_quadrature``: the reference's largest own quadrature error relative to its largest per-step
    change."""
    factory = _Panels(panels, reference)
    got = _round5_kit.figures(model, traj, X_test, reference=factory, **quad)
    ref = factory.last
    change = (ref.values_at[1:] - ref.values_at[:-1]).abs().max()
    got["reference_quadrature"] = float(ref.quad_error.abs().max() / change.clamp_min(1e-300))
    return got


def scores_bound(got: dict[str, Any]) -> float:
    """How closely the reference can check the scores: 1e-9, or 3x its own quadrature error when larger."""
    return max(1e-9, 3 * got["reference_quadrature"])


def assert_exact(got: dict[str, Any]) -> None:
    """Replica <= 1e-6 against the trained model, residual share <= 1e-9 with no warning, the reference's own
    residual <= 1e-10, and the train scores within :func:`scores_bound` of the reference."""
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and not got["warnings"], got
    assert got["reference_residual"] <= 1e-10 and got["scores"] <= scores_bound(got), got
