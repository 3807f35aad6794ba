"""Saving an :class:`~explaind.kernel.attribution.Attribution` and reading one back, checked.

A saved attribution is a directory with two files:

``attribution.safetensors``
    Every tensor and, in its safetensors metadata (key ``explaind_attribution``), the JSON header
    (``format_version``, ``axes``, ``coords``, ``layout``, ``meta``): the result whole, replaced in one
    atomic rename, so a save killed at any moment leaves the old result or the new one, never a mix.
``attribution.json``
    A readable copy of the header, written after it. Files of format 1 written before the header
    travelled inside the tensor file hold it only here, and are read from here.

Reading opens only regular files (no symbolic link, FIFO or device: :func:`explaind._io.open_regular`)
and checks everything against the header before an :class:`Attribution` is built: the set of tensors,
their dtype (one floating dtype), their shapes (``values`` has one axis per name in ``axes``; the other
terms the shapes docs/engine.md gives them), their finiteness, the coordinates' lengths and the layout.
Anything else is a :class:`~explaind.exceptions.ConfigError` naming the file, the value, what is allowed
and the fix, never a parser's exception or a silently different result.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save as st_save
from torch import Tensor

from .._io import atomic_write, open_regular, read_open
from ..exceptions import ConfigError
from ..trajectory._index import strict_json
from ..trajectory._io import decode_safetensors
from .layout import ParamLayout

__all__ = ["FORMAT_VERSION", "HEADER_FILE", "TENSORS_FILE", "read_attribution", "write_attribution"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS_FILE = "attribution.safetensors"
HEADER_FILE = "attribution.json"
#: the safetensors metadata key that holds the header
HEADER_KEY = "explaind_attribution"
#: the decomposed axes (canonical order) and the tensors of a saved attribution
AXES = ("step", "group", "param", "train")
TENSORS = ("values", "initial", "final", "regularization", "residual", "quadrature_error", "buffers", "initial_state")
#: terms added after format 1 was first written (zeros when a file lacks them)
_LATER = ("buffers", "initial_state")
#: a temporary file of an interrupted save: ``<name>.tmp-<pid>-<thread>`` (explaind._io.temporary_path)
_LEFTOVER = re.compile(r"^attribution\.(safetensors|json)\.tmp-(\d+)-\d+$")
_FIX = ("The files were modified or not written by Attribution.save: save the attribution again, or re-run the "
        "query that computed it.")


def write_attribution(root: Path, tensors: dict[str, Tensor], header: dict[str, Any]) -> None:
    """Write ``tensors`` with ``header`` inside (one atomic file), then the readable copy of ``header``."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    text = json.dumps(header)
    atomic_write(root / TENSORS_FILE, st_save(tensors, metadata={HEADER_KEY: text}))
    atomic_write(root / HEADER_FILE, json.dumps(header, indent=1))


def _remove_leftovers(root: Path) -> None:
    """Delete the temporary files that a killed save left (those of processes that no longer run)."""
    for entry in os.scandir(root):
        match = _LEFTOVER.match(entry.name)
        if match is None or int(match.group(2)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(2)), 0)
        except ProcessLookupError:
            Path(entry.path).unlink(missing_ok=True)
        except (PermissionError, OverflowError):  # alive (someone else's), or no process id at all
            pass


def _error(root: Path, name: str, problem: str, allowed: str) -> ConfigError:
    return ConfigError(f"Attribution {str(root / name)!r}: {problem}; allowed: {allowed}. {_FIX}")


def _read(root: Path, name: str) -> bytes | None:
    """The bytes of ``root / name`` (a regular file only), ``None`` when it does not exist."""
    def refuse(exc: OSError | None) -> ConfigError:
        what = ("a directory, a FIFO or a device" if exc is None else "a symbolic link" if exc.errno == errno.ELOOP
                else f"a file that cannot be opened ({exc.strerror})")
        return _error(root, name, f"it is {what}", "a regular file (a link is not followed: replace it by the file "
                      "it names, e.g. cp -L)")

    try:
        fd, info = open_regular(root / name, refuse)
    except FileNotFoundError:
        return None
    try:
        return read_open(fd, info.st_size)
    finally:
        os.close(fd)


def read_attribution(root: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The checked header and tensors of the attribution saved in ``root``.

    Returns
    -------
    (dict, dict)
        The header (``axes`` a tuple, ``layout`` a :class:`ParamLayout`, ``coords`` and ``meta``
        dicts) and the tensors by name (``buffers`` and ``initial_state`` ``None`` when a format-1
        file lacks them).

    Raises
    ------
    ConfigError
        When a file is missing, not a regular file, truncated or not what :func:`write_attribution`
        writes (see the module docstring).
    """
    if not root.is_dir():
        raise ConfigError(f"Attribution {str(root)!r} is not a directory holding a saved attribution "
                          f"({'it does not exist' if not root.exists() else 'it is a file'}). Pass the directory "
                          f"that Attribution.save wrote.")
    data = _read(root, TENSORS_FILE)
    if data is None:
        raise _error(root, TENSORS_FILE, "it is missing", "the directory Attribution.save wrote, with both files")
    try:
        tensors, metadata = decode_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise _error(root, TENSORS_FILE, f"it is not a complete safetensors file ({exc})",
                     "the file as Attribution.save wrote it (a truncated or cut copy is not)") from None
    copy = _read(root, HEADER_FILE)
    if HEADER_KEY in metadata:
        header = _parse(root, TENSORS_FILE, metadata[HEADER_KEY])
        if copy is not None and _parse_or_none(copy) != header:
            logger.warning("%s differs from the header saved inside %s (a save interrupted between its two files, "
                           "or an edit); the header inside %s was read. Save the attribution again to rewrite it.",
                           root / HEADER_FILE, TENSORS_FILE, TENSORS_FILE)
    elif copy is None:
        raise _error(root, HEADER_FILE, "it is missing (the tensor file holds no header)",
                     "the directory Attribution.save wrote, with both files")
    else:
        header = _parse(root, HEADER_FILE, copy)
    return _check(root, header, tensors)


def _parse_or_none(data: bytes) -> Any:
    try:
        return strict_json(data, finite=False)
    except (ValueError, RecursionError):
        return None


def _parse(root: Path, name: str, data: bytes | str) -> dict[str, Any]:
    try:
        header = strict_json(data, finite=False)
    except (ValueError, RecursionError) as exc:
        raise _error(root, name, f"its header is not valid JSON ({exc})", "JSON as Attribution.save writes it, each "
                     "key once per object") from None
    if not isinstance(header, dict):
        raise _error(root, name, f"its header is a JSON {type(header).__name__}", "an object with format_version, "
                     "axes, coords, layout and meta")
    version = header.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ConfigError(f"Attribution {str(root / name)!r} has format_version {version}, newer than this explaind "
                          f"reads ({FORMAT_VERSION}): it was saved by a newer explaind. Upgrade explaind to read it.")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise _error(root, name, f"format_version is {version!r}", f"the integer {FORMAT_VERSION}")
    missing = [k for k in ("axes", "coords", "layout", "meta") if k not in header]
    if missing:
        raise _error(root, name, f"its header lacks {missing}", "a header with format_version, axes, coords, layout "
                     "and meta")
    return header


def _check_axes(root: Path, axes: Any) -> tuple[str, ...]:
    kept = axes[1:-1] if isinstance(axes, list) else None
    if (kept is None or len(axes) < 2 or axes[0] != "test" or axes[-1] != "output"
            or any(a not in AXES for a in kept) or len(set(kept)) != len(kept)):
        raise _error(root, TENSORS_FILE, f"axes is {axes!r}", f"['test', *kept, 'output'] with kept axes distinct "
                     f"names among {list(AXES)}")
    return tuple(axes)


def _check_layout(root: Path, layout: Any) -> ParamLayout:
    try:
        out = ParamLayout(tuple(layout["names"]), tuple(tuple(d for d in s) for s in layout["shapes"]))
        ok = (all(isinstance(n, str) for n in out.names) and len(set(out.names)) == len(out.names)
              and all(type(d) is int and d >= 0 for s in out.shapes for d in s)
              and len(out.shapes) == len(out.names) and out.to_json() == layout)
    except (TypeError, KeyError):
        ok = False
    if not ok:
        raise _error(root, TENSORS_FILE, f"layout is {str(layout)[:200]!r}", "{'names': [distinct str], 'shapes': "
                     "[[int >= 0, ...]], 'offsets': the running sums of the shapes' sizes}")
    return out


def _shapes(axes: tuple[str, ...], values: Tensor) -> dict[str, tuple[int, ...]]:
    """The shape each tensor must have, given ``values`` and its axes."""
    dims = dict(zip(axes, values.shape))
    side = tuple(dims[a] for a in axes if a != "train")
    quad = tuple(dims[a] for a in axes if a in ("test", "step", "output"))
    ends = (dims["test"], dims["output"])
    return {"values": tuple(values.shape), "initial": ends, "final": ends, "regularization": side, "residual": side,
            "initial_state": side, "quadrature_error": quad, "buffers": quad}


def _check(root: Path, header: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    axes = _check_axes(root, header["axes"])
    layout = _check_layout(root, header["layout"])
    absent = [n for n in TENSORS if n not in tensors and n not in _LATER]
    extra = sorted(set(tensors) - set(TENSORS))
    if absent or extra:
        raise _error(root, TENSORS_FILE, f"it lacks the tensors {absent} and holds the unknown ones {extra}",
                     f"exactly {list(TENSORS)} (the last two may be absent in files saved before they were terms)")
    values = tensors["values"]
    if values.ndim != len(axes):
        raise _error(root, TENSORS_FILE, f"'values' has shape {list(values.shape)}, {values.ndim} axes for the "
                     f"{len(axes)} names {list(axes)}", "one axis per name")
    want = _shapes(axes, values)
    for name, tensor in tensors.items():
        if tensor.dtype != values.dtype or not tensor.is_floating_point():
            raise _error(root, TENSORS_FILE, f"{name!r} has dtype {tensor.dtype} ('values': {values.dtype})",
                         "one floating dtype for every tensor")
        if tuple(tensor.shape) != want[name]:
            raise _error(root, TENSORS_FILE, f"{name!r} has shape {list(tensor.shape)}",
                         f"{list(want[name])} (from 'values' {list(values.shape)} with axes {list(axes)})")
        if not bool(torch.isfinite(tensor).all()):
            raise _error(root, TENSORS_FILE, f"{name!r} holds NaN or infinite values", "finite scores (explaind "
                         "saves no other)")
    coords = header["coords"]
    if not isinstance(coords, dict) or not set(coords) <= set(axes):
        keys = sorted(coords) if isinstance(coords, dict) else coords
        raise _error(root, TENSORS_FILE, f"coords has the keys {keys}", f"an object keyed by axes among {list(axes)}")
    for axis, coord in coords.items():
        n = values.shape[axes.index(axis)]
        length = coord.get("range") if axis == "param" and isinstance(coord, dict) else (
            len(coord) if isinstance(coord, list) else None)
        if length != n or (axis == "param" and n != layout.size) or (axis == "group" and coord != list(layout.names)):
            raise _error(root, TENSORS_FILE, f"coords[{axis!r}] is {str(coord)[:120]!r}", f"{n} coordinates, one per "
                         f"entry of the axis" + (f" (the layout's {layout.size} coordinates)" if axis == "param" else
                                                "" if axis != "group" else " (the layout's names, in order)"))
    if not isinstance(header["meta"], dict):
        raise _error(root, TENSORS_FILE, f"meta is a JSON {type(header['meta']).__name__}", "an object")
    for name in _LATER:
        tensors.setdefault(name, None)  # type: ignore[arg-type]  # zeros, built by Attribution
    return {"axes": axes, "layout": layout, "coords": dict(coords), "meta": header["meta"]}, tensors
