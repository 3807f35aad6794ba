r"""Tensor coefficients in the recorder's buffers: computed at the step or by one deferred job.

A dense store lends an adapter a buffer per parameter through the ``out`` keyword of ``after_step``
and, when nothing reads the coefficients inside the step, takes one job that fills them through
``defer`` (docs/optimizers.md, "Coefficient buffers"). An adapter describes each tensor coefficient
(``P`` or RMSprop's gain ``b``, docs/maths.md §3) as a *fill*: a function of an optional output
tensor that runs the coefficient's elementwise operations in it (``torch.sqrt(v, out=buf)``, then
in-place operations) and returns it, or returns new memory when given ``None``. The same operations
in the same order give the same bits either way. :class:`StepSlots` decides, per parameter, between
new memory (no buffer lent, or one of another shape, dtype, device or layout), the lent buffer filled
at once, and the lent buffer filled later by the step's single deferred job.

A deferred fill reads the optimizer state when the job runs; the recorder runs it before the next
``optimizer.step()`` changes that state (and before the writer reads the buffer), so every scalar
a fill needs is taken at the step and only state tensors are read late.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Fill", "Pending", "StepSlots", "fits", "negated"]

#: computes a tensor coefficient in the given tensor (``None``: new memory) and returns the tensor it wrote
Fill = Callable[[Tensor | None], Tensor]


def fits(out: Tensor | None, like: Tensor) -> bool:
    """Whether ``out`` can hold a coefficient computed elementwise from ``like`` (its shape, dtype, device; contiguous).

    Parameters
    ----------
    out : Tensor or None
        The buffer lent by the recorder.
    like : Tensor
        The optimizer-state tensor the coefficient is computed from (shape of the parameter).
    """
    return (out is not None and out.shape == like.shape and out.dtype == like.dtype
            and out.device == like.device and out.is_contiguous())


def _negate(fill: Fill, out: Tensor | None) -> Tensor:
    return fill(out).neg_()


def negated(fill: Fill) -> Fill:
    """``fill`` followed by an in-place negation (``maximize=True``: ``P -> -P``)."""
    return functools.partial(_negate, fill)


@dataclass(frozen=True)
class Pending:
    """A tensor coefficient not computed yet.

    Attributes
    ----------
    like : Tensor
        The state tensor it is computed from elementwise (shape, dtype and device of the result).
    fill : Fill
        Computes it (in a given buffer or in new memory).
    """

    like: Tensor
    fill: Fill


def _run(fills: list[Callable[[], Tensor]]) -> None:
    for fill in fills:
        fill()


class StepSlots:
    """One step's tensor coefficients, placed as the recorder asked (``out``, ``defer`` of ``after_step``).

    Parameters
    ----------
    out : callable or None
        ``out(param)``: a buffer shaped like ``param`` or ``None`` (the recorder's
        ``CoefficientBuffers``); ``None``: every coefficient is new memory.
    defer : callable or None
        Takes the one job that fills the buffers, run by the recorder before the next step; ``None``:
        buffers are filled at once.
    """

    def __init__(self, out: Callable[[Tensor], Tensor | None] | None,
                 defer: Callable[[Callable[[], None]], None] | None):
        self._out = out
        self._defer = defer
        self._later: list[Callable[[], Tensor]] = []

    def tensor(self, param: Tensor, pending: Pending) -> Tensor:
        """The coefficient of ``param``: computed now, or the lent buffer that :meth:`close`'s job fills."""
        buf = None if self._out is None else self._out(param)
        if not fits(buf, pending.like):
            return pending.fill(None)
        if self._defer is None:
            return pending.fill(buf)
        self._later.append(functools.partial(pending.fill, buf))
        return buf

    def close(self) -> None:
        """Hand the buffers still to fill to ``defer`` as one job (nothing when none is pending)."""
        if self._later:
            later, self._later = self._later, []
            self._defer(functools.partial(_run, later))
