"""What an interruption from the user's own loop leaves of a store (docs/recording.md, "Interruptions from the loop,
round 11").

* :func:`refuse_second_run`: a second ``with rec:`` on a recorder that already recorded is refused before anything is
  written (on a store it used to set the store up again as a new run over the first one's files, which no reader
  could then read).
* :func:`watch_writer`: a recorder that is never exited is exited at interpreter exit (``sys.exit()`` in a loop that
  entered it by hand), and one garbage-collected without ``__exit__`` commits the steps it handed to the background
  writer and gives the writer lock back, each with a warning; before, the steps queued for the writer were lost at
  exit, and the lock of a collected recorder stayed held by the live process, so that no recorder of that process
  could resume the store.
* :func:`journal_identity` and :func:`check_journal`: a store directory deleted (or its journal replaced) while
  recording is an error at the next step naming the journal; before, the writer went on into the deleted journal
  and a directory made anew, and the store it left lacked its start files and the earlier steps without a word.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Any

from ..exceptions import TrajectoryError

logger = logging.getLogger(__name__)

#: recorders that opened a store (a second ``with rec:`` on them is refused)
_OPENED: weakref.WeakSet[Any] = weakref.WeakSet()
#: recorders that opened a store, with the process that opened it (closed at interpreter exit if still inside `with`)
_OPEN: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def refuse_second_run(recorder: Any, store: Path | None, in_memory: bool) -> None:
    """Refuse a second ``with rec:`` on ``recorder`` once it recorded (in memory: ``in_memory``; a store: opened).

    Raises
    ------
    TrajectoryError
        Naming the store and the fix (a new recorder, with ``resume=True`` to go on).
    """
    if store is None and in_memory:
        raise TrajectoryError("An in-memory recorder records one run; create a new TrajectoryRecorder.")
    if store is not None and recorder in _OPENED:
        raise TrajectoryError(
            f"This recorder already recorded into the trajectory store {str(store)!r}; a second `with rec:` would "
            f"start a new run over it. To go on recording that run, create a new "
            f"TrajectoryRecorder(..., store={str(store)!r}, resume=True) and call rec.restore() before `with rec:`.")


def watch_writer(recorder: Any, writer: Any, store: Path) -> None:
    """Close ``recorder`` should the interpreter exit, or ``writer`` should ``recorder`` die, without ``__exit__``."""
    _OPENED.add(recorder)
    _OPEN[recorder] = os.getpid()
    weakref.finalize(recorder, _close_unexited, writer, str(store), os.getpid()).atexit = False


def _exit_open_recorders() -> None:
    """At interpreter exit: ``__exit__`` every recorder of this process still inside ``with rec:``, as interrupted.

    Run by ``threading``'s exit hooks, before ``concurrent.futures`` refuses new work (the writer's file I/O needs
    it) and before ``atexit``. A process forked from the recording one leaves the recorders alone.
    """
    for recorder, pid in list(_OPEN.items()):
        if pid != os.getpid() or not getattr(recorder, "_active", False):
            continue
        logger.warning(
            "The TrajectoryRecorder writing %r was not exited (the interpreter is exiting inside `with rec:`, e.g. "
            "through sys.exit() in a loop that called rec.__enter__() by hand); it is exited now and the store "
            "closed as an interrupted run. Resume it with TrajectoryRecorder(..., resume=True) and rec.restore().",
            str(recorder._store))
        try:
            recorder.__exit__(SystemExit, SystemExit("interpreter exit"), None)
        except BaseException:  # an exit hook cannot raise: the store keeps what its journal lists
            logger.exception("Closing the trajectory store %r at interpreter exit failed.", str(recorder._store))


_register = getattr(threading, "_register_atexit", None)  # before concurrent.futures' own exit hook (Python >= 3.9)
(_register or atexit.register)(_exit_open_recorders)


def _close_unexited(writer: Any, store: str, pid: int) -> None:
    """The finalizer of :func:`watch_writer`: commit what the writer holds, write the manifest, give the lock back.

    A process forked from the recording one (a DataLoader worker, ``os.fork()``) has neither the writer's thread
    nor the store: it leaves both alone.
    """
    if os.getpid() != pid or not writer._writer_lock.held:  # a forked process; exited
        return
    logger.warning(
        "The TrajectoryRecorder writing %r was garbage-collected without __exit__ (`with rec:` left open, e.g. an "
        "abandoned loop); the steps it handed to the store are committed and the store is closed as an interrupted "
        "run. Resume it with TrajectoryRecorder(..., resume=True) and rec.restore().", store)
    try:
        writer.close(complete=False)
    except BaseException:  # a finalizer cannot raise: the store keeps what its journal lists
        logger.exception("Closing the trajectory store %r of a recorder that was not exited failed.", store)


def journal_identity(fd: int) -> tuple[int, int]:
    """The device and inode of the open journal ``fd``."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def check_journal(root: Path, journal: str, identity: tuple[int, int] | None) -> None:
    """Raise unless ``root/journal`` is still the journal the writer opened (``identity``).

    Raises
    ------
    TrajectoryError
        When the store directory or its journal was deleted, moved or replaced while recording.
    """
    if identity is None:
        return
    try:
        st = os.stat(root / journal)
        here: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except FileNotFoundError:
        here = None
    if here != identity:
        raise TrajectoryError(
            f"The journal {str(root / journal)!r} of the trajectory store being recorded "
            f"{'is gone' if here is None else 'was replaced by another file'}: the store directory was deleted, "
            f"moved or replaced while recording. Nothing more is written to it (steps committed to the lost journal "
            f"are not in the directory). Fix: keep the store's directory in place while recording; restore it from "
            f"a copy and resume (TrajectoryRecorder(..., resume=True)), or record the run again "
            f"(TrajectoryRecorder(..., overwrite=True)).")
