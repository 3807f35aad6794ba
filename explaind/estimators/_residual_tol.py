r"""The residual-share tolerance ``residual_tol="auto"``: the rounding level of the run being explained.

A residual share (docs/maths.md §4, :meth:`~explaind.kernel.attribution.Attribution.residual_share`) is at rounding
level when the run's own gradients and updates round no coarser than the engine's float64 recomputation of them.
What that level is depends on the run, and it is known from the recording alone:

* **float64 parameters, no autocast**: the exact cases of the repository leave shares up to about 1e-8 (float64
  models whose norms compute in float32 inside: 9.3e-9; a float32 label smoother: 4.3e-9). ``"auto"`` warns above
  :data:`FLOAT64_TOL` (1e-7), which a float32 cast before the loss (1.0e-6 on Moonshine's own loss) and a loss weight
  changed at a step the gradient check skipped (1.4e-4) exceed (docs/guide_own_model.md,
  "The residual share, and what to do when it warns"). A float64 model that converts to float32 inside its forward
  (the engine's ``meta["promoted_casts"]``) rounds its gradients there, at a scale that depends on the loss's
  normalisation: :data:`PROMOTED_TOL` (1e-5), unless the recorder noted a float32 cast before the loss
  (``manifest.extras["output_rounding"]``), which the warning names.
* **a run recorded under torch.autocast**: the loop's gradients carry the autocast dtype's rounding, which no
  float64 per-sample gradient reproduces. Its share is that dtype's unit roundoff times a factor of the run (the
  optimizer, the number of steps): the same run under float16 and bfloat16 gives the same factor within 1.6x, 0.33
  to 14 over SGD, Adam and centred RMSprop runs of 4 to 32 steps (tests/silent_shares_table.py ``autocast``). It is
  never the rounding level of the decomposition: ``"auto"`` states it at every ``transform`` (a warning naming
  autocast, the unit roundoff, the ratio and the fix) once it passes :data:`AUTOCAST_STATED` of a unit roundoff
  (a float64 model: :data:`FLOAT64_TOL`, autocast leaves its float64 operations alone), and names a share beyond
  :data:`AUTOCAST_UNITS` unit roundoffs as more than the autocast's rounding.
* **anything else** (float32 or half-precision parameters without autocast): :data:`OTHER_TOL` (1e-3), the
  tolerance explaind has always used there.
* **explained in a coarser dtype than the run's** (``InfluenceEstimator(dtype="float32")`` on a float64 run): the
  level of that dtype, since the engine's own rounding is then in the share (a float64 run explained in float32
  leaves 1e-7 to 3.3e-7, tests/test_reference_influence.py's float32 cases).

An explicit number replaces all of this: the share is warned about above it, and only then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..exceptions import ConfigError
from ..trajectory._output_rounding import EXTRAS_KEY

__all__ = ["AUTOCAST_STATED", "AUTOCAST_UNITS", "FLOAT64_TOL", "OTHER_TOL", "PROMOTED_TOL", "QUADRATURE_TOL",
           "ResidualTol", "autocast_statement", "quadrature_tol", "resolve_residual_tol"]

#: ``"auto"``'s tolerance for a float64 run recorded without autocast: 10 times the largest share of an exact case.
FLOAT64_TOL = 1e-7
#: ``"auto"``'s tolerance for a float64 run whose forward converts to float32 inside (RMS norms of Llama-family
#: models): that rounding depends on the loss's scale, so the per-sample split rounds apart from the step's
#: gradient (a left-padded Qwen2: 5e-7, the independent reference's residual the same).
PROMOTED_TOL = 1e-5
#: ``"auto"``'s tolerance for a run neither float64 nor under autocast (float32 parameters, half precision).
OTHER_TOL = 1e-3
#: The quadrature-error share warned about when ``residual_tol="auto"`` (the path integrals' rounding does not
#: depend on the run's dtype: the engine integrates in float64).
QUADRATURE_TOL = 1e-3
#: An autocast run's share beyond this many unit roundoffs of its autocast dtype is named as beyond its rounding
#: (7 times the largest factor measured, 14 for centred RMSprop).
AUTOCAST_UNITS = 100.0
#: An autocast run's share is stated from this fraction of its autocast dtype's unit roundoff on (a hundredth of
#: the smallest factor measured is 0.0033): below it the share is at the model's own rounding level, not the
#: autocast's (a bfloat16 autocast around part of a float64 model leaves 4.5e-16).
AUTOCAST_STATED = 0.01


@dataclass(frozen=True)
class ResidualTol:
    """The tolerance a share is compared with, and why.

    Attributes
    ----------
    value : float
        The largest share accepted silently (``0.0``: every share is stated).
    label : str
        How the warning names it: ``"0.001"`` for a number, ``"1e-07 (auto: for a float64 run)"``.
    autocast : str or None
        The autocast dtype of the window's steps (the lowest precision), when ``"auto"`` found one.
    """

    value: float
    label: str
    autocast: str | None = None

    def expected(self) -> float | None:
        """The unit roundoff of the autocast dtype (``None`` without autocast): the order of the expected share."""
        if self.autocast is None:
            return None
        return float(torch.finfo(getattr(torch, self.autocast)).eps) / 2


def _autocast_of(traj: Any, window: tuple[int, int]) -> str | None:
    """The coarsest autocast dtype recorded for the steps of ``window`` (``None``: none ran under autocast)."""
    steps = getattr(traj.manifest, "steps", None) or []
    found = {str(r.autocast) for r in steps[window[0]:window[1]] if getattr(r, "autocast", None)}
    if not found:
        return None
    return max(found, key=lambda name: float(torch.finfo(getattr(torch, name, torch.float32)).eps))


def resolve_residual_tol(tol: float | str, traj: Any, window: tuple[int, int],
                         promoted: list[str] | None = None, computed: torch.dtype | None = None) -> ResidualTol:
    """The tolerance for the residual share of ``traj``'s steps ``window``: ``tol`` itself, or ``"auto"``'s
    rounding level of the run (module docstring); ``promoted``: the conversions to float32 the engine found in the
    forward (``meta["promoted_casts"]``); ``computed``: the dtype the estimator explained in (its ``dtype``), whose
    rounding counts when it is coarser than the run's (a float64 run explained in float32 has float32's level).

    Raises
    ------
    ConfigError
        For a string other than ``"auto"``.
    """
    if not isinstance(tol, str):
        return ResidualTol(float(tol), f"{float(tol):g}")
    if tol != "auto":
        raise ConfigError(f"residual_tol={tol!r} is not a tolerance: pass a positive number (the largest residual "
                          f"share accepted silently) or 'auto' (the rounding level of the run: 1e-7 for a float64 "
                          f"run, an autocast run's share past a hundredth of its unit roundoff, 1e-3 otherwise).")
    autocast = _autocast_of(traj, window)
    dtype = traj.params(window[0])[traj.param_names[0]].dtype
    coarser = computed is not None and computed.is_floating_point and torch.finfo(computed).eps > torch.finfo(
        dtype).eps
    if coarser:
        dtype = computed
    if autocast is not None:
        # Autocast leaves float64 operations alone, so a float64 model keeps its own level; otherwise every share
        # above a hundredth of the autocast dtype's unit roundoff (far below the 0.33 units measured at least) is
        # stated, and a share at the model's own rounding level stays silent.
        unit = float(torch.finfo(getattr(torch, autocast)).eps) / 2
        value = FLOAT64_TOL if dtype == torch.float64 else min(OTHER_TOL, AUTOCAST_STATED * unit)
        return ResidualTol(value, f"{value:g} (auto: shares stated for a run recorded under "
                                  f"torch.autocast({autocast}))", autocast)
    rounded = bool((getattr(traj.manifest, "extras", None) or {}).get(EXTRAS_KEY))
    if dtype == torch.float64 and promoted and not rounded:
        return ResidualTol(PROMOTED_TOL, f"{PROMOTED_TOL:g} (auto: for a float64 run whose forward converts to "
                                         f"float32: {', '.join(promoted[:3])})")
    if dtype == torch.float64:
        return ResidualTol(FLOAT64_TOL, f"{FLOAT64_TOL:g} (auto: for a float64 run)")
    name = str(dtype).removeprefix("torch.")
    label = f"a run explained in {name}" if coarser else f"a {name} run"
    return ResidualTol(OTHER_TOL, f"{OTHER_TOL:g} (auto: for {label})")


def quadrature_tol(tol: float | str) -> float:
    """The quadrature-error share warned about: ``tol`` itself, :data:`QUADRATURE_TOL` for ``"auto"``."""
    return QUADRATURE_TOL if isinstance(tol, str) else float(tol)


def autocast_statement(tol: ResidualTol, share: float) -> str:
    """The sentence of an autocast run's warning that compares its share with the autocast's rounding."""
    unit = tol.expected() or float(torch.finfo(torch.float32).eps) / 2
    verdict = (f"within {AUTOCAST_UNITS:g} of those units, so it is the autocast's rounding" if share <= AUTOCAST_UNITS
               * unit else f"beyond {AUTOCAST_UNITS:g} of those units, so more than the autocast's rounding is in it")
    return (f" The run was recorded under torch.autocast({tol.autocast}): the loop's gradients carry its rounding, "
            f"which no float64 per-sample gradient repeats, so the share is expected to be its unit roundoff "
            f"{unit:.2g} times a factor of the run (measured 0.33 to 14 over SGD, Adam and RMSprop runs of 4 to 32 "
            f"steps); this share is {share / unit:.2g} of it, {verdict}. For scores at rounding level train without "
            f"autocast; to accept this share silently pass residual_tol={_round_up(share):g}.")


def _round_up(share: float) -> float:
    """A tolerance just above ``share`` with two significant digits."""
    if share <= 0:
        return FLOAT64_TOL
    digits = 10.0 ** (int(torch.floor(torch.log10(torch.tensor(share, dtype=torch.float64)))) - 1)
    return (int(share / digits) + 1) * digits
