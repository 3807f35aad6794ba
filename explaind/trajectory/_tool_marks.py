"""What other tools leave in a store's index files, told apart from damage.

See docs/recording.md, "What tools do to a store, round 14".

An editor that saves ``journal.jsonl`` as UTF-16 (Windows' "Unicode"), a script that writes ``NaN`` into a float
field of ``manifest.json``, a sort or a merge of the journal's lines: none of these is a torn write, and a message
that says only "corrupted" leaves the user without the cause. This module re-encodes a journal saved in another
Unicode encoding of the same text (its records are then read as recorded: the checksums are in the text, not in
its encoding), finds the field that holds a non-finite number, and tells a journal whose lines were reordered from
one that lost a step. Nothing here is on the normal read path: each function runs only where a strict parse failed,
or on a journal that does not start as explaind writes it.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["nonfinite_field", "reordered_line", "utf8_text", "store_run_id", "looks_like"]

#: the byte-order marks of the encodings other than UTF-8 that ``json`` reads (an editor's "Unicode" save)
_WIDE_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_RUN_ID = re.compile(rb'"run_id"\s*:\s*"([0-9a-f]{32})"')


def utf8_text(data: bytes, what: str) -> bytes:
    """``data`` as UTF-8: unchanged when it is UTF-8 (with or without a byte-order mark), else decoded from the
    UTF-16 or UTF-32 that ``json.detect_encoding`` finds (an editor's "Unicode" save of the same text) and encoded as
    UTF-8, without a byte-order mark.

    Without a byte-order mark, bytes are taken for UTF-16 or UTF-32 only when they decode to JSON text that starts
    with an object (``{``); anything else, e.g. a journal whose first bytes a file system zeroed, is left as it is,
    for the reader to name as damaged.

    Raises
    ------
    ValueError
        When the bytes start with a UTF-16 or UTF-32 byte-order mark but are not text of that encoding (naming
        ``what`` and the encoding).
    """
    marked = data[:4].startswith(_WIDE_BOMS)
    if not marked and (len(data) < 2 or (data[0] and data[1])):
        return data  # UTF-8 (json's rule: a wide encoding has a NUL among the first bytes of JSON text)
    encoding = json.detect_encoding(data[:4])
    if encoding in ("utf-8", "utf-8-sig"):
        return data
    try:
        text = data.decode(encoding)
    except UnicodeError as exc:
        if not marked:
            return data
        raise ValueError(f"{what} starts as {encoding.upper()} text (an editor's 'Unicode' save) but is not: {exc}. "
                         f"explaind writes UTF-8") from None
    return text.removeprefix("\ufeff").encode("utf-8") if marked or text.startswith("{") else data


def nonfinite_field(data: bytes | str) -> str:
    """Where the JSON ``data`` holds ``NaN``, ``Infinity`` or a number that overflows to infinity: ``" (at
    steps[1].audit)"``, or ``""`` when none is found (the parse failed for another reason)."""
    try:
        raw = json.loads(data, parse_constant=float)
    except (ValueError, RecursionError):
        return ""
    path = _find_nonfinite(raw, "")
    return f" (at {path})" if path else ""


def _find_nonfinite(value: Any, path: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path or "the top level"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _find_nonfinite(item, f"{path}[{key}]" if isinstance(key, int) else
                                f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def reordered_line(steps: list[int], expected: int) -> int | None:
    """The position (0-based) in the journal's ``steps`` (one per line that parses, in line order) of the line of
    step ``expected``, which the journal lists only later, after a line of another step: the lines were reordered (a
    sort, a merge, a sync of two copies) rather than lost. ``None`` when the journal does not list it."""
    return next((i for i, s in enumerate(steps) if s == expected), None)


def store_run_id(manifest_head: bytes) -> str | None:
    """The ``run_id`` of a manifest as explaind writes it, from its first bytes (``None`` if not found there)."""
    found = _RUN_ID.search(manifest_head)
    return None if found is None else found.group(1).decode()


#: what another tool's checkpoint holds: (file names, of which any one, with the other, tells it) -> what it is
_HF_MODEL = ("config.json", ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                             "pytorch_model.bin.index.json", "adapter_model.safetensors", "tf_model.h5"))
_NOT_A_TRAJECTORY = ("a model checkpoint holds the weights of one step, not the run's steps with their batches and "
                     "optimizer coefficients, and no trajectory can be rebuilt from it")
_HF_GUIDE = 'explaind.integrations.hf (docs/guide_own_model.md, "Hugging Face Trainer")'
_LIGHTNING_GUIDE = 'explaind.integrations.lightning (docs/guide_own_model.md, "Lightning")'
_RECORD = ("Fix: pass the directory of an explaind store (the folder that holds manifest.json), or record the run with "
           "TrajectoryRecorder(..., store=DIR)")


def looks_like(path: Path) -> str:
    """What ``path``, which is not an explaind store, looks like, with the fix (``""``: nothing this module knows).

    A file: a PyTorch or Lightning checkpoint file (by its name), or a zip, tar or gzip archive (by its first bytes).
    A directory: a Hugging Face ``Trainer`` checkpoint (``trainer_state.json``) or a saved model (``config.json`` with
    its weights), a Lightning ``checkpoints/`` folder (``*.ckpt`` files) or a Lightning log version (``hparams.yaml``
    beside ``checkpoints/``). Only run where loading failed, to name the cause.
    """
    if path.is_file():
        try:
            with open(path, "rb") as f:
                head = f.read(512)
        except OSError:
            return ""
        if path.suffix in (".ckpt", ".pt", ".pth", ".bin", ".safetensors"):
            return f"it looks like a checkpoint file ({path.suffix}): {_NOT_A_TRAJECTORY}. {_RECORD}"
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # after the names: torch.save writes zip files
            return ("it is a zip archive; explaind reads a store from a directory, not from inside an archive. Fix: "
                    "unpack it (python -m zipfile -e ARCHIVE DIR) and pass the directory that holds manifest.json")
        if head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar":
            return ("it is a tar or gzip archive; explaind reads a store from a directory, not from inside an "
                    "archive. Fix: unpack it (tar -xf ARCHIVE -C DIR) and pass the directory that holds manifest.json")
        return ""
    try:
        names = set(os.listdir(path))
    except OSError:
        return ""
    if "trainer_state.json" in names:
        return (f"it looks like a Hugging Face Trainer checkpoint (trainer_state.json): {_NOT_A_TRAJECTORY}. "
                f"{_RECORD}; with the Trainer, through {_HF_GUIDE}")
    if _HF_MODEL[0] in names and names & set(_HF_MODEL[1]):
        held = ", ".join(sorted(names & {_HF_MODEL[0], *_HF_MODEL[1]}))
        return f"it looks like a saved Hugging Face model ({held}): {_NOT_A_TRAJECTORY}. {_RECORD}"
    ckpts = sorted(n for n in names if n.endswith(".ckpt"))
    if ckpts:
        return (f"it looks like a PyTorch Lightning checkpoints folder ({', '.join(ckpts[:3])}"
                f"{', ...' if len(ckpts) > 3 else ''}): {_NOT_A_TRAJECTORY}. {_RECORD}; with Lightning, through "
                f"{_LIGHTNING_GUIDE}")
    if "hparams.yaml" in names and "checkpoints" in names:
        return (f"it looks like a PyTorch Lightning log folder (hparams.yaml, checkpoints/): {_NOT_A_TRAJECTORY}. "
                f"{_RECORD}; with Lightning, through {_LIGHTNING_GUIDE}")
    return ""
