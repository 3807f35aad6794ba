"""Atomic file writes: the one place explaind replaces a file on disk.

:func:`atomic_write` writes the new content to a temporary file next to the target, flushes it
(``fsync``, unless asked not to) and moves it over the target with :func:`os.replace`, so a
reader, or a crash at any moment, sees either the old file or the complete new one, never a
mix. The trajectory store, the pruned-model files, run records and the HTML reports all write
through it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["atomic_write", "fsync_directory", "replace_with", "temporary_path"]

T = TypeVar("T")


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """``fsync`` a directory so that renames inside it survive a power loss.

    Parameters
    ----------
    directory : path-like
        An existing directory. Platforms that cannot open directories are skipped silently.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


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
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())

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
