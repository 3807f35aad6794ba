"""What tools do to a store, round 14 (part 1: strangers' files and copies): cloud-sync conflict copies, editors' swap
and backup files, macOS AppleDouble files and ``.DS_Store``, names that clash on a case-insensitive file system and
the names a FAT-like file system allows, a store zipped without its empty folders, copies taken mid-commit (a
temporary file and a torn journal line; a step file renamed into place before its journal line), a store checked
into git with its writer lock, files emptied by a full disk during a copy, hard-link and symbolic-link
deduplication, a store moved while a reader holds it, two stores merged into one directory and a step file of
another run of the same size.

docs/recording.md, "What tools do to a store, round 14", lists each case with what explaind did before. A store
read as the same run equals the uninterrupted run recorded in memory bit for bit (``same_run``, after ``verify()``),
and resumed, the uninterrupted longer run (``resumes_to_the_end``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from _round12_kit import (
    LONG,
    STEPS,
    copy_at,
    load,
    manifest,
    record,
    reference,
    resumes_to_the_end,
    salvaged,
    same_run,
    snapshot,
)
from test_store_faults import _assert_same

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A finished store of ``STEPS`` steps, copies of it taken after steps 3 and 4 while it was recorded (the lock
    and the set-up files included), and another run of ``LONG`` steps with other batches (same shapes and sizes)."""
    root = tmp_path_factory.mktemp("round14")

    def copies(store: Path, s: int) -> None:
        copy_at(3, root / "live3")(store, s)
        copy_at(4, root / "live4")(store, s)

    record(root / "finished", after=copies)
    record(root / "other", LONG, shift=1)
    return root


@pytest.fixture
def store(stores, tmp_path):
    return Path(shutil.copytree(stores / "finished", tmp_path / "run"))


def _steps_of(report) -> list[int]:
    return [s for s, _ in report.kept]


# --------------------------------------------------------------------------- strangers' files inside a store
_STRANGERS = {
    "sync conflict copies": {"steps/000002 (1).safetensors": "steps/000003.safetensors",
                             "manifest (conflicted copy 2026-12-07).json": "manifest.json",
                             "journal (Case Conflict).jsonl": "journal.jsonl",
                             "optimizer/state-0 (1).safetensors": "optimizer/state-1.safetensors"},
    "editor swap and backup files": {".manifest.json.swp": b"b0VIM 9.0\x00" + bytes(100),
                                     "manifest.json~": "manifest.json", "#journal.jsonl#": "journal.jsonl",
                                     "journal.jsonl.bak": "journal.jsonl"},
    "macOS AppleDouble and .DS_Store": {"._manifest.json": b"\x00\x05\x16\x07" + bytes(78),
                                        ".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(60),
                                        "steps/._000002.safetensors": b"\x00\x05\x16\x07" + bytes(78),
                                        "steps/.DS_Store": b"Bud1", "__MACOSX/._manifest.json": b"\x00\x05\x16\x07"},
    "names clashing in case": {"Manifest.json": "manifest.json", "steps/000002.SAFETENSORS": "steps/000004.safetensors",
                               "Journal.jsonl": "journal.jsonl"},
}


def _add(store: Path, files: dict[str, str | bytes], source: Path) -> dict[str, bytes]:
    """Write each stranger's file (its bytes, or a copy of ``source``'s file of that name); their contents."""
    added = {}
    for name, what in files.items():
        data = what if isinstance(what, bytes) else (source / what).read_bytes()
        (store / name).parent.mkdir(parents=True, exist_ok=True)
        (store / name).write_bytes(data)
        added[name] = data
    return added


@pytest.mark.parametrize("kind", sorted(_STRANGERS))
def test_strangers_files_beside_a_store_change_nothing_read_and_stay(stores, store, tmp_path, ref, kind):
    """A sync client's conflict copies (of a step file, the manifest, the journal, a state slot; from the other run),
    an editor's swap and backup files, macOS's ``._*`` and ``.DS_Store`` files (and ``__MACOSX/``), and files whose
    names differ from the store's own in case only: a load, ``verify()`` and salvage read the same run, a resume
    continues it bit for bit, ``overwrite=True`` deletes none of them. Before: the same."""
    added = _add(store, _STRANGERS[kind], stores / "other")
    assert same_run(store, ref) == STEPS
    assert salvaged(store, tmp_path / "out", ref) == STEPS
    assert not any(name in snapshot(tmp_path / "out") for name in added)  # salvage copies only the run's files
    assert resumes_to_the_end(store, ref) == STEPS
    record(store, 2, overwrite=True)
    assert {name: (store / name).read_bytes() for name in added} == added


def _fat_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file name on FAT/exFAT or NTFS under Windows' rules (``None``: it can)."""
    if len(name.encode("utf-16-le")) > 2 * 255:
        return "longer than 255 UTF-16 units"
    if re.search(r'[<>:"\\|?*\x00-\x1f]', name):
        return "a character FAT does not allow"
    if name.endswith((".", " ")):
        return "a trailing dot or space (Windows strips it)"
    if name.split(".")[0].upper() in {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                                      *(f"LPT{i}" for i in range(1, 10))}:
        return "a reserved DOS device name"
    return None


def test_every_name_a_store_uses_is_valid_on_a_fat_like_case_insensitive_file_system(tmp_path, monkeypatch):
    """A dense and a sparse store (its checkpoint states), recorded with the writer lock and the set-up marker seen
    in the middle, and the temporary names of every file: no name a FAT-like file system refuses, no two names of one
    folder the same once case is folded, so a store copied onto such a file system (emulated by these name rules)
    keeps every file. Before: the same."""
    names: set[str] = set()

    def seen(store: Path, s: int) -> None:
        names.update(str(p.relative_to(store)) for p in store.rglob("*"))

    record(tmp_path / "dense", after=seen)
    record(tmp_path / "sparse", 7, checkpoint_every=3, after=seen)
    names |= {str(p.relative_to(d)) for d in (tmp_path / "dense", tmp_path / "sparse") for p in d.rglob("*")}
    names |= {f"{n}.tmp-4194304-140737488355327" for n in set(names)}  # the largest pid and thread id on Linux
    assert ".explaind-writer.lock" in names and any(n.startswith("optimizer/checkpoint-") for n in names)
    problems = {n: _fat_problem(part) for n in names for part in n.split("/") if _fat_problem(part)}
    assert problems == {}
    folded: dict[str, str] = {}
    for n in sorted(names):
        assert folded.setdefault(n.casefold(), n) == n, (n, folded[n.casefold()])


# --------------------------------------------------------------------------- copies and archives
def test_a_zip_that_drops_empty_folders_of_a_store_without_steps_reads_and_resumes(tmp_path, ref):
    """A store with no step (``steps/`` and ``optimizer/`` empty) zipped by a tool that stores files only, then
    unzipped: the folders are gone. It loads (0 steps), verifies and resumes to the whole run bit for bit. Before:
    the same."""
    record(tmp_path / "empty", 0)
    with zipfile.ZipFile(tmp_path / "run.zip", "w") as archive:
        for p in sorted((tmp_path / "empty").rglob("*")):
            if p.is_file():
                archive.write(p, p.relative_to(tmp_path / "empty"))
    with zipfile.ZipFile(tmp_path / "run.zip") as archive:
        archive.extractall(tmp_path / "unzipped")
    assert not (tmp_path / "unzipped/steps").exists() and not (tmp_path / "unzipped/optimizer").exists()
    assert same_run(tmp_path / "unzipped", ref) == 0
    assert resumes_to_the_end(tmp_path / "unzipped", ref) == 0


def test_a_copy_taken_mid_commit_with_a_temporary_file_and_a_torn_line_reads_and_resumes(stores, tmp_path, ref,
                                                                                          caplog):
    """``cp -r`` while step 4 was committed: the half-written temporary file of its step file and the first half of
    its journal line came along. The copy reads steps 0-3 (a warning names the torn line), verifies, resumes bit for
    bit, and the resume removes the temporary file. Before: the same."""
    copy = Path(shutil.copytree(stores / "live3", tmp_path / "copy"))
    step4 = (stores / "finished/steps/000004.safetensors").read_bytes()
    (copy / "steps/000004.safetensors.tmp-4242-1").write_bytes(step4[: len(step4) // 2])
    line4 = (stores / "finished/journal.jsonl").read_bytes().splitlines(keepends=True)[4]
    with open(copy / "journal.jsonl", "ab") as journal:
        journal.write(line4[: len(line4) // 2])
    with caplog.at_level(logging.WARNING):
        assert same_run(copy, ref) == 4
    assert "incomplete last line" in caplog.text
    assert resumes_to_the_end(copy, ref) == 4
    assert not list(copy.rglob("*.tmp-*"))


def test_a_copy_taken_after_a_step_file_was_renamed_before_its_journal_line(stores, tmp_path, ref, caplog):
    """``rsync`` between the rename of step 4's file and the append of its journal line: the copy reads steps 0-3 with
    a warning naming step 4's file, salvage keeps steps 0-4 (step 4 by its own record and binding), and both the copy
    and the salvaged store resume bit for bit. Before: the same."""
    copy = Path(shutil.copytree(stores / "live4", tmp_path / "copy"))
    lines = (copy / "journal.jsonl").read_bytes().splitlines(keepends=True)
    (copy / "journal.jsonl").write_bytes(b"".join(lines[:4]))
    with caplog.at_level(logging.WARNING):
        assert same_run(copy, ref) == 4
    assert "holds the files of steps 4, which its journal does not list" in caplog.text
    assert salvaged(copy, tmp_path / "out", ref) == 5
    assert resumes_to_the_end(tmp_path / "out", ref) in (0, 4, 5)
    assert resumes_to_the_end(copy, ref) == 4


def test_a_store_checked_into_git_while_recording_keeps_its_lock_and_resumes(stores, tmp_path, ref):
    """``git add`` of a store while it was recorded: the writer lock went in too. A checkout on this host: the lock's
    ``flock`` is free (another file), so it is stale and taken over; resumed bit for bit. Before: the same."""
    copy = Path(shutil.copytree(stores / "live3", tmp_path / "clone"))
    assert json.loads((copy / ".explaind-writer.lock").read_text())["flock"] is True
    assert same_run(copy, ref) == 4
    assert resumes_to_the_end(copy, ref) == 4
    assert not (copy / ".explaind-writer.lock").exists()


def test_a_checked_in_lock_of_another_host_is_named_with_the_file_to_delete(stores, tmp_path, ref):
    """The same checkout on another machine (the lock names another host): read as the same run; a resume is refused
    naming the lock file to delete, nothing changed; deleted, resumed bit for bit. Before: "is being written by process
    <this process's id> (this one ...) A TrajectoryRecorder of this process has it open", because the other host's
    recording had the same process id (as a container's often does), and no word of the file to delete."""
    copy = Path(shutil.copytree(stores / "live3", tmp_path / "clone"))
    lock = copy / ".explaind-writer.lock"
    lock.write_text(json.dumps({**json.loads(lock.read_text()), "host": "build-box-7"}))
    assert same_run(copy, ref) == 4
    before = snapshot(copy)
    with pytest.raises(TrajectoryError, match=r"build-box-7.*\.explaind-writer\.lock"):
        record(copy, LONG, resume=True)
    assert snapshot(copy) == before
    lock.unlink()
    assert resumes_to_the_end(copy, ref) == 4


def test_files_emptied_by_a_full_disk_during_a_copy(store, tmp_path, ref, caplog):
    """A copy onto a full disk left files of 0 bytes. The older optimizer state slot (the newest is the one a resume
    reads): the same run, salvaged whole, resumed bit for bit. ``attributes.json``: a warning naming it and the fix.
    ``data.safetensors``: refused naming the file, "empty (0 bytes)" and the fix. Before: the same."""
    older = manifest(store)["steps"][-2]["optimizer_state"]["path"]
    (store / older).write_bytes(b"")
    (store / "attributes.json").write_bytes(b"")
    with caplog.at_level(logging.WARNING), pytest.warns(ExplaindWarning, match="attributes.json"):
        assert same_run(store, ref) == STEPS
    assert "restore attributes.json from a copy" in caplog.text
    assert salvaged(store, tmp_path / "out", ref) == STEPS
    (store / "data.safetensors").write_bytes(b"")
    with pytest.raises(TrajectoryError, match=r"data\.safetensors' is truncated .* empty \(0 bytes\).* copy the file "
                                              r"again"):
        same_run(store, ref)
    shutil.copy(tmp_path / "out/data.safetensors", store / "data.safetensors")
    assert resumes_to_the_end(store, ref) == STEPS


# --------------------------------------------------------------------------- links, moves and merges
def test_a_hard_link_deduplication_of_two_stores_keeps_each_one_its_run(store, tmp_path, ref):
    """A deduplicating tool (``rdfind -makehardlinks``) linked every identical file of a copy to the original; the
    copy resumed to the end: the original unchanged byte for byte (every file is replaced by a rename), each store
    its run bit for bit. Before: the same."""
    copy = Path(shutil.copytree(store, tmp_path / "copy"))
    for p in sorted(copy.rglob("*")):
        if p.is_file():
            p.unlink()
            os.link(store / p.relative_to(copy), p)
    before = snapshot(store)
    assert resumes_to_the_end(copy, ref) == STEPS
    assert snapshot(store) == before
    assert same_run(store, ref) == STEPS


def test_a_symbolic_link_deduplication_is_named_with_the_fix(store, tmp_path, ref):
    """A tool replaced step 2's file by a symbolic link to the same file elsewhere (``jdupes -l``, git-annex): refused,
    naming the file, the link and the fix (``cp -rL``, ``git annex unlock``), nothing changed; with the link resolved,
    the same run. Before: "leads outside the store (a symbolic link). The store is corrupted or was not written by
    explaind; re-record the run."."""
    blob = tmp_path / "annex/objects/SHA256E-s2848"
    blob.parent.mkdir(parents=True)
    shutil.move(store / "steps/000002.safetensors", blob)
    os.symlink(blob, store / "steps/000002.safetensors")
    with pytest.raises(TrajectoryError, match=r"'steps/000002\.safetensors' .* leads outside the store \(a symbolic "
                                              r"link\)\..* Fix: replace the link by the file it names \(cp -rL .*git "
                                              r"annex unlock"):
        same_run(store, ref)
    resolved = Path(shutil.copytree(store, tmp_path / "resolved", symlinks=False))  # cp -rL
    assert same_run(resolved, ref) == STEPS


def test_a_store_moved_while_a_reader_holds_it_with_a_link_left_behind(store, tmp_path, ref):
    """``mv run run2 && ln -s run2 run`` while a ``Trajectory`` of it is open: the reader goes on reading the same
    run (every step, bit for bit; ``verify()`` passes). Before: the same."""
    traj = load(store)
    os.rename(store, tmp_path / "run2")
    os.symlink(tmp_path / "run2", store)
    traj.verify()
    _assert_same(ref, traj)


def test_two_stores_merged_without_overwriting_keep_the_first_run(stores, store, tmp_path, ref, caplog):
    """``cp -rn other/. run/``: the other run's step files 6 and 7 joined this store (its own files kept). A load reads
    this run's 6 steps and warns naming steps 6 and 7; salvage keeps steps 0-5 and drops step 6 naming both runs'
    ``run_id``; a resume records steps 6 and 7 again, bit for bit. Before: the same."""
    for p in sorted((stores / "other").rglob("*")):
        target = store / p.relative_to(stores / "other")
        if p.is_file() and not target.exists():
            shutil.copy(p, target)
    with caplog.at_level(logging.WARNING):
        assert same_run(store, ref) == STEPS
    assert "holds the files of steps 6, 7, which its journal does not list" in caplog.text
    report = explaind.Trajectory.salvage(store, out=tmp_path / "out")
    assert _steps_of(report) == list(range(STEPS)) and [s for s, _ in report.dropped] == [6, 7]
    run_id = manifest(store)["run_id"]
    assert re.search(rf"belongs to the run '{manifest(stores / 'other')['run_id']}'.*run '{run_id}'",
                     report.dropped[0][1])
    assert resumes_to_the_end(store, ref) == STEPS


def test_a_step_file_of_another_run_of_the_same_size_is_named_as_another_runs(stores, store, tmp_path, ref):
    """A tool replaced step 2's file by the other run's step 2 (same name, same size, 2848 bytes; other values), its
    checksum not rewritten: a read and ``verify()`` refuse it naming both runs and the fix; salvage keeps steps 0-1.
    Before: "a file of another attempt at this step (a copy of the store resumed separately ...)" (not another run)."""
    other = stores / "other/steps/000002.safetensors"
    assert other.stat().st_size == (store / "steps/000002.safetensors").stat().st_size
    shutil.copy(other, store / "steps/000002.safetensors")
    theirs, ours = manifest(stores / "other")["run_id"], manifest(store)["run_id"]
    with pytest.raises(TrajectoryError, match=rf"000002\.safetensors' \(step 2\) is corrupted: .* Cause: it is a step "
                                              rf"file of another run \(its 'run' entry names the run '{theirs}'; this "
                                              rf"store is the run '{ours}'\).* Fix: restore this store's file"):
        load(store).verify()
    assert salvaged(store, tmp_path / "out", ref) == 2
