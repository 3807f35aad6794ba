"""Low-level file handling of the trajectory store: atomic checksummed writes and verified reads.

Every file is written with :func:`explaind._io.atomic_write` (a temporary file in the target
directory, flushed, ``fsync``-ed and moved into place with :func:`os.replace`), or, the store
writer's tensor files, by :class:`~explaind.trajectory._filewrite.TensorFileWriter` in the same
way, so a reader (or a crash) sees either the old file or the complete new one. The checksum of the bytes written
(:mod:`~explaind.trajectory._checksum`: XXH3-128, or SHA-256 in stores of schema 1) goes into the manifest; reads
hash the bytes they parse with the recorded algorithm and raise
:class:`~explaind.exceptions.TrajectoryError` naming the file (and the step, when there is one)
on any mismatch. Reads are confined to the store: a path that the manifest names must stay
inside it (no absolute paths, no ``..``, no symbolic link out), must be a regular file, and is
never read past the size the manifest declares (:func:`read_confined`).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.numpy import save as np_save
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from .._io import atomic_write, open_regular, read_open
from ..exceptions import ConfigError, TrajectoryError
from ._checksum import DEFAULT, checksum, hasher
from ._travel import damage_cause, grown_cause, linked_folder, missing_cause, read_settled
from .manifest import FileRecord, dtype_name

__all__ = [
    "broadcasts_to",
    "check_specs",
    "write_bytes",
    "encode_tensors",
    "write_tensors",
    "read_tensors",
    "decode_safetensors",
    "read_verified_bytes",
    "read_confined",
    "store_path",
    "store_root",
    "tensor_bytes",
    "encode_optimizer_state",
    "decode_optimizer_state",
]


def write_bytes(
    root: Path, relpath: str, data: bytes, *, fsync: bool = True, fsync_dir: bool | None = None,
    algorithm: str = DEFAULT,
) -> FileRecord:
    """Write ``data`` to ``root / relpath`` with :func:`~explaind._io.atomic_write`; return its :class:`FileRecord`.

    ``fsync`` and ``fsync_dir`` are passed on (callers that commit many files flush their
    directories once); ``algorithm`` is the checksum's (:data:`~explaind.trajectory._checksum.ALGORITHMS`).
    """
    atomic_write(root / relpath, data, fsync=fsync, fsync_dir=fsync_dir)
    return FileRecord(path=relpath, checksum=checksum(data, algorithm), nbytes=len(data))


#: dtypes serialized through numpy (same bytes as ``safetensors.torch.save``, much less per-tensor overhead)
_NUMPY_DTYPES = {torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16, torch.int32,
                 torch.int64, torch.bool}


def encode_tensors(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors`` (moved to CPU, made contiguous)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if all(v.dtype in _NUMPY_DTYPES for v in cpu.values()):
        return np_save({k: v.numpy() for k, v in cpu.items()}, metadata=metadata)
    return st_save(cpu, metadata=metadata)


def tensor_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of the elements of ``tensors`` (``None`` entries count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def write_tensors(
    root: Path,
    relpath: str,
    tensors: dict[str, Tensor],
    metadata: dict[str, str] | None = None,
    *,
    fsync: bool = True,
    fsync_dir: bool | None = None,
) -> FileRecord:
    """Serialize ``tensors`` as safetensors and write them atomically (see :func:`write_bytes`)."""
    return write_bytes(root, relpath, encode_tensors(tensors, metadata), fsync=fsync, fsync_dir=fsync_dir)


def _where(step: int | None) -> str:
    return "" if step is None else f" (step {step})"


def store_root(path: Any) -> Path:
    """The absolute path of the store a user names ``path`` (``store=`` of a recorder, ``Trajectory.load``).

    A leading ``~`` or ``~user`` is the home directory, as in a shell (before, a store given as ``"~/run"`` was
    written into a directory named ``~`` below the working directory;
    docs/recording.md, "Strangers' files, round 8"); a relative path is taken from the working directory now, so a
    later ``os.chdir`` does not move it.

    Raises
    ------
    ConfigError
        When ``path`` is not a path (a ``str``, ``bytes`` or ``os.PathLike``).
    TrajectoryError
        When ``path`` starts with ``~`` and the home directory is unknown (``HOME`` unset and no such user), or
        holds a NUL character (no file system allows one).
    """
    try:
        text = os.fsdecode(os.fspath(path))
    except TypeError:
        raise ConfigError(f"The store path {path!r} is a {type(path).__name__}; allowed: a str, bytes or "
                          f"os.PathLike naming a directory. Fix: pass the directory as a string or a "
                          f"pathlib.Path.") from None
    if "\0" in text:
        raise TrajectoryError(f"The store path {text!r} holds a NUL character, which no file system allows in a "
                              f"path. Fix: pass the path without it.")
    if text.startswith("~"):
        expanded = os.path.expanduser(text)
        if expanded.startswith("~"):
            raise TrajectoryError(f"The store path {text!r} starts with '~', but the home directory it names is "
                                  f"unknown (HOME is not set, or there is no such user). Allowed: an absolute path, "
                                  f"a path relative to the working directory, or '~' with a known home. Fix: pass "
                                  f"the full path.")
        text = expanded
    return Path(text).absolute()


def store_path(root: Path, relpath: str, what: str) -> Path:
    """The path of a file that the manifest names, confined to the store at ``root``.

    Raises
    ------
    TrajectoryError
        When ``relpath`` is absolute, climbs out with ``..``, or resolves (through symbolic links)
        to a place outside the store. Nothing outside the store is opened, and the error says
        nothing about what lies there.
    """
    parts = PurePosixPath(relpath).parts
    if not parts or PurePosixPath(relpath).is_absolute() or ".." in parts or "\\" in relpath or "\0" in relpath:
        raise TrajectoryError(f"{what}: the manifest of the store {str(root)!r} names {relpath!r}, which is not a "
                              f"relative path inside the store (allowed: a path below it, without '..', '\\' or NUL). "
                              f"The store is corrupted or was not written by explaind; re-record the run.")
    base = os.path.realpath(root)
    full = os.path.realpath(root / relpath)
    if os.path.commonpath([base, full]) != base:
        folder = linked_folder(root, relpath)
        fix = ("explaind reads a store's files only inside its directory, so the file it names is not read (a "
               "deduplicating tool, git-annex or a hand-made link to another store's file put it there). Fix: replace "
               "the link by the file it names (cp -rL copies a store with its links resolved; 'git annex unlock' "
               "for git-annex), or restore the file from a copy of the store." if folder is None else
               f"Its folder {folder!r} is a symbolic link to a place outside the store (moved to another disk), and "
               f"explaind reads a store's files only inside its directory. Fix: move {folder!r} back into the store; "
               f"or move the whole store and link its directory (a store reached through a link is read).")
        raise TrajectoryError(f"{what}: {relpath!r} of the store {str(root)!r} leads outside the store (a symbolic "
                              f"link). {fix}")
    return root / relpath


_OPEN_FIX = "The store is corrupted; restore the file from a copy, or re-record the run."
#: what to do when a file of the store cannot be opened, by ``errno``
_OPEN_FIXES = {
    errno.ELOOP: "It is a symbolic link, and the files of a store are read only as regular files: replace the link by "
                 "the file it names (cp -rL copies a store with its links resolved), or re-record the run.",
    errno.EACCES: "Fix: give the user running explaind read permission on it (chmod u+r), or copy the store to a "
                  "place it can read.",
    errno.ENOTDIR: "A folder on its path is not a directory; the store is corrupted: restore it from a copy, or "
                   "re-record the run.",
}
_OPEN_FIXES[errno.EPERM] = _OPEN_FIXES[errno.EACCES]


def read_confined(root: Path, relpath: str, max_bytes: int, what: str, too_large: str = "") -> bytes:
    """Read a regular file of the store, never more than ``max_bytes`` (a larger file is an error, not read;
    ``too_large``: its cause and fix, else "it was modified").

    Symbolic links, FIFOs and devices are refused before anything is read (opening does not block).

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    TrajectoryError
        When it is outside the store, not a regular file, or larger than ``max_bytes``.
    """
    path = store_path(root, relpath, what)

    def refuse(exc: OSError | None) -> TrajectoryError:
        if exc is None:
            return TrajectoryError(f"{what}: {relpath!r} of the store {str(root)!r} is not a regular file (a "
                                   f"directory, a FIFO or a device). The store is corrupted; restore the file from a "
                                   f"copy, or re-record the run.")
        return TrajectoryError(f"{what}: {relpath!r} of the store {str(root)!r} cannot be opened as a file of the "
                               f"store ({exc.strerror}). {_OPEN_FIXES.get(exc.errno, _OPEN_FIX)}")

    fd, info = open_regular(path, refuse)
    try:
        if info.st_size > max_bytes:
            raise TrajectoryError(f"{what}: {relpath!r} has {info.st_size} bytes, more than the {max_bytes} the "
                                  f"store allows for it; {too_large or 'it was modified. Re-record the run.'}")
        return read_open(fd, max_bytes)
    finally:
        os.close(fd)


def manifest_head(root: Path) -> bytes:
    """The first 4 KiB of the store's ``manifest.json`` (where explaind writes its ``run_id``), for naming the cause
    of a damaged file only; ``b""`` where it cannot be read as a regular file of the store."""
    try:
        fd, _info = open_regular(store_path(root, "manifest.json", "Trajectory manifest"), lambda exc: OSError())
    except (OSError, TrajectoryError):
        return b""
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""
    finally:
        os.close(fd)


def read_verified_bytes(root: Path, record: FileRecord, step: int | None = None) -> bytes:
    """Read a file of the store (confined, at most its recorded size) and check its size and checksum.

    The checksum is recomputed with the algorithm the record names (XXH3-128, or SHA-256 in
    stores of schema 1, :mod:`~explaind.trajectory._checksum`).
    """
    path = root / record.path
    try:  # an empty file is read again for a moment (a network file system may show it before its contents)
        data = read_settled(lambda: read_confined(root, record.path, record.nbytes, f"Trajectory file{_where(step)}"),
                            record.nbytes)
    except FileNotFoundError:
        raise TrajectoryError(f"Trajectory file {str(path)!r}{_where(step)} is missing. "
                              f"{missing_cause(root, record.path, step)}") from None
    except TrajectoryError as exc:  # larger than recorded: its first bytes tell what made it so (line ends, a tool)
        grown = grown_cause(lambda n: read_confined(root, record.path, n, "Trajectory file"), record, step)
        if grown is None:
            raise
        raise TrajectoryError(f"{exc} {grown}") from None
    algorithm, expected = record.algorithm_and_digest
    if len(data) != record.nbytes:
        raise TrajectoryError(
            f"Trajectory file {str(path)!r}{_where(step)} is truncated or was modified: it has {len(data)} bytes, "
            f"the manifest recorded {record.nbytes}. {damage_cause(data, algorithm, expected, record.path, step)}"
        )
    h = hasher(algorithm)
    h.update(data)
    digest = h.hexdigest()
    if digest != expected:
        raise TrajectoryError(
            f"Trajectory file {str(path)!r}{_where(step)} is corrupted: its {algorithm} checksum {digest[:16]}... "
            f"does not match the recorded {expected[:16]}.... " + damage_cause(data, algorithm, expected, record.path,
                                                                                step, manifest_head(root))
        )
    return data


def read_tensors(root: Path, record: FileRecord, step: int | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read, verify and decode a safetensors file; returns ``(tensors, metadata)``."""
    data = read_verified_bytes(root, record, step)
    try:
        tensors, metadata = decode_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        where = f"{str(root / record.path)!r}{_where(step)}"
        raise TrajectoryError(f"Trajectory file {where} is not a safetensors file explaind can read: {exc}. The store "
                              f"is corrupted or was not written by explaind; re-record the run, or resume it from "
                              f"the last complete step before this file.") from exc
    return tensors, metadata


def decode_safetensors(data: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the ``__metadata__`` of safetensors bytes.

    Raises
    ------
    SafetensorError, ValueError
        When ``data`` is not a safetensors file (truncated, a header that lies about its tensors).
    """
    tensors = st_load(data)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return tensors, dict(header.get("__metadata__", {}) or {})


# --------------------------------------------------------------------------- optimizer state
def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_jsonable(v) for v in value)
    return False


def encode_optimizer_state(
    state_dict: dict[str, Any], copy: Callable[[str, Tensor], Tensor] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Split ``optimizer.state_dict()`` into safetensors tensors and a JSON metadata string.

    Tensors become ``state.<param index>.<key>`` and ``group.<group index>.<key>``; everything
    else (numbers, flags, tuples) goes to the JSON description. Values that are neither a tensor
    nor JSON are left out and taken from the live optimizer on restore. Tensors are copied with
    ``copy(key, tensor)`` (default: ``clone``), so the optimizer may go on changing its own.
    """
    copy = copy or (lambda _key, value: value.detach().clone())
    tensors: dict[str, Tensor] = {}
    state_json: dict[str, dict[str, Any]] = {}
    for idx, entry in state_dict.get("state", {}).items():
        kept: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{key}"] = copy(f"state.{idx}.{key}", value)
            elif _jsonable(value):
                kept[key] = value
        state_json[str(idx)] = kept
    groups: list[dict[str, Any]] = []
    for g, group in enumerate(state_dict.get("param_groups", [])):
        kept = {}
        for key, value in group.items():
            if isinstance(value, Tensor):
                tensors[f"group.{g}.{key}"] = copy(f"group.{g}.{key}", value)
            elif _jsonable(value):
                kept[key] = list(value) if isinstance(value, tuple) else value
        groups.append(kept)
    meta = {"optimizer": json.dumps({"state": state_json, "param_groups": groups})}
    return tensors, meta


def decode_optimizer_state(
    tensors: dict[str, Tensor], metadata: dict[str, str], live_state_dict: dict[str, Any],
    where: str = "The stored optimizer state",
) -> dict[str, Any]:
    """Inverse of :func:`encode_optimizer_state`, filling gaps from the live optimizer's state dict.

    Raises
    ------
    TrajectoryError
        Naming ``where`` (the file) when the description or a tensor name is not what
        :func:`encode_optimizer_state` writes, or refers to a parameter or group the optimizer lacks.
    """
    live_groups = live_state_dict.get("param_groups", [])
    n_params = sum(len(g["params"]) for g in live_groups)
    desc = _optimizer_description(metadata, where, n_params)
    if len(live_groups) != len(desc["param_groups"]):
        raise TrajectoryError(
            f"The stored optimizer state has {len(desc['param_groups'])} parameter group(s) but the optimizer has "
            f"{len(live_groups)}. Build the optimizer with the same parameter groups as the recorded run."
        )
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in desc["state"].items()}
    groups = []
    for live, saved in zip(live_groups, desc["param_groups"]):
        group = dict(live)
        for key, value in saved.items():
            group[key] = tuple(value) if isinstance(live.get(key), tuple) else value
        groups.append(group)
    for key, value in tensors.items():
        kind, index, name = _state_key(key, where, n_params, len(groups))
        if kind == "state":
            state.setdefault(index, {})[name] = value
        else:
            groups[index][name] = value
    for g, live in zip(groups, live_groups):
        g["params"] = live["params"]
    return {"state": state, "param_groups": groups}


def _unreadable_state(where: str, problem: str) -> TrajectoryError:
    return TrajectoryError(f"{where}: {problem}. The optimizer state was not written by explaind or the store is "
                           f"corrupted: re-record the run (or resume it from an earlier copy of the store).")


def _optimizer_description(metadata: dict[str, str], where: str, n_params: int) -> dict[str, Any]:
    """The JSON description of an optimizer state file, checked: ``{"state": {i: {...}}, "param_groups": [{...}]}``."""
    try:
        desc = json.loads(metadata["optimizer"])
    except KeyError:
        raise _unreadable_state(where, "its metadata has no 'optimizer' entry") from None
    except (ValueError, RecursionError) as exc:
        raise _unreadable_state(where, f"its 'optimizer' metadata is not valid JSON ({exc})") from None
    ok = (isinstance(desc, dict) and isinstance(desc.get("state"), dict) and isinstance(desc.get("param_groups"), list)
          and all(isinstance(v, dict) for v in desc["state"].values())
          and all(isinstance(g, dict) for g in desc["param_groups"]))
    if not ok:
        raise _unreadable_state(where, "its 'optimizer' metadata is not {'state': {index: {...}}, 'param_groups': "
                                       "[{...}, ...]}")
    bad = [k for k in desc["state"] if not (k.isascii() and k.isdigit() and int(k) < n_params)]
    if bad:
        raise _unreadable_state(where, f"it holds state for parameter indices {bad[:5]}, allowed: 0..{n_params - 1} "
                                       f"(the optimizer's {n_params} parameters)")
    return desc


def _state_key(key: str, where: str, n_params: int, n_groups: int) -> tuple[str, int, str]:
    """``"state.<i>.<name>"`` or ``"group.<g>.<name>"`` split, its index checked against the optimizer."""
    kind, _, rest = key.partition(".")
    index, _, name = rest.partition(".")
    limit = n_params if kind == "state" else n_groups
    if kind not in ("state", "group") or not (index.isascii() and index.isdigit()) or not name or int(index) >= limit:
        raise _unreadable_state(where, f"it holds the tensor {key!r}, allowed: 'state.<i>.<name>' with i in "
                                       f"0..{n_params - 1} or 'group.<g>.<name>' with g in 0..{n_groups - 1}")
    return kind, int(index), name


def check_specs(tensors: dict[str, Tensor], prefix: str, specs: Any, where: str) -> None:
    """Check a read step file: every tensor of ``specs`` (manifest entries with ``name``, ``shape``, ``dtype``)
    is in ``tensors`` under ``prefix + name`` with the recorded shape and dtype, and finite.

    Finiteness is one ``isfinite`` of all floating tensors at once; only a file that fails it is searched for
    the tensor to name. Raises :class:`~explaind.exceptions.TrajectoryError` naming ``where`` and the tensor.
    """
    floats: list[tuple[str, Tensor]] = []
    for spec in specs:
        t = tensors.get(prefix + spec.name)
        if t is None:
            raise TrajectoryError(f"Trajectory file {where} lacks {prefix + spec.name!r}; the store is "
                                  f"corrupted. Re-record the run.")
        if list(t.shape) != list(spec.shape) or dtype_name(t.dtype) != spec.dtype:
            raise TrajectoryError(f"Trajectory file {where}: {prefix + spec.name!r} has shape {list(t.shape)} and "
                                  f"dtype {dtype_name(t.dtype)}, the manifest records {spec.shape} and "
                                  f"{spec.dtype}. The store is corrupted; re-record the run.")
        if t.is_floating_point():
            floats.append((prefix + spec.name, t))
    if floats and not bool(torch.isfinite(torch.cat([t.reshape(-1) for _, t in floats])).all()):
        name = next(n for n, t in floats if not bool(torch.isfinite(t).all()))
        raise TrajectoryError(f"Trajectory file {where}: {name!r} holds NaN or infinite values; the run diverged "
                              f"or the store is corrupted.")


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (``torch.broadcast_shapes(shape, target) == target``).

    >>> broadcasts_to((1, 3), (2, 3)), broadcasts_to((3,), (2, 3)), broadcasts_to((2, 3), (3,))
    (True, True, False)
    """
    return len(shape) <= len(target) and all(d in (1, e) for d, e in zip(reversed(shape), reversed(target)))
