r"""The store's tensor files, checksummed and written atomically (docs/recording.md, "Recording overhead").

:class:`TensorFileWriter` writes a safetensors file (8-byte header length, JSON header, the
tensors' bytes), takes the checksum of its bytes (:mod:`~explaind.trajectory._checksum`, XXH3-128
unless asked for SHA-256) and writes them the way :func:`explaind._io.atomic_write` does (a
temporary file in the target's directory, ``fsync``, :func:`os.replace`), so a crash leaves the old
file or the whole new one. No serialisation to a fresh ``bytes`` object (each tensor into its own
``bytes``, then all of them into one: two transient copies of the file). Two ways:

* ``direct=True`` (the store's writer), on Linux: the file is laid out in a page-aligned buffer
  kept from file to file, at most :data:`CHUNK` bytes at a time (one copy of each tensor), and
  written with ``O_DIRECT`` (straight to the device), so the new file's pages are neither allocated
  nor written back later by the kernel; ``fsync`` then flushes only the file's size and the
  device's cache. Measured with ``benchmarks/bench_store_writer.py``, this is what a durable write
  costs the CPU least; on this project's 2-core machine, also without ``fsync``: there the page
  cache costs more CPU per byte (its pages allocated and filled by the kernel) than the copy into the
  buffer (docs/recording.md, "Recording overhead").
* ``direct=False``, where the file system refuses ``O_DIRECT`` (``EINVAL``, e.g. some network or
  in-memory file systems; the writer stays with the page cache for the directories that refused)
  or the platform lacks it: the header and then each tensor's bytes are written through the page
  cache from where they are (:func:`_spans`) and hashed there, so the writer's thread copies
  nothing itself (the kernel copies into the page cache, with the GIL released).

Either way each chunk is written by a second thread while the caller hashes it.

A store commits several files at once (the files of the steps queued, "Recording overhead" in
docs/recording.md): ``write(..., staged=files)`` leaves each file under its temporary name, written
but not flushed, and :meth:`TensorFileWriter.settle` then flushes all of them, each ``fsync`` on a
thread of its own, before moving them into place. A file system that journals its metadata (ext4,
XFS) serves concurrent ``fsync`` calls with one journal commit and one flush of the device's cache,
where one file after the other costs one of each per file (``benchmarks/bench_store_commit.py``;
docs/recording.md, "Recording overhead"). Every file is still flushed before it is
renamed, so what a crash or a power loss keeps is unchanged.

The bytes are those of a safetensors file that ``safetensors.torch.load`` reads: tensors ordered
as the safetensors library orders them (by its dtype enum, last first, then by name), contiguous,
the header padded with spaces to a multiple of 8 bytes. Tensors of a dtype outside
:data:`DTYPES` are serialised by the safetensors library and copied into the buffer.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save as st_save
from torch import Tensor

from .._io import fsync_directory, naming, temporary_path
from .._io import write_all as _write_all  # whole, retrying EINTR/EAGAIN (a module name the tests replace)
from ._checksum import DEFAULT, hasher, validate_algorithm
from .manifest import FileRecord

__all__ = ["TensorFileWriter", "Staged", "DTYPES", "layout"]

logger = logging.getLogger(__name__)

#: safetensors' names of the dtypes this module lays out itself, in the order of the library's ``Dtype`` enum
DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
}
_RANK = {dtype: rank for rank, dtype in enumerate(DTYPES)}
#: alignment of the buffer, of the length written with O_DIRECT and of its file offsets
BLOCK = 4096
#: bytes laid out, hashed and written at a time (a multiple of BLOCK): the most the buffer holds
CHUNK = 8 << 20
#: threads that flush staged files at the same time (:meth:`TensorFileWriter.settle`)
FSYNC_THREADS = 8


class Staged(NamedTuple):
    """A file written under its temporary name and still open: ``settle`` flushes it and moves it to ``target``."""

    tmp: Path
    target: Path
    fd: int


def layout(tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[tuple[Tensor, int]]]:
    """The safetensors header of ``tensors`` and where each tensor's bytes go.

    Parameters
    ----------
    tensors : dict of str to Tensor
        On the CPU, contiguous, of a dtype in :data:`DTYPES`.
    metadata : dict of str to str, optional
        The header's ``__metadata__``.

    Returns
    -------
    head : bytes
        The file's first ``8 + N`` bytes: ``N`` (little-endian u64) and the JSON header, padded with
        spaces so that ``8 + N`` is a multiple of 8.
    places : list of (Tensor, int)
        Each tensor with the offset of its bytes in the file.
    """
    order = sorted(tensors, key=lambda k: (-_RANK[tensors[k].dtype], k))  # the library's order
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    spans, end = [], 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [end, end + size]}
        spans.append((t, end))
        end += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, [(t, start + offset) for t, offset in spans]


class TensorFileWriter:
    """Writes checksummed safetensors files atomically through one reused, page-aligned buffer (thread-safe).

    A file is laid out ``CHUNK`` bytes at a time (the buffer never grows past that), each chunk
    hashed and, at the same time on a second thread, written, before the next is filled.

    Parameters
    ----------
    direct : bool
        Try ``O_DIRECT`` (Linux); ``False`` always writes through the page cache.
    checksum : str
        The files' checksum algorithm (:data:`~explaind.trajectory._checksum.ALGORITHMS`).
    """

    def __init__(self, direct: bool = True, checksum: str = DEFAULT) -> None:
        self.checksum = validate_algorithm(checksum)
        self._direct = bool(direct) and hasattr(os, "O_DIRECT")
        self._refused: set[str] = set()  # directories whose file system refused O_DIRECT
        self._buffer: mmap.mmap | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._flushers: ThreadPoolExecutor | None = None

    def _io(self) -> ThreadPoolExecutor:
        """The thread that writes a chunk while the caller hashes it (started at the first file)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explaind-file-io")
        return self._pool

    def close(self) -> None:
        """Stop the I/O and flushing threads (a later :meth:`write` or :meth:`settle` starts new ones)."""
        with self._lock:
            pools, self._pool, self._flushers = (self._pool, self._flushers), None, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True)

    def write(self, root: Path, relpath: str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None,
              *, fsync: bool = True, fsync_dir: bool | None = None, staged: list[Staged] | None = None) -> FileRecord:
        r"""Write ``tensors`` to ``root / relpath`` (replaced atomically); return its :class:`FileRecord`.

        ``fsync`` flushes the file before it is moved into place; ``fsync_dir`` (default:
        ``fsync``) flushes its directory after (callers committing many files flush it once).
        With ``staged`` (a list) the file is only written, under its temporary name, and appended
        to ``staged`` open: the caller passes the list to :meth:`settle` (or :meth:`discard`), and
        ``fsync`` and ``fsync_dir`` are not used.
        """
        target = Path(root) / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        cpu = {k: v.detach().to("cpu").resolve_conj().resolve_neg().contiguous() for k, v in tensors.items()}
        if all(v.dtype in DTYPES for v in cpu.values()):
            head, places = layout(cpu, metadata)
        else:  # a dtype this module does not lay out: the library's bytes
            head, places = st_save(cpu, metadata=metadata), []
        pieces = [(flat, offset, flat.numel()) for flat, offset in
                  ((t.reshape(-1).view(torch.uint8), offset) for t, offset in places if t.numel())]
        size = len(head) + sum(n for _, _, n in pieces)
        tmp = temporary_path(target)
        with self._lock:
            try:
                fd, digest = self._write_file(tmp, head, pieces, size)
            except OSError as exc:  # from os.write on a descriptor: the error names no file
                tmp.unlink(missing_ok=True)
                raise naming(exc, target) from exc
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        record = FileRecord(path=relpath, checksum=f"{self.checksum}:{digest}", nbytes=size)
        if staged is not None:
            staged.append(Staged(tmp, target, fd))
            return record
        self.settle([Staged(tmp, target, fd)], fsync=fsync)
        if fsync if fsync_dir is None else fsync_dir:
            fsync_directory(target.parent)
        return record

    def settle(self, files: list[Staged], *, fsync: bool = True) -> None:
        """Flush the staged ``files`` (with ``fsync``, all at once), close them and move each into place, in order.

        On an error (or an interrupt) the files not yet moved are removed and the error is raised;
        the directories are not flushed (the caller flushes each once, after the renames).
        """
        moved = 0
        try:
            try:
                if fsync:
                    self._fsync_all(files)
            finally:
                _close_all([f.fd for f in files])
            for f in files:
                os.replace(f.tmp, f.target)
                moved += 1
        except BaseException:
            for f in files[moved:]:
                f.tmp.unlink(missing_ok=True)
            raise

    def discard(self, files: list[Staged]) -> None:
        """Close and remove staged ``files`` that will not be settled (their step failed)."""
        try:
            _close_all([f.fd for f in files])
        finally:
            for f in files:
                f.tmp.unlink(missing_ok=True)

    def flush_directories(self, directories: list[Path]) -> None:
        """``fsync`` each directory (so that the renames inside it survive a power loss), all at once."""
        self._concurrently([lambda d=d: fsync_directory(d) for d in directories])

    def _fsync_all(self, files: list[Staged]) -> None:
        """``fsync`` every staged file, each on a thread of its own when there are several (an error names the
        file)."""
        self._concurrently([lambda f=f: _fsync_named(f) for f in files])

    def _concurrently(self, jobs: list[Callable[[], None]]) -> None:
        """Run ``jobs`` (each a flush: it waits for the device), several at once; all are waited for, also
        when interrupted, and the first error is raised after."""
        if len(jobs) <= 1:
            for job in jobs:
                job()
            return
        with self._lock:
            if self._flushers is None:
                self._flushers = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="explaind-fsync")
            pool = self._flushers
        futures = [pool.submit(job) for job in jobs]
        interrupted: BaseException | None = None
        for future in futures:  # every flush is over before a descriptor is closed, also when interrupted
            try:
                _finished(future)
            except BaseException as exc:
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted

    def _chunks(self, head: bytes, pieces: list[tuple[Tensor, int, int]],
                size: int) -> Iterator[tuple[memoryview, int]]:
        """The file's bytes, ``CHUNK`` at a time, in the buffer: ``(chunk padded to BLOCK, file bytes in it)``.

        ``pieces``: each tensor's bytes (flat ``uint8``), their offset in the file and their number.
        """
        span = min(-(-size // BLOCK) * BLOCK, CHUNK)
        if self._buffer is None or len(self._buffer) < span:
            self._buffer = mmap.mmap(-1, span)  # anonymous: page-aligned
        flat = torch.frombuffer(self._buffer, dtype=torch.uint8, count=span)
        view = memoryview(self._buffer)
        try:
            for start in range(0, size, CHUNK):
                stop = min(start + CHUNK, size)
                if start < len(head):
                    view[: min(len(head), stop) - start] = head[start:stop]
                for piece, offset, length in pieces:
                    lo, hi = max(start, offset), min(stop, offset + length)
                    if lo < hi:
                        flat[lo - start : hi - start].copy_(piece[lo - offset : hi - offset])
                n = stop - start
                padded = -(-n // BLOCK) * BLOCK
                flat[n:padded].zero_()
                yield view[:padded], n
        finally:
            view.release()

    def _write_file(self, path: Path, head: bytes, pieces: list[tuple[Tensor, int, int]],
                    size: int) -> tuple[int, str]:
        """Create ``path`` with the file's bytes (``O_DIRECT`` where allowed): its open descriptor and checksum."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        directory = str(path.parent)
        if self._direct and directory not in self._refused:
            try:
                return self._write_chunks(path, flags | os.O_DIRECT, self._chunks(head, pieces, size), size,
                                          direct=True)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            logger.debug("O_DIRECT refused in %s; writing through the page cache there.", directory)
            self._refused.add(directory)
        return self._write_chunks(path, flags, _spans(head, pieces), size, direct=False)

    def _write_chunks(self, path: Path, flags: int, chunks: Iterator[tuple[memoryview, int]], size: int,
                      *, direct: bool) -> tuple[int, str]:
        """Write ``chunks`` (``(bytes to write, file bytes in them)``, in file order) to a new ``path``.

        With ``direct`` each chunk is padded to :data:`BLOCK` and the file truncated to ``size`` after.
        Returns the file's descriptor, still open (closed here on an error), and the chunks' checksum.
        """
        digest = hasher(self.checksum)
        fd = os.open(path, flags, 0o644)
        try:
            for chunk, n in chunks:
                # the write (with O_DIRECT it waits for the device) runs on the I/O thread while this one
                # hashes the same bytes; both are done before the buffer is refilled or the file closed
                written = self._io().submit(_write_all, fd, chunk if direct else chunk[:n])  # O_DIRECT: whole blocks
                try:
                    digest.update(chunk[:n])
                finally:
                    _finished(written)
            if direct:
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return fd, digest.hexdigest()


def _fsync_named(file: Staged) -> None:
    try:
        os.fsync(file.fd)
    except OSError as exc:
        raise naming(exc, file.target) from exc


def _spans(head: bytes, pieces: list[tuple[Tensor, int, int]]) -> Iterator[tuple[memoryview, int]]:
    """The file's bytes read where they are, at most :data:`CHUNK` at a time: ``(bytes, their number)``.

    For writes through the page cache, which copy from any address: the header, then each tensor's
    bytes (``pieces``: flat ``uint8``, in file order and back to back, as :func:`layout` places them)
    from the tensor's own memory, so the writer's thread copies nothing (the kernel copies them
    into the page cache, with the GIL released) and hashes them in place.
    """
    for view in (memoryview(head), *(memoryview(piece.numpy()) for piece, _, _ in pieces)):
        for start in range(0, len(view), CHUNK):
            part = view[start : start + CHUNK]
            yield part, len(part)


def _finished(future: Future) -> None:
    """Wait for ``future`` (a write into an open file) to finish, also when interrupted, then raise its error.

    The caller closes the file and refills the buffer afterwards, so a ``KeyboardInterrupt`` here
    must not return before the write is over; it is raised once it is.
    """
    interrupted: BaseException | None = None
    while not future.done():
        try:
            wait([future])
        except BaseException as exc:  # KeyboardInterrupt: finish waiting first
            interrupted = exc
    if interrupted is not None:
        raise interrupted
    future.result()


def _close_all(fds: list[int]) -> None:
    """Close every descriptor; the first error is raised once all were tried."""
    error: OSError | None = None
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            error = error or exc
    if error is not None:
        raise error

