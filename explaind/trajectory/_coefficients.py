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

A sparse store keeps no tensor coefficient at all (its steps store the scalar table; :math:`P_s` is
replayed when read, docs/recording.md, "Sparse checkpoints"). With the audit off nothing reads them,
so there the adapter gets one buffer per parameter, made once and filled with NaN (a read would be
loud), and its deferred job is dropped: Adam's four passes over the parameters per step are not run
(``tests/test_sparse_unread_coefficients.py``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
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
    unread : bool
        Nothing reads the coefficients (a sparse store with the audit off): the buffers are made once, hold NaN
        and are never filled, every deferred job is dropped and nothing is given back.
    """

    def __init__(self, pool: CopyPool, params: dict[str, Tensor], defer: bool = False, unread: bool = False):
        self._pool = pool
        self._names = {id(p): n for n, p in params.items()}
        self._params = params  # keeps the parameters (and so their ids) alive
        self._taken: dict[str, Tensor] = {}
        self._jobs: list[Callable[[], None]] | None = [] if defer or unread else None
        self._unread: dict[str, Tensor] | None = {} if unread else None

    @classmethod
    def for_adapter(cls, adapter: Any, pool: CopyPool, params: dict[str, Tensor], *, dense: bool,
                    read_at_step: bool, sparse: bool = False) -> CoefficientBuffers | None:
        """The buffers a recorder lends ``adapter``, or ``None`` where it computes new tensors.

        Parameters
        ----------
        dense : bool
            The run goes to a dense store (in memory every coefficient is kept: new tensors, as without
            this class).
        read_at_step : bool
            Something reads the coefficients inside the step (the update audit): no deferring.
        sparse : bool
            The run goes to a sparse store, which stores no tensor coefficient: unless ``read_at_step``, an adapter
            that takes ``out`` and ``defer`` gets buffers that are never filled (``unread``); else new tensors.
        """
        try:
            takes = inspect.signature(adapter.after_step).parameters
        except (TypeError, ValueError):  # a callable without a signature: new tensors, as without the keyword
            return None
        if "out" not in takes:
            return None
        if sparse:
            return cls(pool, params, unread=True) if "defer" in takes and not read_at_step else None
        if not dense:
            return None
        return cls(pool, params, defer="defer" in takes and not read_at_step)

    def __call__(self, param: Tensor) -> Tensor | None:
        name = self._names.get(id(param))
        if name is None:
            return None
        if self._unread is not None:
            if name not in self._unread:
                self._unread[name] = torch.full_like(param.detach(), math.nan, memory_format=torch.contiguous_format)
            return self._unread[name]
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
        """The adapter's deferred jobs of this step (to run before the next step and before the write); none when
        nothing reads the coefficients (``unread``: the jobs are dropped)."""
        jobs = self._jobs or []
        if self._jobs is not None:
            self._jobs = []
        return [] if self._unread is not None else jobs

    def release(self, buffers: dict[str, Tensor]) -> None:
        """Give :meth:`take`'s buffers back once nothing reads them (the step is written)."""
        self._pool.release(PREFIX, buffers)
