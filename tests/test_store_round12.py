"""Stores that travel, round 12 (part 1: copies and syncs): a store copied while its run was recorded (``cp -r``, an
``rsync`` whose files are of different moments, a hard-linked copy), copies that missed files (``rsync --max-size``,
a sync tool that skips dot-files, ``*.safetensors`` ignored by git), Git LFS pointer files, a store moved while a
reader holds it, a store inside another, a store whose ``steps/`` lives on another disk, two copies of one run
resumed apart, and a file that a network file system shows empty for a moment.

docs/recording.md, "Stores that travel, round 12", lists each case with what explaind did before. A store read as
the same run equals the uninterrupted run recorded in memory bit for bit (``_round12_kit.same_run``), and resumed,
the uninterrupted longer run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from _round12_kit import (
    LONG,
    STEPS,
    copy_at,
    lfs_pointer,
    load,
    record,
    reference,
    resumes_to_the_end,
    salvaged,
    same_run,
    snapshot,
)

from explaind.exceptions import TrajectoryError
from explaind.trajectory import store as store_module


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A store of ``STEPS`` steps, its recording ended."""
    store = tmp_path_factory.mktemp("finished") / "run"
    record(store)
    return store


@pytest.fixture
def store(finished, tmp_path):
    return Path(shutil.copytree(finished, tmp_path / "run"))


# --------------------------------------------------------------------------- copies taken while the run was recorded
def _no_dot_files(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n.startswith(".")])


@pytest.mark.parametrize("how", [shutil.copytree, _no_dot_files], ids=["cp -r", "a sync tool without dot-files"])
def test_a_copy_taken_while_recording_is_a_prefix_of_the_run_and_resumes(tmp_path, ref, how):
    """``cp -r`` of a live store after step 3 (the writer lock copied with it), or a sync tool that skips dot-files
    (``.explaind-writer.lock`` left behind): the copy holds steps 0-3 bit for bit and resumes to the end. Before: the
    same."""
    copy = tmp_path / "copy"
    record(tmp_path / "run", after=copy_at(3, copy, how))
    assert same_run(copy, ref) == 4
    assert resumes_to_the_end(copy, ref) == 4


def _rsync_of_two_moments(copy: Path):
    """An ``rsync`` of a live store: the top files (journal, manifest) copied after step 1, ``optimizer/`` and
    ``steps/`` after step 4 (rsync copies in name order; a slow transfer spans steps)."""
    def after(store: Path, s: int) -> None:
        if s == 1:
            copy.mkdir()
            for p in store.iterdir():
                if p.is_file():
                    shutil.copy2(p, copy / p.name)
        if s == 4:
            for folder in ("optimizer", "steps"):
                shutil.copytree(store / folder, copy / folder)
    return after


def test_an_rsync_of_a_live_store_names_the_later_state_and_salvage_keeps_every_step(tmp_path, ref, caplog):
    """Files of two moments: the journal lists steps 0-1, whose optimizer state slot was rewritten by step 3's state.
    A load reads steps 0-1 bit for bit (warning of steps 2-4's files); ``verify()`` and a resume refuse the state,
    naming the cause (copied while recorded) and the fix (copy again, or salvage); salvage keeps steps 0-4, which
    resume to the end. Before: "is corrupted ... Re-record the run" (no cause; re-recording was not needed)."""
    copy = tmp_path / "copy"
    record(tmp_path / "run", after=_rsync_of_two_moments(copy))
    assert load(copy).n_steps == 2
    cause = r"holds the optimizer state after step 3, later than step 1 .* copied .* while its run was being recorded"
    with pytest.raises(TrajectoryError, match=rf"state-\d\.safetensors' \(step 1\) is corrupted.*{cause}.*salvage"):
        load(copy).verify()
    before = snapshot(copy)
    with pytest.raises(TrajectoryError, match=cause):
        record(copy, LONG, resume=True)
    assert snapshot(copy) == before
    assert salvaged(copy, tmp_path / "saved", ref) == 5
    assert resumes_to_the_end(tmp_path / "saved", ref) == 5


def test_a_hard_linked_copy_made_while_recording_keeps_its_steps(tmp_path, ref, caplog):
    """``cp -al`` of a live store after step 3 (a backup or snapshot tool): the recording goes on to step 5. The copy
    holds steps 0-3 bit for bit and resumes to the end; the original all 6 steps. Before: the recording appended
    steps 4 and 5 to the journal both shared, so the copy listed steps whose files it does not hold ("steps/000004
    .safetensors (step 4) is missing")."""
    copy = tmp_path / "copy"
    record(tmp_path / "run", after=copy_at(3, copy, lambda a, b: subprocess.run(["cp", "-al", a, b], check=True)))
    assert same_run(copy, ref) == 4
    assert resumes_to_the_end(copy, ref) == 4
    assert same_run(tmp_path / "run", ref) == STEPS
    assert os.stat(tmp_path / "run" / "journal.jsonl").st_nlink == 1
    assert "has another name (a copy of the store made with hard links" in caplog.text


# --------------------------------------------------------------------------- copies that missed files
def test_a_step_file_skipped_by_a_copy_is_named_with_the_fix(store, tmp_path, ref, caplog):
    """``rsync --max-size`` skipped step 3's file: a read of step 3, ``verify()`` and a resume name the file, the
    cause and the fix (copy it, or salvage); salvage keeps steps 0-2 (their optimizer states were replaced by later
    steps': resumed from step 0 to the end). A resume of the store
    itself continues after step 5 (it reads the last step's files only) with a warning naming step 3 and the fix, and
    every read still names the file. Before: "The store is incomplete; re-record the run or resume it from the last
    complete step", and the resume went on without a word."""
    (store / "steps" / "000003.safetensors").unlink()
    fix = r"000003\.safetensors' \(step 3\) is missing\. Cause: a copy or sync that skipped it .*salvage"
    with pytest.raises(TrajectoryError, match=fix):
        load(store).params(4)
    with pytest.raises(TrajectoryError, match=fix):
        load(store).verify()
    assert salvaged(store, tmp_path / "saved", ref) == 3
    assert resumes_to_the_end(tmp_path / "saved", ref) == 0  # the state after step 2 was replaced by step 4's
    assert record(store, LONG, resume=True) == STEPS  # a resume reads only the last step's files, as before,
    assert re.search(r"lacks the files of steps 3, which its index lists .* Fix: stop, and copy them", caplog.text)
    with pytest.raises(TrajectoryError, match=fix):
        load(store).verify()


def test_a_store_checked_in_without_its_tensor_files_names_the_ignore_rule(store):
    """``*.safetensors`` in .gitignore: only the manifest, the journal and ``attributes.json`` travelled. Loading the
    store names the first file, the cause and the fix. Before: "is missing. The store is incomplete; re-record the
    run or resume it from the last complete step"."""
    for p in list(store.rglob("*.safetensors")):
        p.unlink()
    with pytest.raises(TrajectoryError, match=r"initial\.safetensors' is missing\. Cause: the store holds no tensor "
                                              r"file .*gitignore.*Fix: copy the \*\.safetensors files"):
        load(store).verify()


@pytest.mark.parametrize("which", ["steps/000002.safetensors", "every tensor file"])
def test_git_lfs_pointer_files_are_named_with_git_lfs_pull(store, tmp_path, ref, which):
    """A clone without ``git lfs pull``: pointer files in place of step 2's file, or of every tensor file. Refused
    naming the file, "Git LFS pointer" and ``git lfs pull``; with only step 2's, salvage keeps steps 0-1. Before: "is
    truncated or was modified: it has 129 bytes, the manifest recorded 2848." (no cause, no fix)."""
    for p in [store / which] if which != "every tensor file" else list(store.rglob("*.safetensors")):
        lfs_pointer(p)
    with pytest.raises(TrajectoryError, match=r"is truncated or was modified: .* Git LFS pointer file.*git lfs pull"):
        load(store).verify()
    if which != "every tensor file":
        assert salvaged(store, tmp_path / "saved", ref) == 2


# ------------------------------------------------------------------ stores moved, nested, linked, resumed apart
def test_a_store_renamed_while_a_reader_holds_it_is_named_as_moved(store, tmp_path, ref):
    """A reader holds the store; the directory is renamed. Its next read names the move and the fix (load it from its
    new path), which reads the run bit for bit. Before: "steps/000003.safetensors (step 3) is missing. The store is
    incomplete; re-record the run"."""
    traj = load(store)
    traj.params(1)
    os.rename(store, tmp_path / "renamed")
    with pytest.raises(TrajectoryError, match=r"is missing\. Cause: the store directory .* is gone from this path: "
                                              r"moved, renamed or deleted while it was open.*Trajectory\.load"):
        traj.params(4)
    assert same_run(tmp_path / "renamed", ref) == STEPS


def test_a_store_copied_into_another_store(store, finished, ref):
    """A store copied into another one (``cp -r run2 run/`` and into its ``steps/``): both read as their runs, the
    outer one resumes to the end, and an ``overwrite=True`` of the outer one keeps the inner stores. Before: the
    same."""
    shutil.copytree(finished, store / "inner")
    shutil.copytree(finished, store / "steps" / "inner")
    assert same_run(store / "inner", ref) == STEPS
    assert resumes_to_the_end(store, ref) == STEPS
    record(store, 2, overwrite=True)
    assert same_run(store / "inner", ref) == same_run(store / "steps" / "inner", ref) == STEPS
    assert same_run(store, ref) == 2


def test_a_steps_folder_linked_to_another_disk_is_refused_naming_the_folder(store, tmp_path, ref):
    """``steps/`` moved to another disk and linked back: refused (a store's files are read only inside it), naming
    the folder and the fix; linking the whole store instead reads it bit for bit. Before: "leads outside the store
    (a symbolic link). The store is corrupted or was not written by explaind; re-record the run"."""
    disk = tmp_path / "other disk"
    disk.mkdir()
    shutil.move(store / "steps", disk / "steps")
    os.symlink(disk / "steps", store / "steps")
    with pytest.raises(TrajectoryError, match=r"leads outside the store \(a symbolic link\)\. Its folder 'steps' is a "
                                              r"symbolic link .* Fix: move 'steps' back into the store"):
        load(store).verify()
    os.unlink(store / "steps")
    shutil.move(disk / "steps", store / "steps")
    shutil.move(store, disk / "run")
    os.symlink(disk / "run", tmp_path / "link")
    assert same_run(tmp_path / "link", ref) == STEPS


def test_two_copies_resumed_apart_then_one_copied_over_the_other(tmp_path, ref):
    """Copy B of a live store after step 3; the original A records on; B is resumed with other batches (another
    attempt at steps 4-7). B copied over A as a whole (``cp -r B/. A/``) reads as B's run bit for bit; only B's
    ``steps/`` copied over A is refused at step 4, naming another attempt and the fix; salvage keeps steps 0-3. Before:
    the same outcomes, the refusal "is corrupted ... Re-record the run"."""
    a, b = tmp_path / "A", tmp_path / "B"
    record(a, after=copy_at(3, b))
    assert record(b, LONG, resume=True, shift=100) == 4
    theirs = snapshot(b)
    whole = Path(shutil.copytree(a, tmp_path / "A whole"))
    subprocess.run(["cp", "-r", f"{b}/.", f"{whole}/"], check=True)
    assert {k: v for k, v in snapshot(whole).items() if k in theirs} == theirs
    assert load(whole).n_steps == LONG
    load(whole).verify()
    for s in range(LONG + 1):
        for k, v in load(whole).params(s).items():
            assert v.equal(load(b).params(s)[k]), (s, k)
    subprocess.run(["cp", "-r", f"{b}/steps/.", f"{a}/steps/"], check=True)
    with pytest.raises(TrajectoryError, match=r"000004\.safetensors' \(step 4\) is corrupted.*a file of another "
                                              r"attempt at this step"):
        load(a).verify()
    assert salvaged(a, tmp_path / "saved", ref) == 4


# --------------------------------------------------------------------------- a network file system
def _fill_later(path: Path, data: bytes, delay: float) -> threading.Thread:
    def fill():
        time.sleep(delay)
        tmp = path.with_name(path.name + ".fill")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    thread = threading.Thread(target=fill)
    thread.start()
    return thread


@pytest.mark.parametrize("relpath", ["steps/000002.safetensors", "manifest.json"])
def test_a_file_shown_empty_for_a_moment_is_read_once_it_shows(store, ref, relpath):
    """NFS-like delayed visibility: the file is present but empty, and shows its bytes 0.3 s later. The read waits
    (up to a second) and reads the run bit for bit. Before: refused at once ("truncated or was modified: it has 0
    bytes"; "manifest.json is not valid JSON")."""
    data = (store / relpath).read_bytes()
    (store / relpath).write_bytes(b"")
    thread = _fill_later(store / relpath, data, 0.3)
    try:
        traj = load(store)
        traj.params(3)
    finally:
        thread.join()
    assert same_run(store, ref) == STEPS


@pytest.mark.parametrize("relpath", ["steps/000002.safetensors", "manifest.json"])
def test_a_file_that_stays_empty_is_named_with_the_cause(store, relpath):
    """A file that stays empty past the wait: refused naming the file, the cause (an interrupted copy, a network file
    system) and the fix. Before: "it has 0 bytes, the manifest recorded 2848." / "not valid JSON" (no cause)."""
    (store / relpath).write_bytes(b"")
    start = time.monotonic()
    with pytest.raises(TrajectoryError, match=r"Cause: it is empty \(0 bytes\), and stayed so for a second"):
        load(store).verify()
    assert time.monotonic() - start < 10


def test_a_copy_taken_while_the_store_was_set_up_names_that_nothing_was_recorded(tmp_path, ref, monkeypatch):
    """A copy taken after the start files and the empty journal were written but before the manifest, by a tool that
    skips dot-files (the set-up marker left behind): a load says nothing was recorded there and names the fix; a new
    recording and a resume refuse it, changing nothing; ``overwrite=True`` records there bit for bit. Before: "has lost
    its manifest.json: it holds journal.jsonl of a recording ... nothing recorded can be checked or salvaged", and
    ``overwrite=True`` was refused too (the files had to be deleted by hand)."""
    copy = tmp_path / "copy"
    finish = store_module.StoreWriter.finish_setup

    def copy_first(writer):
        _no_dot_files(writer.root, copy)
        finish(writer)

    monkeypatch.setattr(store_module.StoreWriter, "finish_setup", copy_first)
    record(tmp_path / "run", 2)
    monkeypatch.undo()
    assert sorted(os.listdir(copy)) == ["data.safetensors", "initial.safetensors", "journal.jsonl"]
    with pytest.raises(TrajectoryError, match=r"holds the start files and an empty journal of a recording that "
                                              r"recorded no step.*Nothing was recorded there.*overwrite=True"):
        load(copy)
    before = snapshot(copy)
    for resume in (False, True):
        with pytest.raises(TrajectoryError, match=r"recorded no step.*Pass overwrite=True"):
            record(copy, 2, resume=resume)
    assert snapshot(copy) == before
    record(copy, STEPS, overwrite=True)
    assert same_run(copy, ref) == STEPS
