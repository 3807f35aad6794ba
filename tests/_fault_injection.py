"""Simulated kills for the store's fault-injection tests (tests/test_store_faults.py).

:class:`Injector` wraps every operation that changes a file under one directory — ``open`` for
writing, each ``write`` (before it, and torn after half of its bytes), ``os.fsync``,
``os.replace``, ``os.link``, ``os.unlink``, ``os.mkdir``, ``os.rmdir``, ``os.open`` with a
creating flag and, on a descriptor it opened so, ``os.write`` (torn too) and ``os.ftruncate`` — and
numbers them. With ``kill_at=k`` the k-th raises :class:`Killed` and so does
every later one, so nothing after the kill point reaches the disk (cleanup code included), as
after a real SIGKILL. Files are written unbuffered, so what a write returned is on disk. With
``error=True`` the k-th operation fails with ``OSError`` (a full disk) instead, once, and the
program goes on.
"""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path


class Killed(BaseException):
    """The simulated kill (a BaseException, so no ``except Exception`` in the library catches it)."""


class _File:
    """A file opened for writing under the watched directory: every write is a kill point."""

    def __init__(self, raw, injector: Injector):
        self._raw, self._inj = raw, injector

    def write(self, data):
        self._inj.event("write")
        self._inj.event("write-torn", lambda: self._raw.write(data[: len(data) // 2]))
        return self._raw.write(data)

    def flush(self):
        self._inj.check()

    def close(self):
        self._raw.close()  # the kernel closes a killed process's files; nothing is buffered

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Injector:
    """Counts the write operations under ``root`` and kills at the ``kill_at``-th (see the module docstring)."""

    def __init__(self, monkeypatch, root: Path):
        self.root = os.fspath(root)
        self.active = False
        self.kill_at: int | None = None
        self.error = False
        self.events: list[str] = []
        self.dead = False
        real = {name: getattr(os, name) for name in ("replace", "link", "unlink", "mkdir", "rmdir", "open", "fsync",
                                                     "write", "ftruncate", "close")}
        watched: set[int] = set()  # descriptors os.open gave out for writing under root
        real_open = builtins.open

        def on_path(name, path_arg):
            def wrapper(*args, **kwargs):
                if self.active and self._mine(args[path_arg]):
                    self.event(f"{name} {os.path.relpath(args[path_arg], self.root)}")
                return real[name](*args, **kwargs)
            return wrapper

        for name, arg in (("replace", 1), ("link", 1), ("unlink", 0), ("mkdir", 0), ("rmdir", 0)):
            monkeypatch.setattr(os, name, on_path(name, arg))

        def os_open(path, flags, *args, **kwargs):
            mine = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and self._mine(path)
            if self.active and mine:
                self.event(f"open {os.path.relpath(path, self.root)}")
            fd = real["open"](path, flags, *args, **kwargs)
            if mine:
                watched.add(fd)
            return fd

        def os_write(fd, data):
            if self.active and fd in watched:
                self.event("write")
                self.event("write-torn", lambda: real["write"](fd, memoryview(data)[: len(data) // 2]))
            return real["write"](fd, data)

        def os_ftruncate(fd, length):
            if self.active and fd in watched:
                self.event("ftruncate")
            return real["ftruncate"](fd, length)

        def os_close(fd):
            watched.discard(fd)
            return real["close"](fd)

        def fsync(fd):
            if self.active:
                self.event("fsync")
            return real["fsync"](fd)

        def open_(file, mode="r", *args, **kwargs):
            if self.active and isinstance(file, str | os.PathLike) and set(mode) & set("wax+") and self._mine(file):
                self.event(f"create {os.path.relpath(file, self.root)}")
                return _File(real_open(file, mode if "b" in mode else mode + "b", buffering=0), self)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "write", os_write)
        monkeypatch.setattr(os, "ftruncate", os_ftruncate)
        monkeypatch.setattr(os, "close", os_close)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(builtins, "open", open_)

    def _mine(self, path) -> bool:
        path = os.fspath(path)
        return path == self.root or path.startswith(self.root + os.sep)

    def start(self, kill_at: int | None = None, *, error: bool = False) -> None:
        """Count from zero (and kill at ``kill_at``, or fail there with ``error``)."""
        self.events, self.kill_at, self.dead, self.active, self.error = [], kill_at, False, True, error

    def stop(self) -> None:
        """The process is gone: later operations run normally again."""
        self.active = False

    def check(self) -> None:
        if self.active and self.dead:
            raise Killed("after the kill")

    def event(self, what: str, torn=None) -> None:
        """One kill point; ``torn`` runs when it is the kill (half a write reaches the disk)."""
        self.check()
        self.events.append(what)
        if len(self.events) - 1 == self.kill_at:
            if self.error:
                raise OSError(errno.ENOSPC, f"No space left on device (injected at {what})")
            if torn is not None:
                torn()
            self.dead = True
            raise Killed(what)
