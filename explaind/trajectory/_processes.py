"""Which process records: a recorder in a process forked from the recording one, and the writer lock's holder.

A recorder records in the process that entered ``with rec:``. A process forked from it (``os.fork()``, a
``multiprocessing`` fork worker, a DataLoader worker) holds a copy of the recorder without its threads: the
gradient check's copier and the store's writer do not exist there, so an ``optimizer.step()`` in the child would
wait for them forever, and leaving ``with rec:`` there would wait for a writer thread that is not there or, without
background writes, write the parent's store from a second process. :func:`refuse_step_in_fork` turns the step into
a :class:`~explaind.exceptions.TrajectoryError` naming both processes and the fix; :func:`left_in_fork` makes
``__exit__`` in the child leave the store to the parent (a warning says so).

The writer lock (:mod:`~explaind.trajectory.lock`) names its holder by process id and host name, which does not
tell a live holder from a dead one whose process id was given to another process (a container restarted, the
process id reused) nor from one in another PID namespace on the same host name (two containers sharing the host's
network and a volume). The writer therefore also holds an ``flock`` on the lock file for as long as it writes
(:func:`hold`), and the lock records that it does (``"flock": true``): the kernel drops such a lock when its
process ends, however it ends, so :func:`flock_held` says whether a holder is alive on this machine whatever its
process id or namespace. A process forked while the lock is held closes its inherited descriptor at once
(:mod:`~explaind.trajectory.lock`), so a worker that outlives the writer does not keep the store locked. See
docs/recording.md, "Processes, permissions and versions, round 13".
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

try:
    import fcntl
except ImportError:  # not a POSIX system: locks are judged by process id and host only
    fcntl = None  # type: ignore[assignment]

from ..exceptions import TrajectoryError

__all__ = ["flock_held", "hold", "left_in_fork", "mark_owner", "refuse_step_in_fork"]

logger = logging.getLogger(__name__)


def mark_owner(recorder: Any) -> None:
    """Remember the process that enters ``with rec:`` (the one that records)."""
    recorder._owner_pid = os.getpid()


def _forked_from(recorder: Any) -> int | None:
    """The recording process's id when this process is a fork of it, else ``None``."""
    owner = getattr(recorder, "_owner_pid", None)
    return owner if owner is not None and owner != os.getpid() else None


def _where(recorder: Any) -> str:
    store = getattr(recorder, "_store", None)
    return "in memory" if store is None else f"into the trajectory store {str(store)!r}"


def refuse_step_in_fork(recorder: Any) -> None:
    """Raise when ``optimizer.step()`` runs in a process forked from the recording one.

    Raises
    ------
    TrajectoryError
        Naming this process, the recording one and the fix.
    """
    owner = _forked_from(recorder)
    if owner is None:
        return
    raise TrajectoryError(
        f"optimizer.step() ran in process {os.getpid()}, forked from process {owner}, which records "
        f"{_where(recorder)}. A recorder records only in the process that entered `with rec:`: its threads (the "
        f"gradient check's, the store writer's) do not exist in a forked process, and a second process must not "
        f"write the store. Fix: "
        f"train only in the recording process; end a forked child with os._exit() before it reaches the training "
        f"loop (multiprocessing's workers do); to record a run in the child, create a TrajectoryRecorder there with "
        f"a store of its own.")


def left_in_fork(recorder: Any) -> bool:
    """``__exit__`` in a forked process: leave the store to the recording process, with a warning.

    Returns whether this process is such a fork (then ``__exit__`` does nothing else: no step is committed, no
    manifest written, the lock kept for the recording process).
    """
    owner = _forked_from(recorder)
    if owner is None:
        return False
    recorder._active = False
    logger.warning("Process %d, forked from process %d, left `with rec:` of a TrajectoryRecorder recording %s; the "
                   "recording is left to process %d (nothing is written from here). Fix: end a forked child with "
                   "os._exit() before it leaves the block.", os.getpid(), owner, _where(recorder), owner)
    return True


def _flock(fd: int, operation: int) -> bool | None:
    """``flock(fd, operation | LOCK_NB)``: ``True`` when taken, ``False`` when another holder has it, ``None`` when
    this system or file system has no ``flock``."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def hold(fd: int) -> bool:
    """Take an exclusive ``flock`` on the open lock file ``fd`` (before it is linked into place); whether taken.

    A file system without ``flock`` (some network file systems refuse it) keeps the lock without it: its holder is
    then judged by process id and host, as before.
    """
    return fcntl is not None and _flock(fd, fcntl.LOCK_EX) is True


def flock_held(fd: int) -> bool | None:
    """Whether a live process holds the ``flock`` of the open lock file ``fd`` (``None``: this file system cannot
    tell). A process that ended, however it ended, holds none."""
    taken = None if fcntl is None else _flock(fd, fcntl.LOCK_SH)
    if taken:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
    return None if taken is None else not taken
