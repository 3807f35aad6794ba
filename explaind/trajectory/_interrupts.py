"""What an interruption from the user's own loop leaves of a store.

docs/recording.md, "Interruptions from the loop, round 11", describes each case.

* :func:`refuse_second_run`: a second ``with rec:`` on a recorder that already recorded is refused before anything is
  written (on a store it used to set the store up again as a new run over the first one's files, which no reader
  could then read).
* :func:`watch_writer`: a recorder that is never exited is exited at interpreter exit (``sys.exit()`` in a loop that
  entered it by hand), after a non-daemon thread still inside ``with rec:`` has ended its block, and the writer of one
  garbage-collected without ``__exit__`` commits the steps it was handed and gives the lock back when the next
  recorder of the process opens the store (:func:`close_abandoned`), each with a warning; a daemon thread inside
  ``with rec:`` is stopped at its next step boundary and its store closed as an interrupted run with every recorded
  step (round 14); before, the steps queued
  for the writer were lost at exit, a thread recording past the main thread's exit failed with the thread pools shut
  down, and the lock of a collected recorder stayed held by the live process, so that no recorder of that process
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
import time
import weakref
from pathlib import Path
from typing import Any

from ..exceptions import TrajectoryError

logger = logging.getLogger(__name__)

#: recorders that opened a store (a second ``with rec:`` on them is refused)
_OPENED: weakref.WeakSet[Any] = weakref.WeakSet()


class JournalGoneError(TrajectoryError):
    """The store's journal gone or replaced while recording (:func:`check_journal`): nothing on disk is promised."""


#: per store (its real path): its recorder and writer (weakly), the process and the thread that entered the recorder
_WRITERS: dict[str, tuple[weakref.ref[Any], int, weakref.ref[Any], threading.Thread]] = {}


def refuse_second_run(recorder: Any, store: Path | None, in_memory: bool) -> None:
    """Refuse a second ``with rec:`` on ``recorder`` once it recorded (in memory: ``in_memory``; a store: opened).

    Raises
    ------
    TrajectoryError
        Naming the store and the fix (a new recorder, with ``resume=True`` to go on).
    """
    if store is not None and not threading.main_thread().is_alive():
        raise TrajectoryError(
            f"Recording into {str(store)!r} cannot start: the main thread has exited and the interpreter is shutting "
            f"down, so the thread pools the store's writer uses refuse new work. Fix: keep the main thread alive "
            f"until recording ends (join the thread that records, thread.join(), before the main thread returns).")
    if store is None and in_memory:
        raise TrajectoryError("An in-memory recorder records one run; create a new TrajectoryRecorder.")
    if store is not None and recorder in _OPENED:
        raise TrajectoryError(
            f"This recorder already recorded into the trajectory store {str(store)!r}; a second `with rec:` would "
            f"start a new run over it. To go on recording that run, create a new "
            f"TrajectoryRecorder(..., store={str(store)!r}, resume=True) and call rec.restore() before `with rec:`.")


def watch_writer(recorder: Any, writer: Any, store: Path) -> None:
    """Follow ``recorder`` and its ``writer``: exited at interpreter exit, or closed once found collected."""
    _OPENED.add(recorder)
    for key in [k for k, (_, _, w, _) in _WRITERS.items() if w() is None or not w()._writer_lock.held]:
        del _WRITERS[key]  # closed writers are not kept alive
    _WRITERS[os.path.realpath(store)] = (weakref.ref(recorder), os.getpid(), weakref.ref(writer),
                                         threading.current_thread())  # the thread inside `with rec:`


def close_abandoned(key: str) -> bool:
    """Whether the store ``key`` (a real path) was opened by a recorder of this process that is gone (collected
    without ``__exit__``); its writer, if alive, commits what it was handed and gives the lock back (with a warning).

    Called where the lock of this process is found on a store (:mod:`~explaind.trajectory.lock`), not from the
    garbage collector: a finalizer runs inside whatever the collector interrupted.
    """
    entry = _WRITERS.get(key)
    if entry is None or entry[0]() is not None or entry[1] != os.getpid():
        return False
    del _WRITERS[key]
    writer = entry[2]()
    if writer is not None and writer._writer_lock.held:
        _close(writer, key, "was garbage-collected without __exit__ (`with rec:` left open, e.g. an abandoned loop)")
    return True


def _exit_open_recorders() -> None:
    """At interpreter exit: ``__exit__`` every recorder of this process still inside ``with rec:``, as interrupted,
    and close the writer of each one collected without it.

    Run by ``threading``'s exit hooks, before ``concurrent.futures`` refuses new work (the writer's file I/O needs
    it) and before ``atexit``; a non-daemon thread inside ``with rec:`` is waited for first, until its block ends, so
    that it records to its end while the thread pools still work. A daemon thread inside ``with rec:`` is stopped at
    its next training forward or ``optimizer.step()`` (:func:`_stop_daemon`), so that its own ``__exit__`` keeps every
    step it recorded and closes the store as an interrupted run; one still inside after :data:`DAEMON_WAIT` seconds
    is exited from here. A process forked from the recording one leaves the recorders alone.
    """
    for key, (recorder_ref, pid, writer_ref, thread) in list(_WRITERS.items()):
        if pid == os.getpid() and thread is not threading.current_thread():
            if thread.daemon:
                _stop_daemon(recorder_ref, writer_ref, thread, key)
            else:
                _wait_for(recorder_ref, writer_ref, thread)
    for key, (recorder_ref, pid, writer_ref, thread) in list(_WRITERS.items()):
        recorder, writer = recorder_ref(), writer_ref()
        if pid != os.getpid():
            continue  # a forked process
        if thread is not threading.current_thread() and thread.is_alive():
            if thread.daemon and recorder is not None and getattr(recorder, "_active", False) \
                    and recorder._writer is writer:  # still inside `with rec:` after DAEMON_WAIT: closed from here
                _close(recorder, key, f"was still inside `with rec:` on the daemon thread {thread.name!r} "
                                      f"{DAEMON_WAIT:.0f} s after the interpreter began exiting (a step that long)")
            continue  # a thread that left its block, or a non-daemon thread past PATIENCE
        if recorder is not None and getattr(recorder, "_active", False) and recorder._writer is writer:
            _close(recorder, key, "was not exited (the interpreter is exiting inside `with rec:`, e.g. through "
                                  "sys.exit() in a loop that called rec.__enter__() by hand)")
        elif recorder is None and writer is not None and writer._writer_lock.held:
            _close(writer, key, "was garbage-collected without __exit__ (`with rec:` left open)")


def _wait_for(recorder_ref: weakref.ref[Any], writer_ref: weakref.ref[Any], thread: threading.Thread) -> None:
    """Wait while ``thread`` is inside ``with rec:`` or its ``__exit__`` still closes the writer (not for the thread
    to end: a thread pool's worker never does); give up once the recorder took no step for :data:`PATIENCE` s."""
    last, since = None, time.monotonic()
    while thread.is_alive() and time.monotonic() - since < PATIENCE:
        recorder, writer = recorder_ref(), writer_ref()
        if recorder is None or not (recorder._active or (writer is not None and writer._writer_lock.held)):
            return  # collected (closed below), or exited
        if recorder._n != last:
            last, since = recorder._n, time.monotonic()
        time.sleep(0.01)


#: seconds without a step after which the exit hook stops waiting for a thread inside ``with rec:``
PATIENCE = 30.0

#: seconds the exit hook waits for a daemon thread inside ``with rec:`` to reach its next forward or step and leave
DAEMON_WAIT = 10.0


class _StopAtExit:
    """A forward pre-hook and optimizer step pre-hook that raise in one thread: the daemon thread still recording
    when the interpreter exits."""

    def __init__(self, thread: threading.Thread, store: str) -> None:
        self.thread, self.store = thread, store

    def __call__(self, *args: Any) -> None:
        if threading.current_thread() is self.thread:
            raise TrajectoryError(
                f"The interpreter is exiting (the main thread ended) while this daemon thread "
                f"{self.thread.name!r} records into {self.store!r} inside `with rec:`: a daemon thread is stopped at "
                f"exit, so recording stops here, at a step boundary, and the store keeps every step recorded so far, "
                f"closed as an interrupted run. Fix: join the recording thread before the main thread ends "
                f"(thread.join()), or start it as a non-daemon thread (the exit then waits for its block); resume "
                f"this run with TrajectoryRecorder(..., resume=True) and rec.restore().")


def _stop_daemon(recorder_ref: weakref.ref[Any], writer_ref: weakref.ref[Any], thread: threading.Thread,
                 store: str) -> None:
    """Stop a daemon ``thread`` inside ``with rec:`` at its next training forward or ``optimizer.step()`` (hooks that
    raise in that thread only), and wait up to :data:`DAEMON_WAIT` seconds for its block to end, with a log line.

    Python stops daemon threads at exit wherever they are; before, the exit hook left such a recorder alone and the
    steps it had handed to the store's writer were lost with the writer's queue (1 of 2 returned steps kept, the
    lock file left behind). Raising at a step boundary lets the thread's own ``__exit__`` commit every recorded step.
    """
    recorder = recorder_ref()
    if recorder is None or not recorder._active:
        return
    logger.warning("The interpreter is exiting while the daemon thread %r is inside `with rec:` recording into %r: "
                   "its next training forward or optimizer.step() raises, so that its block ends and the store keeps "
                   "every step recorded so far (closed as an interrupted run); waiting up to %.0f s. Join the "
                   "recording thread before the main thread ends to record the whole run.", thread.name, store,
                   DAEMON_WAIT)
    stop = _StopAtExit(thread, store)
    handles = [recorder.model.register_forward_pre_hook(stop, prepend=True),
               recorder.optimizer.register_step_pre_hook(stop)]
    del recorder
    try:
        deadline = time.monotonic() + DAEMON_WAIT
        while thread.is_alive() and time.monotonic() < deadline:
            recorder, writer = recorder_ref(), writer_ref()
            if recorder is None or not (recorder._active or (writer is not None and writer._writer_lock.held)):
                return  # collected (closed below), or exited
            del recorder, writer
            time.sleep(0.01)
    finally:
        for h in handles:
            h.remove()


def _close(closing: Any, store: str, why: str) -> None:
    """Exit a recorder (as interrupted) or close a writer (``complete=False``), with a warning saying ``why``."""
    logger.warning("The TrajectoryRecorder writing %r %s; the steps it handed to the store are committed and the store "
                   "is closed as an interrupted run. Resume it with TrajectoryRecorder(..., resume=True) and "
                   "rec.restore().", store, why)
    try:
        if hasattr(closing, "__exit__"):
            closing.__exit__(SystemExit, SystemExit("interpreter exit"), None)
        else:
            closing.close(complete=False)
    except BaseException:  # nothing to raise to: the store keeps what its journal lists
        logger.exception("Closing the trajectory store %r of a recorder that was not exited failed.", store)


_register = getattr(threading, "_register_atexit", None)  # before concurrent.futures' own exit hook (Python >= 3.9)
(_register or atexit.register)(_exit_open_recorders)


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
        raise JournalGoneError(
            f"The journal {str(root / journal)!r} of the trajectory store being recorded "
            f"{'is gone' if here is None else 'was replaced by another file'}: the store directory was deleted, "
            f"moved or replaced while recording. Nothing more is written to it (steps committed to the lost journal "
            f"are not in the directory). Fix: keep the store's directory in place while recording; restore it from "
            f"a copy and resume (TrajectoryRecorder(..., resume=True)), or record the run again "
            f"(TrajectoryRecorder(..., overwrite=True)).")
