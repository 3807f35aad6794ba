"""What happened to a store on its way between machines: naming the cause of a file that is not as recorded.

A store is copied, synced, archived, checked into version control and edited by other tools between the machine that
recorded it and the one that explains it (docs/recording.md, "Stores that travel, round 12"). A file that fails its
size or checksum, or is missing, is always refused; this module looks at what is there instead, to name what most
likely did it and the fix: a Git LFS pointer, line ends converted by git, a file that a tool re-saved, the optimizer
state of a later step (a copy of a store taken while it was recorded), an empty file on a network file system, a
store copied without its tensor files, a store moved while it was open. It also keeps a recording from appending to
a journal that a hard-linked copy shares (:func:`unshared_journal`). Nothing here changes what is read: a function
builds a message, or waits and reads again, or gives the writer a journal of its own with the same records.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..exceptions import TrajectoryError
from ._checksum import hasher
from ._interrupts import check_journal, journal_identity
from ._tool_marks import store_run_id
from .manifest import FileRecord

__all__ = ["damage_cause", "grown_cause", "missing_cause", "read_settled", "linked_folder", "case_changed",
           "unshared_journal"]

#: How long a reader waits for an empty file to show its contents (a network file system) before refusing it.
SETTLE_SECONDS = 1.0
_SETTLE_TRIES = 5

JOURNAL = "journal.jsonl"  # _layout.JOURNAL (not imported: _layout imports _io, which imports this module)
_LFS = b"version https://git-lfs.github.com/spec/"
_SALVAGE = "Trajectory.salvage(STORE, out=NEW) (explaind salvage RUN --out NEW) copies the steps before it into a " \
           "new store"


def read_settled(read: Callable[[], bytes], expected: int) -> bytes:
    """``read()``, read again for up to :data:`SETTLE_SECONDS` while it returns no byte of ``expected`` (> 0).

    A network file system (NFS with attribute caching, a sync client) may show a file that another machine wrote
    as present but empty for a moment; a reader that refused it at once would report a sound store as damaged.
    """
    data = read()
    for _ in range(_SETTLE_TRIES):
        if data or expected <= 0:
            break
        time.sleep(SETTLE_SECONDS / _SETTLE_TRIES)
        data = read()
    return data


def _header(data: bytes) -> dict | None:
    """The JSON header of ``data`` when it is shaped like a safetensors file, else ``None`` (never raises)."""
    if len(data) < 8:
        return None
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8 or size > 100_000_000:
        return None
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def _int(text: object) -> int | None:
    return int(text) if isinstance(text, str) and text.isdigit() and len(text) < 20 else None


def damage_cause(data: bytes, algorithm: str, expected: str, relpath: str, step: int | None,
                 manifest_head: bytes = b"") -> str:
    """Cause and fix of a file whose size or checksum is not the recorded one, judged from its bytes ``data``.

    ``algorithm`` and ``expected`` are the recorded checksum; ``relpath`` is the file's path in the store and
    ``step`` the step whose record names it (``None`` for a start file).
    """
    if not data:
        return ("Cause: it is empty (0 bytes), and stayed so for a second: a copy or sync that was interrupted or "
                "has not finished, or a network file system that has not yet shown its contents. Fix: wait and "
                "retry; else copy the file again from the original store.")
    if data.startswith(_LFS):
        return ("Cause: it is a Git LFS pointer file, not the tensors: the store was cloned or checked out without "
                "its LFS objects. Fix: run 'git lfs pull' in the repository that holds the store, then load it "
                "again.")
    if b"\r\n" in data:
        h = hasher(algorithm)
        h.update(data.replace(b"\r\n", b"\n"))
        if h.hexdigest() == expected:
            return ("Cause: its line ends were converted from LF to CRLF (git's core.autocrlf or a 'text' attribute, "
                    "or a transfer in text mode); the bytes are otherwise those recorded. Fix: mark the store's "
                    "files binary (a line '*.safetensors binary' in .gitattributes) and check them out again, or "
                    "copy the store in binary mode.")
    header = _header(data)
    if header is None:
        return ("Cause: it is not the file recorded (cut short, overwritten or corrupted on the way). Fix: copy it "
                "again from the original store" + (f"; or {_SALVAGE}." if step is not None else "."))
    meta = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
    after = _int(meta.get("n_steps"))
    if step is not None and relpath.startswith("optimizer/state-") and after is not None and after > step + 1:
        return (f"Cause: it holds the optimizer state after step {after - 1}, later than step {step} whose record "
                f"names it: the store was copied (cp -r, rsync, a sync tool) while its run was being recorded, the "
                f"state file after the journal. Fix: copy the store again after the recording ended; or "
                f"Trajectory.salvage(STORE, out=NEW) (explaind salvage RUN --out NEW), which keeps every step its "
                f"files prove, with this state.")
    other = _other_run(meta, manifest_head) if relpath.startswith("steps/") else None
    if other is not None:
        return (f"Cause: it is a step file of another run (its 'run' entry names the run {other[0]!r}; this store is "
                f"the run {other[1]!r}): a file copied or synced in from another store (two stores merged into one "
                f"directory, a tool that replaced a file by one of the same name and size). Fix: restore this store's "
                f"file from a copy of it; or {_SALVAGE}.")
    if step is not None and _int(meta.get("step")) == step and relpath.startswith("steps/"):
        return (f"Cause: it is a safetensors file of step {step} with other bytes than the store's index records: "
                f"a file of another attempt at this step (a copy of the store resumed separately and copied over "
                f"this one), or one re-saved by another tool. Fix: restore the store's files together from one copy; "
                f"or {_SALVAGE}.")
    dtypes = sorted({str(v.get("dtype")) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)})
    return (f"Cause: it is a valid safetensors file ({', '.join(dtypes) or 'no tensors'}) with other bytes than "
            f"recorded: re-saved by another tool (safetensors' save_file, a conversion to another dtype), or a file "
            f"of another run; its values are not taken as recorded. Fix: restore the file as recorded from the "
            f"original store" + (f"; or {_SALVAGE}." if step is not None else "."))


def _other_run(meta: dict, manifest_head: bytes) -> tuple[str, str] | None:
    """``(the file's run, the store's run)`` when a step file's ``run`` entry names a run other than the ``run_id``
    at the head of the store's manifest (``manifest_head``, its first bytes); else ``None``."""
    store = store_run_id(manifest_head)
    try:
        held = json.loads(meta.get("run", "")).get("id")
    except (ValueError, RecursionError, AttributeError):
        return None
    return (held, store) if store is not None and isinstance(held, str) and held != store else None


def grown_cause(read: Callable[[int], bytes], record: FileRecord, step: int | None) -> str | None:
    """Cause and fix of a file larger than its ``record`` (``None`` when it is no regular file or far larger).

    ``read(n)`` reads the file, refusing one of more than ``n`` bytes; a file of up to twice the recorded size
    (each byte a line end turned into two) is read to tell why.
    """
    try:
        data = read(2 * record.nbytes + 4096)
    except (OSError, TrajectoryError):
        return None
    return damage_cause(data, *record.algorithm_and_digest, record.path, step)


def missing_cause(root: Path, relpath: str, step: int | None) -> str:
    """Cause and fix of a file the store's index lists that is not there."""
    if not os.path.isdir(root):
        return (f"Cause: the store directory {str(root)!r} is gone from this path: moved, renamed or deleted while "
                f"it was open. Fix: load it again from where it is now, Trajectory.load(NEW_PATH).")
    if not _any_tensor_file(root):
        return ("Cause: the store holds no tensor file (*.safetensors) at all: it was copied or checked in without "
                "them (an ignore rule such as '*.safetensors' in .gitignore, a sync filter). Fix: copy the "
                "*.safetensors files (with steps/ and optimizer/) from the original store.")
    return ("Cause: a copy or sync that skipped it (rsync --max-size, an ignore rule, a tool that skips some files), "
            "or it was deleted. Fix: copy it from the original store" + (f"; or {_SALVAGE}." if step is not None
                                                                           else "."))


def _any_tensor_file(root: Path) -> bool:
    for folder in (root, root / "steps", root / "optimizer"):
        try:
            if any(name.endswith(".safetensors") for name in os.listdir(folder)):
                return True
        except OSError:
            continue
    return False


def linked_folder(root: Path, relpath: str) -> str | None:
    """The folder of ``relpath`` below ``root`` that is a symbolic link (``steps`` moved to another disk), if any."""
    parts = relpath.split("/")[:-1]
    for i in range(len(parts)):
        folder = "/".join(parts[: i + 1])
        if os.path.islink(root / folder):
            return folder
    return None


def case_changed(root: Path, name: str) -> str | None:
    """The entry of ``root`` that is ``name`` in another case (``MANIFEST.JSON``), if any."""
    try:
        return next((entry for entry in sorted(os.listdir(root)) if entry != name and entry.lower() == name), None)
    except OSError:
        return None


def unshared_journal(root: Path, journal: BinaryIO, identity: tuple[int, int] | None,
                     rewrite: Callable[[], None]) -> tuple[BinaryIO, tuple[int, int] | None]:
    """The writer's open ``journal`` (``identity``: its device and inode), made its own before the next append.

    The journal is the one file of a store written in place (appended). A copy of the store made with hard links
    while it is recorded (``cp -al``, ``rsync --link-dest``, a snapshot tool) shares it, and the appends would change
    the copy too: its journal would list steps whose files it does not hold. When the open journal has another name,
    ``rewrite()`` writes the committed records to a new file moved into place (the copy keeps the old one), and the
    new file is opened for appending. Raises like :func:`~explaind.trajectory._interrupts.check_journal` when the
    store's journal is gone or replaced.
    """
    check_journal(root, JOURNAL, identity)
    if os.fstat(journal.fileno()).st_nlink <= 1:
        return journal, identity
    journal.close()
    rewrite()
    logging.getLogger("explaind.trajectory").warning(
        "The journal of the trajectory store %r being recorded has another name (a copy of the store made with hard "
        "links: cp -al, rsync --link-dest, a snapshot tool). This recording now appends to a journal of its own, so "
        "the copy keeps the steps it had when it was made.", str(root))
    fresh = open(root / JOURNAL, "ab")  # noqa: SIM115 - the writer closes it
    return fresh, journal_identity(fresh.fileno())
