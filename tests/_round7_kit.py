"""Set-up of tests/test_stranger_round7.py, tests/test_stranger_round7_more.py and tests/stranger_round7_table.py:
the seventh round of cases a new user brings (written from docs/quickstart.md and docs/guide_own_model.md only).

Every case trains as tests/_round5_kit.py does (float64 plain loop, SGD 0.5 unless the case names another optimizer
or rate, 3 steps of 4 of 12 samples, 2 held-out inputs, the adaptive rule at tol 1e-11) and is measured by
tests/_round6_kit.py's :func:`figures` (the slow reference's own quadrature error included); a model whose buffers
change along the run (batch norm) is checked against tests/replay_reference.py's ``BufferReference``, which
evaluates step ``s`` at the recorded buffers ``beta_s``. The models and losses are in tests/_round7_models.py, the
loops and the cases in tests/_round7_cases.py. :func:`classify` is the verdict the table prints and the tests
assert.
"""

from __future__ import annotations

from typing import Any

from _round6_kit import assert_exact, figures, scores_bound

__all__ = ["assert_exact", "classify", "figures", "scores_bound"]


def classify(got: dict[str, Any]) -> str:
    """``"exact"`` (replica <= 1e-6, residual share <= 1e-9, the reference's own residual <= 1e-10, the scores
    within :func:`scores_bound`, no warning), ``"warns"`` (an ExplaindWarning was given) or ``"NOT EXACT"``."""
    if (got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["scores"] <= scores_bound(got)
            and got["reference_residual"] <= 1e-10 and not got["warnings"]):
        return "exact"
    return "warns" if got["warnings"] else "NOT EXACT"
