"""Atomic file writes (the one place explaind replaces a file on disk) and reads of regular files only.

:func:`atomic_write` writes the new content to a temporary file next to the target, flushes it
(``fsync``, unless asked not to) and moves it over the target with :func:`os.replace`, so a
reader, or a crash at any moment, sees either the old file or the complete new one, never a
mix. The trajectory store, the pruned-model files, run records and the HTML reports all write
through it. :func:`open_regular` and :func:`read_open` read a file that a stranger may have replaced
by a symbolic link, a FIFO or a device: the file is opened without following a link and without
blocking, and only a regular file is read (the store's files, its writer lock, saved attributions).
:func:`write_all` writes a buffer to a descriptor whole, across short writes, and retries a write the
system interrupted (``EINTR``) or found busy (``EAGAIN``) a bounded number of times
(docs/recording.md, "Strangers' files, round 8").
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["atomic_write", "fsync_directory", "open_regular", "read_open", "replace_with", "temporary_path",
           "write_all", "WRITE_RETRIES"]

T = TypeVar("T")

#: times one ``os.write`` interrupted (``EINTR``) or refused as busy (``EAGAIN``) is tried again before it fails
WRITE_RETRIES = 16
#: errors of ``fsync`` on a directory that mean the file system does not flush directories (nothing to do)
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


#: directories named by :func:`_warn_unflushed` in this process (each once)
_UNFLUSHED: set[str] = set()


def _warn_unflushed(directory: str, exc: OSError) -> None:
    if directory in _UNFLUSHED:
        return
    _UNFLUSHED.add(directory)
    logging.getLogger("explaind.io").warning(
        "Cannot open the directory %r to flush it (%s): the files just renamed into it are complete, and a killed "
        "process keeps them, but an operating-system crash or a power loss may lose them. Fix: give the user "
        "running explaind read permission on the directory (chmod u+r).", directory, exc.strerror)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """``fsync`` a directory so that renames inside it survive a power loss.

    Parameters
    ----------
    directory : path-like
        An existing directory. Platforms that cannot open directories are skipped silently, and so
        are file systems that do not flush directories (``fsync`` fails with ``EINVAL``,
        ``ENOTSUP`` or ``EBADF``: they order or persist renames themselves). A directory without read
        permission cannot be opened to be flushed: a warning names it, once per directory and process
        (docs/recording.md, "Strangers' files, round 9").

    Raises
    ------
    OSError
        Any other error of the flush (``EIO``, ``ENOSPC``): the renames may not be durable.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        if os.name == "posix" and exc.errno in (errno.EACCES, errno.EPERM):
            _warn_unflushed(os.fspath(directory), exc)
        return  # elsewhere: platforms without directory fds
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIRECTORY_FSYNC:
            raise naming(exc, directory) from exc
    finally:
        os.close(fd)


def naming(exc: OSError, path: str | os.PathLike[str]) -> OSError:
    """``exc`` naming the file ``path`` where it names none.

    An error of ``os.write``, ``os.fsync`` or ``os.ftruncate`` on a descriptor (``EIO``, ``ENOSPC``) names no
    file; a message built from it must still say which file failed
    (docs/recording.md, "Strangers' files, round 10"). An error that names a file already is returned unchanged.
    """
    if exc.filename is not None:
        return exc
    if exc.errno is None:
        return OSError(f"{exc} ({os.fspath(path)!r})")
    return OSError(exc.errno, exc.strerror, os.fspath(path))


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until all of ``data`` is written to ``fd``.

    A short write continues where it stopped. A write interrupted by a signal (``EINTR``, where the
    signal handler did not raise) or refused as busy (``EAGAIN``, a descriptor in non-blocking mode)
    wrote nothing and is tried again, up to :data:`WRITE_RETRIES` times in a row (waiting 1 ms, then
    doubling up to 50 ms, before an ``EAGAIN`` retry).

    Raises
    ------
    OSError
        The last error, its message naming the retries, when a write fails :data:`WRITE_RETRIES`
        times in a row; any other error at once.
    """
    view, done, failures = memoryview(data), 0, 0
    while done < len(view):
        try:
            done += os.write(fd, view[done:])
            failures = 0
        except (InterruptedError, BlockingIOError) as exc:
            failures += 1
            if failures > WRITE_RETRIES:
                raise type(exc)(exc.errno, f"{exc.strerror} ({failures} times in a row at byte {done} of "
                                           f"{len(view)}; retried {WRITE_RETRIES} times)") from exc
            if isinstance(exc, BlockingIOError):
                time.sleep(min(0.05, 0.001 * 2 ** (failures - 1)))


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, fsync: bool = True,
                 fsync_dir: bool | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically.

    Parameters
    ----------
    path : path-like
        The target file; missing parent directories are created.
    data : bytes or str
        The new content (``str`` is written as UTF-8).
    fsync : bool
        Flush the file to the device before the rename (durability across power loss, not only
        crashes).
    fsync_dir : bool, optional
        Also flush the directory entry after the rename (default: ``fsync``). Callers that commit
        many files into one directory pass ``False`` and call :func:`fsync_directory` once.

    Returns
    -------
    Path
        The target path.

    Notes
    -----
    The temporary file, ``<name>.tmp-<pid>-<thread>``, lies in the target's directory (a rename
    is atomic only within one file system) and is named per process and thread, so concurrent
    writers never share one. It is removed when the write fails.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data

    def write(tmp: Path) -> None:
        try:
            with open(tmp, "wb") as fh:
                fh.write(payload)
                fh.flush()
                if fsync:
                    os.fsync(fh.fileno())
        except OSError as exc:
            raise naming(exc, target) from exc

    replace_with(target, write)
    if fsync if fsync_dir is None else fsync_dir:
        fsync_directory(target.parent)
    return target


def temporary_path(target: Path) -> Path:
    """The temporary file beside ``target`` that an atomic write fills first: ``<name>.tmp-<pid>-<thread>``."""
    return target.with_name(f"{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def replace_with(target: Path, write: Callable[[Path], T]) -> T:
    """Create ``target`` atomically: ``write`` fills a temporary file beside it, which then replaces it.

    The temporary name carries the process and thread, so concurrent writers never share one; it is
    removed when ``write`` or the replacement fails. Returns what ``write`` returns. The caller
    fsyncs the directory when the new name must be durable.
    """
    tmp = temporary_path(target)
    try:
        result = write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def open_regular(path: str | os.PathLike[str],
                 refuse: Callable[[OSError | None], BaseException]) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading, without following a symbolic link and without blocking; a regular file only.

    Parameters
    ----------
    path : path-like
        The file.
    refuse : callable
        Builds the exception to raise, naming the file for the caller's reader: called with the
        :class:`OSError` of the open (``ELOOP``: ``path`` is a symbolic link), or with ``None`` when
        ``path`` is a directory, a FIFO or a device.

    Returns
    -------
    (int, os.stat_result)
        The open file descriptor (the caller closes it) and its ``fstat``.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise refuse(exc) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise refuse(None)
    return fd, info


def read_open(fd: int, max_bytes: int) -> bytes:
    """Read an open file to its end, but never more than ``max_bytes + 1`` bytes (one more shows a file that grew)."""
    chunks, left = [], max_bytes + 1
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
