"""The files of a trajectory store: their names, which of them a store owns, and deleting them.

A store exists once ``manifest.json`` does: a recorder setting up a new store first creates the
marker ``.explaind-setup``, then writes the start files and the journal, then the manifest
(the commit point of the set-up), and only then removes the marker. Replacing a store
(``overwrite=True``) creates the marker and deletes the manifest first, and the marker stays
until the new store's manifest is written. So a
directory without a manifest that holds the marker is what an interrupted set-up or
replacement left behind (:func:`setup_leftover`): it holds nothing recorded, and a new
recording deletes its explaind files and starts afresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

from .._io import fsync_directory
from ..exceptions import TrajectoryError
from ._io import store_path
from ._start_state import START_STATE_FILE
from .lock import LOCK, live_writer
from .manifest import TrajectoryManifest

__all__ = [
    "MANIFEST",
    "JOURNAL",
    "SETUP",
    "START_FILES",
    "step_path",
    "warn_uncommitted_steps",
    "warn_missing_steps",
    "checkpoint_state_path",
    "own_files",
    "remove_store",
    "remove_temporary_files",
    "setup_leftover",
    "unmarked_setup",
    "mark_setup",
]

MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
#: Present while a store is being set up or replaced; a directory holding it but no manifest has nothing recorded.
SETUP = ".explaind-setup"
#: The files a new store writes before its manifest.
START_FILES = ("initial.safetensors", "constants.safetensors", "data.safetensors", START_STATE_FILE)
STEP_FILE = re.compile(r"\d{6,}\.safetensors")
STATE_FILE = re.compile(r"state-[01]\.safetensors|checkpoint-\d{6,}\.safetensors")
TEMP_FILE = re.compile(r"(.+)\.tmp-\d+-\d+")
#: The fingerprint of the model's plain attributes at the last step (``_attribute_record.py``), written at the end.
ATTRIBUTES = "attributes.json"
_TOP_FILES = frozenset({MANIFEST, JOURNAL, SETUP, LOCK, ATTRIBUTES, *START_FILES})
_FOLDERS = {"steps": STEP_FILE, "optimizer": STATE_FILE}


def step_path(s: int) -> str:
    """Relative path of the file of step ``s``."""
    return f"steps/{s:06d}.safetensors"


def warn_uncommitted_steps(root: Path, n: int, *, resuming: bool) -> list[int]:
    """Log a warning when ``steps/`` holds files of steps ``n`` and later, which the store's index does not list.

    A recording killed between renaming step files into place and appending their journal lines leaves such
    files (up to its writer's queue); so does a journal that lost lines (truncated, or restored from an older
    copy), whose steps are then neither read nor kept by a resume: the warning names them and the fix. Only
    the file of step ``n`` is looked up unless it exists. A reader beside a live recorder is not warned (the
    recorder renames a step's files before it appends the step's journal line). Returns the steps found.
    """
    if not os.path.lexists(root / step_path(n)):
        return []
    if not resuming and live_writer(root) is not None:
        return []
    try:
        names = os.listdir(root / "steps")
    except OSError:
        return []
    found = sorted(s for s in (int(name[:-12]) for name in names if STEP_FILE.fullmatch(name)) if s >= n)
    shown = ", ".join(str(s) for s in found[:8]) + (f", ... ({len(found)} in all)" if len(found) > 8 else "")
    then = ("this resumed recording records them again, replacing their files" if resuming
            else "they are not read; a resumed recording records them again")
    logging.getLogger("explaind.trajectory").warning(
        "The trajectory store %r holds the files of steps %s, which its journal does not list: steps written but "
        "not committed when a recording was killed (its last steps), or steps whose journal lines were lost; %s. "
        "If journal.jsonl was truncated or replaced by an older copy, stop and restore it from a copy first, or copy "
        "the steps that can be proven from their files into a new store: explaind salvage RUN --out NEW.",
        str(root), shown, then)
    return found


def warn_missing_steps(root: Path, files: list[str]) -> list[int]:
    """Log a warning when step files that the store's index lists (``files``, of steps 0, 1, ...) are not in ``steps/``.

    A copy or sync that skipped some files (``rsync --max-size``, an ignore rule) leaves such a store; a resume reads
    only the last step's files, so it would go on after the hole without a word (every read of those steps fails).
    One ``listdir``; returns the steps missing.
    """
    try:
        present = {f"steps/{name}" for name in os.listdir(root / "steps")}
    except OSError:
        present = set()
    missing = [s for s, path in enumerate(files) if path not in present]
    if missing:
        shown = ", ".join(str(s) for s in missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        logging.getLogger("explaind.trajectory").warning(
            "The trajectory store %r lacks the files of steps %s, which its index lists (a copy or sync that skipped "
            "them, or they were deleted): reading those steps fails, and this resumed recording goes on after them. "
            "Fix: stop, and copy them from the original store; or keep the steps before the first of them in a new "
            "store: explaind salvage RUN --out NEW.", str(root), shown)
    return missing


def checkpoint_state_path(s: int) -> str:
    """Relative path of the optimizer state after step ``s`` in a sparse store (kept for replay)."""
    return f"optimizer/checkpoint-{s:06d}.safetensors"


def _is_own(name: str, pattern: re.Pattern[str] | None) -> bool:
    """Whether ``name`` (in the store's top folder when ``pattern`` is None) is a file explaind writes there."""
    temp = TEMP_FILE.fullmatch(name)
    base = temp.group(1) if temp else name
    return base in _TOP_FILES if pattern is None else bool(pattern.fullmatch(base))


def _is_layout_path(relpath: str) -> bool:
    """Whether ``relpath`` is a name explaind gives its files (a manifest naming another file does not own it)."""
    folder, _, name = relpath.rpartition("/")
    if not folder:
        return _is_own(name, None)
    return folder in _FOLDERS and _is_own(name, _FOLDERS[folder])


def own_files(root: Path, manifest: TrajectoryManifest | None) -> set[str]:
    """Relative paths of the files a store owns: its index, the files it lists, and its step and state files."""
    owned = {MANIFEST, JOURNAL, SETUP, ATTRIBUTES, *START_FILES}
    if manifest is not None:
        records = [manifest.initial_file, manifest.constants_file, manifest.data_file, manifest.initial_state_file]
        for step in manifest.steps:
            records += [step.file, step.optimizer_state, step.audit_state]
        owned.update(r.path for r in records if r is not None and _is_layout_path(r.path))
    for folder, pattern in _FOLDERS.items():
        if (root / folder).is_dir() and not (root / folder).is_symlink():
            owned.update(f"{folder}/{p.name}" for p in (root / folder).iterdir() if pattern.fullmatch(p.name))
    return owned


def mark_setup(root: Path, *, fsync: bool = True) -> None:
    """Create the set-up marker (empty; its existence is what counts)."""
    fd = os.open(root / SETUP, os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    if fsync:
        fsync_directory(root)


def remove_store(root: Path, manifest: TrajectoryManifest | None, *, fsync: bool = True) -> None:
    """Delete the files of the store at ``root`` (and its leftover temporary files); nothing else.

    The set-up marker is created first and the manifest deleted next, so an interruption leaves a
    directory that :func:`setup_leftover` recognises. The marker stays: the recording that
    replaces the store removes it once its own manifest is written.
    """
    mark_setup(root, fsync=fsync)
    (root / MANIFEST).unlink(missing_ok=True)
    if fsync:
        fsync_directory(root)
    for rel in sorted(own_files(root, manifest) - {MANIFEST, SETUP}):
        try:
            path = store_path(root, rel, "Trajectory store")
        except TrajectoryError:
            continue  # a hostile manifest entry: never delete outside the store
        if path.is_file() or path.is_symlink():
            path.unlink()
    remove_temporary_files(root)
    for folder in _FOLDERS:
        with contextlib.suppress(OSError):  # kept when it holds files that are not the store's
            (root / folder).rmdir()


def remove_temporary_files(root: Path) -> None:
    """Delete temporary files left by interrupted atomic writes (``<name>.tmp-<pid>-<thread>``) in the store."""
    for folder, pattern in ((root, None), (root / "steps", STEP_FILE), (root / "optimizer", STATE_FILE)):
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.iterdir():  # only temporary names of explaind's own files: a stranger's x.tmp-1-2 stays
                if TEMP_FILE.fullmatch(p.name) and _is_own(p.name, pattern) and (p.is_file() or p.is_symlink()):
                    p.unlink(missing_ok=True)


def setup_leftover(root: Path) -> tuple[bool, list[str]]:
    """What an interrupted set-up or replacement left in ``root`` (a directory without a manifest).

    Returns
    -------
    marked : bool
        Whether the set-up marker is there (explaind files in ``root`` hold nothing recorded).
    foreign : list of str
        Relative paths of the entries explaind did not write (the writer lock, explaind's file
        names and their temporary files are not listed).
    """
    foreign = []
    for p in sorted(root.iterdir()):
        pattern = _FOLDERS.get(p.name)
        if pattern is not None and p.is_dir() and not p.is_symlink():
            foreign += [f"{p.name}/{q.name}" for q in sorted(p.iterdir()) if not _is_own(q.name, pattern)]
        elif not (_is_own(p.name, None) and (p.is_file() or p.is_symlink())):
            foreign.append(p.name)
    return (root / SETUP).is_file(), foreign


def unmarked_setup(root: Path) -> bool:
    """Whether ``root`` holds what a new store's set-up writes before its manifest, without the set-up marker.

    Start files and an empty journal, nothing else of explaind's and nothing of anyone else's, no manifest and no
    marker: a copy taken while a recording set its store up (before its first step), by a tool that skips dot-files
    or after the marker went, or an interrupted set-up whose marker was lost. Nothing was recorded there.
    """
    if (root / MANIFEST).exists() or (root / SETUP).exists() or not (root / JOURNAL).is_file():
        return False
    marked, foreign = setup_leftover(root)
    if foreign or (root / JOURNAL).stat().st_size:
        return False
    return not any((root / folder).exists() for folder in _FOLDERS)
