"""One writer per store: an advisory lock file holding the writer's process id and host.

:class:`WriterLock` creates ``.explaind-writer.lock`` in the store atomically (a hard link, or
``O_CREAT | O_EXCL`` where links are not supported), so of two recorders started together on one
store exactly one gets it; the other gets a :class:`~explaind.exceptions.TrajectoryError` naming
the holder. A lock whose holder is gone — a process on this host that no longer runs, or this
process after a writer that was dropped without being closed, or a lock copied with the store into
another directory (it names the directory it was taken in) — is stale and taken over. A lock
held on another host is never taken over automatically; the message says how to remove it. The writer also
holds an ``flock`` on the lock file while it writes (the lock says ``"flock": true``): where the lock has one, a
free ``flock`` makes it stale and a held one live, whatever its process id says (a process id reused after a
container restart, a writer in another PID namespace on the same host name;
:mod:`~explaind.trajectory._processes`). The
lock appears with its content in one step (a hard link of a complete temporary file), so a crash
never leaves an empty one. Only a regular file is read as a lock: a symbolic link, a directory or a
FIFO in its place is an error naming it (it is never followed, and reading it never blocks).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import weakref
from pathlib import Path

from .._io import open_regular, write_all
from ..exceptions import TrajectoryError
from ._interrupts import close_abandoned
from ._processes import flock_held, hold

__all__ = ["LOCK", "WriterLock", "live_writer"]

LOCK = ".explaind-writer.lock"
#: A lock file still empty after this many seconds is a crash between its creation and its content.
_EMPTY_GRACE = 10.0
#: Largest process id a lock may name (``pid_t`` is a signed 32-bit integer).
_MAX_PID = 2**31 - 1
#: Locks this process holds, by real path of the store (a lock whose writer was dropped is stale).
_ACTIVE: weakref.WeakValueDictionary[str, WriterLock] = weakref.WeakValueDictionary()
#: Locks whose file this process holds open with its flock (also one whose writer is gone but not yet collected).
_OPEN: weakref.WeakSet[WriterLock] = weakref.WeakSet()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _directory_id(directory: Path) -> list[int] | None:
    """``[st_dev, st_ino]`` of the store directory: the same directory under any path, another one for a copy."""
    try:
        info = os.stat(directory)
    except OSError:
        return None
    return [info.st_dev, info.st_ino]


def _foreign_lock(path: Path, what: str) -> TrajectoryError:
    return TrajectoryError(
        f"The writer lock {str(path)!r} of the trajectory store {str(path.parent)!r} is {what}, not the lock file "
        f"explaind writes, so whether another recorder writes the store cannot be told; nothing was read from it "
        f"and nothing was recorded. If no recording runs on this store, delete it (rm -r {str(path)!r}) and record "
        f"again."
    )


def _read_lock(path: Path) -> tuple[bytes, bool | None] | None:
    """The first 4096 bytes of the lock file and whether a live process holds its ``flock``
    (:func:`~explaind.trajectory._processes.flock_held`), ``None`` when there is none.

    Only a regular file is read: a symbolic link, a directory, a FIFO or a device in its place is a
    :class:`~explaind.exceptions.TrajectoryError` (opened without following links and without
    blocking, so a FIFO cannot hang the recorder nor ``/dev/zero`` fill its memory).
    """
    def refuse(exc: OSError | None) -> TrajectoryError:
        if exc is None:
            return _foreign_lock(path, "not a regular file (a directory, a FIFO or a device)")
        return _foreign_lock(path, "a symbolic link" if exc.errno == errno.ELOOP
                             else f"a file that cannot be opened ({exc.strerror})")

    try:
        fd, _ = open_regular(path, refuse)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, 4096), flock_held(fd)
    finally:
        os.close(fd)


def _parsed(raw: bytes) -> dict | None:
    """The lock's JSON when it is what explaind writes (a process id that a process can have, a host name), else
    ``None`` (an empty or half-written file, or a stranger's: not JSON, nested deeper than the parser goes, a
    process id of 0, negative, ``true`` or past what ``kill`` takes)."""
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError: not UTF-8 or not JSON
        return None
    if not isinstance(info, dict):
        return None
    pid = info.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= _MAX_PID or not isinstance(
            info.get("host"), str):
        return None
    return info


def _holder(path: Path) -> dict | None:
    """The lock's content, or ``None`` when it is stale (its holder is gone, or it was copied with the store)."""
    read = _read_lock(path)
    if read is None:
        return None
    raw, held = read
    info = _parsed(raw)
    if info is None:  # not (yet) a lock explaind writes: being written, or a crash or a stranger left it
        try:
            age = time.time() - os.lstat(path).st_mtime
        except FileNotFoundError:
            return None
        # abs(): a file from the future (a clock set back, a copy from a host whose clock runs ahead) is not new
        return None if abs(age) >= _EMPTY_GRACE else {"pid": "?", "host": "?", "since": "just now"}
    pid, host = info["pid"], info["host"]
    if host != socket.gethostname():
        return info
    taken_in, here = info.get("directory"), _directory_id(path.parent)
    if isinstance(taken_in, list) and here is not None and taken_in != here:
        return None  # the lock of another directory: copied (cp -r) with a store that was being written
    if info.get("flock") is True and held is not None:  # its writer holds an flock: the kernel says if it lives
        return _flocked(path, info, held)
    if pid == os.getpid():
        if close_abandoned(os.path.realpath(path.parent)):  # its recorder collected without __exit__: now unlocked
            stale = _ACTIVE.get(os.path.realpath(path.parent))  # a writer without a thread, collected with it
            None if stale is None else stale.release()
        return info if os.path.realpath(path.parent) in _ACTIVE else None
    return info if _alive(pid) else None


def _flocked(path: Path, info: dict, held: bool) -> dict | None:
    """The holder of a lock whose writer holds its ``flock`` while it writes: ``None`` when no live process holds it
    (its writer ended however it ended, also when its process id now belongs to another process); otherwise the
    holder, also when its process id is not one of this PID namespace (a container sharing this host's name)."""
    if not held:
        return None
    if info["pid"] == os.getpid():
        key = os.path.realpath(path.parent)
        if close_abandoned(key):
            stale = _ACTIVE.get(key)
            None if stale is None else stale.release()
            return None
        if key in _ACTIVE:
            return info
        if _drop_own(path):  # this process's lock, its writer gone (not taken, or dropped): as before, stale
            return None
    if info["pid"] == os.getpid() or not _alive(info["pid"]):
        return {**info, "elsewhere": True}
    return info


def _drop_own(path: Path) -> bool:
    """Close this process's descriptors of the lock file ``path`` (their flock goes with them): the locks of writers
    gone without releasing them (the store's key is not in ``_ACTIVE``); whether there were any."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    found = False
    for lock in list(_OPEN):
        fd = lock._fd
        if fd is not None:  # its key no longer in _ACTIVE (checked by the caller): its writer is gone
            with contextlib.suppress(OSError):
                mine = os.fstat(fd)
                if (mine.st_dev, mine.st_ino) == (info.st_dev, info.st_ino):
                    lock.held = False
                    lock._close()
                    found = True
    return found


def _forget_in_child() -> None:
    """In a process just forked: close the inherited descriptors of this process's locks. The recording process
    keeps their flock (it has its own descriptor), and a forked worker that outlives it does not keep the store
    locked."""
    for lock in list(_OPEN):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def live_writer(root: Path) -> dict | None:
    """The holder of the store's lock when a writer is alive, else ``None``."""
    return _holder(Path(root) / LOCK)


def busy_message(root: Path, info: dict) -> str:
    # a recorder of this process still open (a loop left without `with rec:` ending); a lock of another host that
    # names the same process id (a store checked in or synced while recorded) is another machine's
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        return (f"The trajectory store {str(root)!r} is being written by process {os.getpid()} (this one, since "
                f"{info.get('since')}): a second writer would corrupt it. A TrajectoryRecorder of this process has it "
                f"open: finish its `with rec:` block first; if that block was left without __exit__ (an abandoned "
                f"generator loop, rec.__enter__() called by hand), exit that recorder (rec.__exit__(None, None, None)) "
                f"and then resume the store; or choose another store path.")
    if info.get("elsewhere"):  # its flock is held, by no process of this PID namespace with its process id
        return (f"The trajectory store {str(root)!r} is being written by a live process: the writer lock "
                f"{str(Path(root) / LOCK)!r} is held (flock) by process {info.get('pid')} of another PID namespace on "
                f"host {info.get('host')!r} (a container sharing this host's name, since {info.get('since')}); a "
                f"second writer would corrupt it. Wait for that recording to end, or choose another store path.")
    return (f"The trajectory store {str(root)!r} is being written by process {info.get('pid')} on host "
            f"{info.get('host')!r} (since {info.get('since')}); a second writer would corrupt it. Wait for that "
            f"recording to finish, or choose another store path. If that process is gone (e.g. on another host), "
            f"delete {str(Path(root) / LOCK)!r}.")


class WriterLock:
    """The store's writer lock, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.path = self.root / LOCK
        self.key = os.path.realpath(self.root)
        self.held = False
        self._fd: int | None = None  # the lock file, open with its flock while held

    def acquire(self) -> WriterLock:
        """Take the lock (a stale one is taken over).

        Raises
        ------
        TrajectoryError
            When a live writer holds it.
        """
        content = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "directory": _directory_id(self.root)}
        for _ in range(3):
            try:
                self._create(content)
            except FileExistsError:
                info = _holder(self.path)
                if info is not None:
                    raise TrajectoryError(busy_message(self.root, info)) from None
                self.path.unlink(missing_ok=True)
                continue
            except BaseException:  # after the link (a kill, EIO removing the temporary file): not taken, flock freed
                self._close()
                raise
            _ACTIVE[self.key] = self
            self.held = True
            return self
        raise TrajectoryError(f"Could not take the writer lock {str(self.path)!r}: it keeps reappearing. Another "
                              f"writer is starting on this store; choose another store path.")

    def _create(self, content: dict) -> None:
        """Create the lock file with its content in one step (a hard link of a complete temporary file).

        A crash therefore never leaves an empty lock; where hard links are not supported the file
        is created with ``O_EXCL`` and then written.

        Raises
        ------
        FileExistsError
            When the lock exists.
        """
        tmp = self.path.with_name(f"{LOCK}.tmp-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            # the flock before the link: the lock appears with it held, and says so only where it is
            write_all(fd, json.dumps({**content, "flock": hold(fd)}).encode())
            os.link(tmp, self.path)
            self._fd, fd = fd, -1
            _OPEN.add(self)
            return
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system
            pass
        finally:  # a failure to remove it (EIO, EROFS) must not hide a lock taken: the next open removes it
            None if fd < 0 else os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            write_all(fd, json.dumps({**content, "flock": hold(fd)}).encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _OPEN.add(self)

    def _close(self) -> None:
        """Close the lock file's descriptor: its flock goes with it."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        """Collected while held (its writer dropped without closing it): the flock goes with the descriptor, so
        the lock is stale for everyone, as the process's own check finds it (no longer in ``_ACTIVE``)."""
        self._close()

    def release(self) -> None:
        """Drop the lock (only if held by this object)."""
        if not self.held:
            return
        self.held = False
        _ACTIVE.pop(self.key, None)
        try:
            read = _read_lock(self.path)
            info = _parsed(read[0] if read is not None else b"{}")
            if info is not None and info["pid"] == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):  # ValueError: TrajectoryError too
            pass
        finally:  # after the unlink: the flock goes with the last descriptor
            self._close()
