r"""An optimizer adapter's tensor coefficients in a dense store: reused buffers, filled off the hot path.

At every step the adapter reports one :class:`~explaind.recurrence.LinearUpdate` per parameter;
Adam's carries the diagonal preconditioner :math:`P_s` (docs/maths.md §3), a tensor of the
parameter's shape computed from the optimizer state after the step. A dense store keeps that tensor
only until the store's writer has written the step file, so instead of new memory every step
(page-faulted on the training loop's thread) the adapter gets buffers of the recorder's
:class:`~explaind.trajectory._background.CopyPool` through the optional ``out`` keyword of its
``after_step`` (docs/optimizers.md, "Coefficient buffers"), given back once the step is written.

When nothing reads :math:`P_s` at the step (the update audit is off), an adapter that also takes
the ``defer`` keyword leaves the buffers empty and hands over one job that fills them. The recorder
runs it on the :class:`~explaind.trajectory._background.StateCopier`'s thread while the loop computes
the next forward and backward; the optimizer state it reads changes only inside
``optimizer.step()``, and the next step waits for the job first (a step pre-hook), as the writer does
before writing the step file. The job runs the same elementwise operations on the same state, so the
stored bits are those computed at the step (``tests/test_recorder_coefficient_buffers.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..recurrence import LinearUpdate
from ._background import CopyPool

__all__ = ["CoefficientBuffers"]

#: the pool key prefix of the coefficient buffers
PREFIX = "coef."


class CoefficientBuffers:
    """Pool buffers for an adapter's tensor coefficients: the ``out`` (and ``defer``) of its ``after_step``.

    Called with a recorded parameter, it hands out a buffer of the pool (key ``"coef.<name>"``,
    shaped like the parameter), or ``None`` for a parameter it does not know.

    Parameters
    ----------
    pool : CopyPool
        Where the buffers come from and go back to.
    params : dict of str to Tensor
        The recorded parameters, by name.
    defer : bool
        Let the adapter defer filling the buffers (:meth:`take_jobs` returns the jobs).
    """

    def __init__(self, pool: CopyPool, params: dict[str, Tensor], defer: bool = False):
        self._pool = pool
        self._names = {id(p): n for n, p in params.items()}
        self._params = params  # keeps the parameters (and so their ids) alive
        self._taken: dict[str, Tensor] = {}
        self._jobs: list[Callable[[], None]] | None = [] if defer else None

    @classmethod
    def for_adapter(cls, adapter: Any, pool: CopyPool, params: dict[str, Tensor], *, dense: bool,
                    read_at_step: bool) -> CoefficientBuffers | None:
        """The buffers a recorder lends ``adapter``, or ``None`` where it computes new tensors.

        Parameters
        ----------
        dense : bool
            The run goes to a dense store (in memory and in sparse stores every coefficient is kept or
            dropped at once: new tensors, as without this class).
        read_at_step : bool
            Something reads the coefficients inside the step (the update audit): no deferring.
        """
        try:
            takes = inspect.signature(adapter.after_step).parameters
        except (TypeError, ValueError):  # a callable without a signature: new tensors, as without the keyword
            return None
        if not dense or "out" not in takes:
            return None
        return cls(pool, params, defer="defer" in takes and not read_at_step)

    def __call__(self, param: Tensor) -> Tensor | None:
        name = self._names.get(id(param))
        if name is None:
            return None
        buf = self._taken[name] = self._pool.buffer(PREFIX + name, param)
        return buf

    def updates(self, adapter: Any, optimizer: Any, before: Any) -> dict[int, LinearUpdate]:
        """``adapter.after_step(optimizer, before, out=self[, defer=...])`` for a new step."""
        self._taken = {}  # a failed step's buffers are not given back: nothing may reuse them
        if self._jobs is None:
            return adapter.after_step(optimizer, before, out=self)
        self._jobs = []
        return adapter.after_step(optimizer, before, out=self, defer=self._jobs.append)

    def take(self) -> dict[str, Tensor]:
        """The buffers handed out for this step, by parameter name (give them back with :meth:`release`)."""
        taken, self._taken = self._taken, {}
        return taken

    def take_jobs(self) -> list[Callable[[], None]]:
        """The adapter's deferred jobs of this step (to run before the next step and before the write)."""
        jobs = self._jobs or []
        if self._jobs is not None:
            self._jobs = []
        return jobs

    def release(self, buffers: dict[str, Tensor]) -> None:
        """Give :meth:`take`'s buffers back once nothing reads them (the step is written)."""
        self._pool.release(PREFIX, buffers)
