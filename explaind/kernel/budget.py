r"""Memory budgets: parsing ``"2GB"``-style sizes and choosing the momentum mode and chunking.

The Jacobian path holds, per test chunk of ``T_c`` inputs and parameter block of ``D_b``
coordinates (``e`` bytes per element, ``O`` outputs, ``B`` the largest batch, ``M`` the distinct
training samples the sweep visits, ``J`` Jacobians per ``vmap`` call):

* reverse: ``e * (3 T_c O D_b + 2 B D_b + 3 J O D_b)`` — the accumulator ``U``, :math:`\Phi_s`
  and the combined coefficient, per-sample gradients, Jacobian chunks;
* forward: ``e * (M D_b + 2 T_c O D_b + 2 B D_b + 3 J O D_b)`` — the per-sample buffer instead.

:func:`plan_sweep` picks the mode (``"auto"``: reverse unless ``step`` is kept — it never costs
more arithmetic — and forward when only it fits) and then shrinks test chunks first (cheap:
only per-sample gradients are recomputed per chunk) and parameter blocks second.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from ..exceptions import ConfigError
from ..trajectory._common import warn_user

__all__ = ["parse_bytes", "SweepPlan", "plan_sweep"]

logger = logging.getLogger(__name__)

#: Largest budget accepted (a petabyte; anything above is a typo, not a machine).
_LARGEST = 10**15
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | float | str, field: str = "memory_budget") -> int:
    """``2_000_000``, ``"2GB"``, ``"512 MiB"``, ``"1.5e9"`` -> bytes (int > 0)."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid value for {field!r}: {value!r} — give a number of bytes or a string like '2GB'.")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value > _LARGEST:
            raise ConfigError(f"invalid value for {field!r}: {value!r} — give a finite number of bytes (at most "
                              f"{_LARGEST:.3g}) or a string like '2GB'.")
        if value <= 0:
            raise ConfigError(f"invalid value for {field!r}: {value!r} — it must be positive (e.g. '2GB').")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(
            f"invalid value for {field!r}: {value!r} — use a positive number of bytes or a size such as '2GB', "
            f"'512MB' or '1GiB' (units: {', '.join(u for u in _UNITS if u)})."
        )
    size = float(m.group(1)) * _UNITS[unit]
    if not size <= _LARGEST:
        raise ConfigError(f"invalid value for {field!r}: {value!r} — at most {_LARGEST:.3g} bytes (e.g. '2GB').")
    return int(size)


@dataclass(frozen=True)
class SweepPlan:
    """Chosen momentum mode, test chunk size, parameter block size and Jacobians per call."""

    mode: str
    test_chunk: int
    block_size: int
    jac_chunk: int
    estimate_bytes: int


def _need(mode: str, Tc: int, Db: int, O: int, B: int, M: int, J: int, e: int) -> int:
    if mode == "reverse":
        return e * (3 * Tc * O * Db + 2 * B * Db + 3 * J * O * Db)
    return e * (M * Db + 2 * Tc * O * Db + 2 * B * Db + 3 * J * O * Db)


def plan_sweep(*, momentum: str, keep_step: bool, T: int, O: int, D: int, largest_tensor: int, B: int, M: int,
               elem: int, budget: int, chunk_size: int | None, test_chunk: int | None,
               block_size: int | None) -> SweepPlan:
    """Choose mode and chunking so that the estimated peak stays under ``budget`` bytes when possible."""
    J_max = chunk_size or 256

    def jac(Db: int) -> int:
        return max(1, min(J_max, budget // (4 * 3 * elem * max(1, O * Db))))

    mode = momentum
    if mode == "auto":
        if keep_step:
            mode = "forward"
        else:
            fits_rev = _need("reverse", T, D, O, B, M, jac(D), elem) <= budget
            fits_fwd = _need("forward", T, D, O, B, M, jac(D), elem) <= budget
            mode = "forward" if (fits_fwd and not fits_rev) else "reverse"
    Tc = min(T, test_chunk) if test_chunk else T
    Db = min(D, block_size) if block_size else D
    if not test_chunk:
        while Tc > 1 and _need(mode, Tc, Db, O, B, M, jac(Db), elem) > budget:
            Tc = (Tc + 1) // 2
    if not block_size:
        floor = max(1, largest_tensor)
        while Db > floor and _need(mode, Tc, Db, O, B, M, jac(Db), elem) > budget:
            Db = max(floor, Db // 2)
    need = _need(mode, Tc, Db, O, B, M, jac(Db), elem)
    if need > budget:
        message = (f"InfluenceEstimator.transform: the estimated peak memory, {need / 1e9:.3g} GB, exceeds "
                   f"memory_budget={budget / 1e9:.3g} GB even with test chunks of {Tc} input(s) and parameter blocks "
                   f"of {Db} coordinates (a block is at least the largest parameter tensor, {largest_tensor} "
                   f"coordinates; it holds the {B} per-sample gradients of the largest batch" +
                   (f" and the per-sample momentum of {M} samples" if mode == "forward" else "") +
                   f"), so the sweep goes on above the budget and may run out of memory. Fix: give "
                   f"memory_budget='{math.ceil(need / 1e9 * 1.1 * 10) / 10:g}GB' if the machine has it free "
                   f"(docs/engine.md, section 3, 'Chunking'), or explain fewer outputs (target=...).")
        warn_user(logger, message)
    return SweepPlan(mode, Tc, Db, jac(Db), need)
