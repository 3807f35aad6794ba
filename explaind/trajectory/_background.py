r"""The recorder's per-step work off the training loop's hot path (docs/recording.md, "Recording overhead").

* :class:`CopyPool` hands out copies of tensors in reused buffers. A fresh ``clone()`` of a large
  tensor pays the page faults of new memory (on CPU about 25x the copy itself); a buffer returned
  by its last user is filled again with ``copy_``.
* :class:`WarmBuffers` gives an in-memory run, which keeps every copy of :math:`\theta_{s+1}`,
  new memory that a daemon thread allocated and page-faulted ahead (writing zeros into it), so the
  loop's thread only copies; when no set is ready the copy is a plain ``clone()`` (same values).
* :class:`StateCopier` copies the optimizer state after step :math:`s` on a daemon thread while the
  loop computes the next step's forward and backward (which leave the state alone); the next
  ``optimizer.step()`` waits for the copy before it changes the state, and the writer waits for it
  before writing it.
* :class:`OrderedWorker` runs jobs on one daemon thread, in the order they were submitted, at
  most ``max_queue`` behind; the error of a failed job is raised by the next :meth:`submit`,
  :meth:`check`, :meth:`flush` or :meth:`close`, and later jobs are not run.
* :class:`QueueBudget` bounds what waits for a background thread by count and by bytes: a step
  waits until fewer than ``max_steps`` are queued and its bytes fit under ``max_bytes`` with those
  queued (a step is always let in when nothing is queued, so a step larger than the budget waits
  for an empty queue instead of forever).
* :class:`Handoff` gives a set of pool buffers back once each of its readers said it is done with
  it: a dense store's copy of :math:`\theta_{s+1}` is read by the writer (the step file) and by the
  update audit of the next step, in either order.
* :func:`audit_job` wraps one step of :class:`~explaind.trajectory._audit.UpdateAudit` so an
  in-memory run can run it on such a thread: the gradients the optimizer saw are copied on the hot
  path, the replay of the update and its float64 norms run later, in step order, with the same
  arithmetic (the audit values are identical to an inline audit). With a store the audit runs at
  the step instead (:class:`AuditResult`), which needs no copy of :math:`\theta_s` beyond the one
  already made for the store.
"""

from __future__ import annotations

import logging
import math
import numbers
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..exceptions import ConfigError, TrajectoryError
from ..recurrence import LinearUpdate
from ._audit import UpdateAudit
from ._io import tensor_bytes

__all__ = ["AuditResult", "CopyPool", "Handoff", "OrderedWorker", "QueueBudget", "StateCopier",
           "WarmBuffers", "audit_job", "check_queue_bounds"]

logger = logging.getLogger(__name__)

#: seconds between a :class:`WarmBuffers` thread's looks at its stop flag while its queue is full
WARM_POLL_S = 0.1


class CopyPool:
    """Copies of tensors in buffers that are reused once released (thread-safe).

    A buffer is reused only for a tensor of the same key, shape, dtype and device; a buffer must
    be released by the last code that reads it, exactly once.
    """

    def __init__(self) -> None:
        self._free: dict[str, list[Tensor]] = {}
        self._lock = threading.Lock()

    def copy(self, key: str, src: Tensor) -> Tensor:
        """A copy of ``src`` (detached) in a free buffer of ``key``, or a new one."""
        src = src.detach()
        with self._lock:
            free = self._free.get(key)
            buf = None
            while free:
                cand = free.pop()
                if cand.shape == src.shape and cand.dtype == src.dtype and cand.device == src.device:
                    buf = cand
                    break
        if buf is None:
            return src.clone()
        return buf.copy_(src)

    def buffer(self, key: str, like: Tensor) -> Tensor:
        """A free buffer of ``key`` shaped like ``like`` (contents undefined), or new (uninitialised) memory."""
        with self._lock:
            free = self._free.get(key)
            while free:
                cand = free.pop()
                if cand.shape == like.shape and cand.dtype == like.dtype and cand.device == like.device:
                    return cand
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)

    def copies(self, prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`copy` of every tensor, keyed ``prefix + name``."""
        return {n: self.copy(prefix + n, t) for n, t in tensors.items()}

    def trim(self) -> int:
        """Drop every free buffer (the next copies are new ones); returns the bytes dropped.

        For a moment that needs the memory more than the copies need speed: the recorder trims before
        a gradient check, whose recomputed activations then take the place of the idle buffers.
        """
        with self._lock:
            free, self._free = self._free, {}
        return tensor_bytes(t for bufs in free.values() for t in bufs)

    def release(self, prefix: str, tensors: dict[str, Tensor]) -> None:
        """Give the buffers of :meth:`copies` back (their contents may be overwritten from now on)."""
        with self._lock:
            for n, t in tensors.items():
                self._free.setdefault(prefix + n, []).append(t)


class Handoff:
    """Buffers of a :class:`CopyPool` released once ``readers`` calls of :meth:`done` were made (thread-safe).

    Parameters
    ----------
    pool : CopyPool
        Where the buffers go back.
    prefix : str
        Their pool key prefix (``"param."``).
    tensors : dict of str to Tensor
        The buffers (from :meth:`CopyPool.copies` with ``prefix``).
    readers : int
        How many readers must call :meth:`done` (at least 1).
    """

    def __init__(self, pool: CopyPool, prefix: str, tensors: dict[str, Tensor], readers: int):
        self._pool, self._prefix, self._tensors = pool, prefix, tensors
        self._left = max(1, int(readers))
        self._lock = threading.Lock()

    def done(self) -> None:
        """One reader is done; the last one gives the buffers back (later calls do nothing)."""
        with self._lock:
            if self._left == 0:
                return
            self._left -= 1
            last = self._left == 0
        if last:
            self._pool.release(self._prefix, self._tensors)


class WarmBuffers:
    """Sets of zero-filled tensors shaped like ``like``, made ahead by a daemon thread (CPU tensors only).

    Parameters
    ----------
    like : dict of str to Tensor
        The tensors whose copies are wanted (shapes and dtypes; those on another device are cloned).
    depth : int
        Sets kept ready, at most (each holds one copy of every CPU tensor of ``like``).
    """

    def __init__(self, like: dict[str, Tensor], depth: int = 2):
        self._specs = {n: (tuple(t.shape), t.stride(), t.dtype) for n, t in like.items() if t.device.type == "cpu"}
        self._ready: queue.Queue[dict[str, Tensor]] = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.misses = 0  # copies made with clone() because no set was ready
        if self._specs:
            self._thread = threading.Thread(target=self._fill, name="explaind-warm-buffers", daemon=True)
            self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                # zero_() touches every page here, not on the training loop's thread
                bufs = {n: torch.empty_strided(shape, stride, dtype=dtype).zero_()
                        for n, (shape, stride, dtype) in self._specs.items()}
                while not self._stop.is_set():
                    try:
                        self._ready.put(bufs, timeout=WARM_POLL_S)
                        break
                    except queue.Full:
                        continue
        except Exception:  # out of memory here: the loop's thread clones instead
            logger.debug("Allocating warm buffers failed; theta is cloned on the loop's thread.", exc_info=True)

    def take(self) -> dict[str, Tensor]:
        """A ready set of buffers (name to buffer), or ``{}`` when none is ready (counted in :attr:`misses`)."""
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            if self._specs:
                self.misses += 1
            return {}

    @staticmethod
    def fits(buf: Tensor | None, t: Tensor) -> bool:
        """Whether ``buf`` of a ready set can hold a copy of ``t`` (same shape, strides and dtype, on the CPU)."""
        return (buf is not None and buf.shape == t.shape and buf.stride() == t.stride() and buf.dtype == t.dtype
                and t.device.type == "cpu")

    def copies(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Detached copies of ``tensors`` (same keys as ``like``): into a ready set where there is one, else clones."""
        bufs = self.take()
        out = {}
        for name, t in tensors.items():
            buf = bufs.get(name)
            out[name] = buf.copy_(t.detach()) if self.fits(buf, t) else t.detach().clone()
        return out

    def close(self) -> None:
        """Stop the thread and drop the sets not handed out.

        The sets are dropped before the join too: a thread waiting to hand one over (up to 0.1 s
        between its looks at the stop flag, :data:`WARM_POLL_S`) then finds room at once and stops, so closing takes a
        set's allocation at most, not the thread's wait.
        """
        self._stop.set()
        self._drain()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                return


class StateCopier:
    """Tensor copies made in submission order on one background thread, each job with its ``Future``.

    Used for the optimizer state after a step: its tensors change only inside ``optimizer.step()``,
    so a copy started when a step returns and awaited (:meth:`wait`) before the next step begins
    holds exactly the state after the step. The thread starts with the first copy.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future | None = None

    def submit(self, pairs: list[tuple[Tensor, Tensor]]) -> Future:
        """Copy each ``source`` into its ``destination`` (``[(destination, source), ...]``) on the thread."""

        def run() -> None:
            for dst, src in pairs:
                dst.copy_(src)

        return self.run([run])

    def run(self, jobs: list[Callable[[], None]]) -> Future:
        """Run ``jobs`` in order on the thread, after what was submitted before (e.g. an adapter's deferred
        coefficients, computed from the state after the step: :mod:`~explaind.trajectory._coefficients`)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explaind-state-copy")

        def run() -> None:
            for job in jobs:
                job()

        self._last = self._pool.submit(run)
        return self._last

    def wait(self) -> None:
        """Wait until every copy submitted so far is finished (a failed copy is raised by whoever reads it)."""
        last = self._last
        if last is not None:
            wait([last])

    def close(self) -> None:
        """Finish the copies submitted and stop the thread (a later :meth:`submit` starts a new one)."""
        pool, self._pool, self._last = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=True)


class OrderedWorker:
    """Runs jobs in submission order on one daemon thread (or inline when ``background=False``).

    Parameters
    ----------
    name : str
        Thread name (shown in tracebacks and debuggers).
    background : bool
        Run jobs on the thread; ``False`` runs each job inside :meth:`submit`.
    max_queue : int
        Jobs submitted and not yet finished, at most; a further :meth:`submit` waits.
    """

    def __init__(self, name: str, *, background: bool = True, max_queue: int = 4):
        self._error: BaseException | None = None
        self._failed = False  # a job failed: the later ones are not run
        self._queue: queue.Queue[Callable[[], None] | None] | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=max(1, int(max_queue)))
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._queue is not None
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if not self._failed:
                    job()
            except BaseException as exc:  # raised by the next check()
                self._error, self._failed = exc, True
            finally:
                self._queue.task_done()

    def check(self) -> None:
        """Raise the error of a failed job, once."""
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` after the jobs submitted before it; raises a failed earlier job's error first."""
        self.check()
        if self._queue is None:
            job()
        else:
            self._queue.put(job)

    def flush(self) -> None:
        """Wait until every submitted job has run; raise a failed job's error."""
        if self._queue is not None:
            self._queue.join()
        self.check()

    def close(self) -> None:
        """Run what is queued, stop the thread and raise a failed job's error (the thread stops either way)."""
        try:
            self.flush()
        finally:
            if self._queue is not None and self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._queue = None


def _is_count(value: Any) -> bool:
    """Whether ``value`` is an integer (a Python or numpy int; not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_queue_bounds(max_queue: Any, max_queue_bytes: Any, default_bytes: int) -> None:
    """Refuse a ``StoreWriter`` queue bound that is no count: ``max_queue >= 1``; ``max_queue_bytes >= 0``,
    ``None`` or ``"default"`` (``default_bytes``).

    Raises
    ------
    ConfigError
        Naming the value, the allowed values and the fix (a :class:`QueueBudget` would clamp it silently).
    """
    if not _is_count(max_queue) or max_queue < 1:
        raise ConfigError(
            f"StoreWriter: max_queue={max_queue!r} is not allowed: it is the number of steps handed to the writer "
            f"and not yet committed. Allowed: an int >= 1. Fix: pass max_queue=1 to write one step at a time, "
            f"or leave the default 4."
        )
    if max_queue_bytes is None or (isinstance(max_queue_bytes, str) and max_queue_bytes == "default"):
        return
    if not _is_count(max_queue_bytes) or max_queue_bytes < 0:
        raise ConfigError(
            f"StoreWriter: max_queue_bytes={max_queue_bytes!r} is not allowed: it bounds the bytes of the steps "
            f"handed to the writer and not yet committed. Allowed: an int >= 0 (0: a step waits until the one "
            f"before it is committed), None (no byte bound) or 'default' ({default_bytes} bytes). Fix: pass one "
            f"of those."
        )


class QueueBudget:
    """How many steps, and how many bytes of their copies, are handed to a background thread and not yet done.

    A step of ``nbytes`` is admitted when ``steps < max_steps`` and either nothing is queued or
    ``queued_bytes + nbytes <= max_bytes``; :meth:`acquire` waits until it is. Thread-safe.

    Parameters
    ----------
    max_steps : int
        Steps queued at most (at least 1).
    max_bytes : int or None
        Bytes queued at most, unless a single step is larger (``None``: no byte bound).
    """

    def __init__(self, max_steps: int, max_bytes: int | None):
        self.max_steps = max(1, int(max_steps))
        self.max_bytes = None if max_bytes is None else max(0, int(max_bytes))
        self._room = threading.Condition()
        self.steps = 0
        self.bytes = 0
        self.peak_steps = 0  # the most steps queued at once (for tests and benchmarks)
        self.peak_bytes = 0

    def _fits(self, nbytes: int) -> bool:
        if self.steps >= self.max_steps:
            return False
        return self.steps == 0 or self.max_bytes is None or self.bytes + nbytes <= self.max_bytes

    def wait_for_room(self, nbytes: int) -> None:
        """Wait until a step of ``nbytes`` would be admitted (call before making its copies)."""
        with self._room:
            self._room.wait_for(lambda: self._fits(nbytes))

    def acquire(self, nbytes: int) -> None:
        """Wait until a step of ``nbytes`` is admitted, then count it as queued."""
        with self._room:
            self._room.wait_for(lambda: self._fits(nbytes))
            self.steps += 1
            self.bytes += nbytes
            self.peak_steps = max(self.peak_steps, self.steps)
            self.peak_bytes = max(self.peak_bytes, self.bytes)

    def release(self, nbytes: int) -> None:
        """A step of ``nbytes`` is done: its room is free."""
        with self._room:
            self.steps -= 1
            self.bytes -= nbytes
            self._room.notify_all()


def audit_job(
    auditor: UpdateAudit,
    pool: CopyPool,
    step: int,
    theta: dict[str, Tensor],
    theta_next: dict[str, Tensor],
    grads: dict[str, Tensor | None],
    updates: dict[str, LinearUpdate],
    release_theta: bool,
) -> Callable[[], float]:
    r"""The audit of step ``step`` as a job: :math:`\|E_s\|/\|\Delta\theta_s\|` when called.

    ``grads`` are the gradients the optimizer saw, in buffers the job owns (pool keys
    ``"grad.<name>"``, given back after the audit; the loop may change ``p.grad`` after the step);
    ``theta`` and ``theta_next`` must stay unchanged until the job ran. Jobs must run in step
    order (the audit carries the modelled momentum from step to step). With ``release_theta`` the
    job gives ``theta`` (pool buffers of ``"param."``) back: the audit of step ``s`` is the last
    reader of :math:`\theta_s`.

    Raises
    ------
    TrajectoryError
        When called, if the audit fails (naming the step).
    """
    def run() -> float:
        try:
            value = auditor.step(theta, theta_next, grads, updates)
        except Exception as exc:
            raise TrajectoryError(f"The update audit of step {step} failed: {type(exc).__name__}: {exc}") from exc
        pool.release("grad.", {n: g for n, g in grads.items() if g is not None})
        if release_theta:
            pool.release("param.", theta)
        return value

    return run


@dataclass
class AuditResult:
    r"""A step's audit run at the step: its value and the modelled momentum :math:`m_s` after it.

    ``momentum`` holds the audit's own tensors of that step (the audit makes new ones at every step and
    never writes into old ones), so it can be stored with the optimizer state after later steps ran.
    """

    value: float
    momentum: dict[str, Tensor]

    def take_momentum(self) -> dict[str, Tensor]:
        """The momentum, once: this result keeps no reference to it afterwards (its reader frees it)."""
        momentum, self.momentum = self.momentum, {}
        return momentum


def audit_value(value: float) -> float | None:
    """The audit as a :class:`~explaind.trajectory.manifest.StepRecord` stores it (``None`` for NaN)."""
    return None if math.isnan(value) else value
