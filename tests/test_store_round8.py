"""Stores attacked by strangers and crashes, round 8: what round 7 left (an optimizer state of an old store, the
attribute fingerprint's file, what a failed write leaves, interrupted writes) and new ones (file systems that refuse
or fail a directory's flush or a rename, a store path with ``~`` or a trailing slash, index files of the wrong JSON
type or size, another store's step directory, two recorders at once, a reader beside a resume).

Each case names what explaind did before round 8; docs/recording.md, "Strangers' files, round 8", lists them. A
forged file keeps a valid checksum where it has one (its record rewritten to match), as a stranger's tool would
leave it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_store_round5 import _read_all as _values  # everything a reader gets, after verify()
from test_store_round5 import _same
from test_store_round7 import (
    ORDER,
    STATE_FORGERIES,
    STEPS,
    X,
    Y,
    _as_schema_2,
    _fail_journal_fsync,
    _manifest,
    _newest_state,
    _record,
    _record_templates,
    _rewrite,
    _write_manifest,
)
from test_store_strangers import _model

import explaind
from explaind._io import WRITE_RETRIES
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.trajectory._index import read_manifest


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return _record_templates(tmp_path_factory.mktemp("round8"), sparse=False)  # dense, other (shifted), long


@pytest.fixture
def dense(templates, tmp_path):
    return Path(shutil.copytree(templates / "dense", tmp_path / "dense"))


def _files(store: Path) -> dict[Path, bytes]:
    """Every file of ``store`` but its writer lock, with its bytes."""
    return {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and ".explaind-writer" not in p.name}


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


# --------------------------------------------------------------------------- 1a: an old store's optimizer state
@pytest.mark.parametrize("case", ["an entry cast to float32", "an entry renamed", "a hyperparameter edited"])
def test_an_unbound_optimizer_state_is_not_restored_without_consent(dense, templates, case):
    """Before: a store written before schema 3 took a forged state on resume (round 7 left it). Now restore() refuses
    any state its step file does not bind, naming the file and the fixes; no byte changes."""
    _as_schema_2(dense)
    manifest = _manifest(dense)
    _rewrite(dense, _newest_state(manifest), STATE_FORGERIES[case][0])
    _write_manifest(dense, manifest)
    before = _files(dense)
    with pytest.raises(TrajectoryError, match=r"restore\(\) refuses the optimizer state 'optimizer/state-\d\."
                                              r"safetensors' \(step 3\) of the store '[^']*': its step file "
                                              r"'steps/000003\.safetensors' does not bind it.*Fix: if the store was "
                                              r"not modified since it was recorded, call "
                                              r"rec\.restore\(accept_unbound_state=True\)"):
        _record(dense, 2 * STEPS, resume=True)
    assert _files(dense) == before


def test_an_unbound_optimizer_state_restored_with_consent_resumes_bit_for_bit(dense, templates, caplog):
    """Refused, then asked again with consent in the same process (the refused recorder left no lock behind)."""
    _as_schema_2(dense)
    with pytest.raises(TrajectoryError, match=r"does not bind it"):
        _record(dense, 2 * STEPS, resume=True)
    model = _model()
    rec = explaind.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), loss="mse",
                                      train_data=(X, Y), store=dense, resume=True)
    with pytest.raises(ConfigError, match=r"restore\(accept_unbound_state='yes'\): allowed are True and False"):
        rec.restore(accept_unbound_state="yes")
    _record(dense, 2 * STEPS, resume=True, accept_unbound=True)
    assert "restore(accept_unbound_state=True): loading the optimizer state" in caplog.text
    assert _same(_values(dense), _values(templates / "long"))


def test_an_unbound_forged_state_is_refused_against_the_optimizer_s_own_checkpoint(dense, templates):
    """``with rec:`` without restore(): the optimizer holds the state of the user's own checkpoint of step N, which
    the store's (unbound, forged) state file must equal bit for bit."""
    _as_schema_2(dense)
    manifest = _manifest(dense)
    _rewrite(dense, _newest_state(manifest), lambda tensors, _m: tensors.update(
        {k: v * 1.5 for k, v in tensors.items() if k.endswith("momentum_buffer")}))
    _write_manifest(dense, manifest)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for idx in ORDER[:STEPS]:  # the user's own checkpoint of step 4: the same loop, run again
        opt.zero_grad()
        F.mse_loss(model(X[idx]), Y[idx]).backward()
        opt.step()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, Y), store=dense, resume=True)
    with pytest.raises(ConfigError, match=r"the optimizer holds state that differs from the state the store .* "
                                          r"saved after step 3"):
        with rec:
            pass


# --------------------------------------------------------------------------- 1b: attributes.json
def _attribute_warnings(store: Path, model=None) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explaind.Trajectory.load(store, model=model or _model())
    return [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]


def _edit_entry(path: Path) -> None:
    record = json.loads(path.read_text())
    name = next(iter(record["entries"]))
    record["entries"][name] = "'edited'"
    path.write_text(json.dumps(record, sort_keys=True))


ATTRIBUTE_FILES = {
    "an entry edited": (_edit_entry, r"does not match its checksum \(it records 'xxh3-128:"),
    "another run's file": (None, r"belongs to the run '[0-9a-f]{32}', but the store's manifest names the run "
                                 r"'[0-9a-f]{32}': the file \(or the manifest\) was replaced"),
    "a byte-order mark": (lambda p: p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes()), None),
    "bytes that are not UTF-8": (lambda p: p.write_bytes(p.read_bytes().replace(b'"format"', b'"f\xffrmat"')),
                                 r"cannot be read"),
    "a key given twice": (lambda p: p.write_bytes(p.read_bytes().replace(b'{"checksum"', b'{"format": 1, "checksum"',
                                                                         1)), r"cannot be read \(.*format"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:40]), r"cannot be read"),
    "a JSON list": (lambda p: p.write_text("[1, 2]"), r"is not an attribute fingerprint explaind writes"),
    "a FIFO": (lambda p: (p.unlink(), os.mkfifo(p)), r"cannot be read \(.*not a regular file"),
    "a symbolic link": (lambda p: (p.rename(p.with_name("moved.json")), p.symlink_to(p.with_name("moved.json"))),
                        r"cannot be read \(.*symbolic link"),
}


@pytest.mark.parametrize("case", list(ATTRIBUTE_FILES))
def test_an_attribute_fingerprint_that_is_not_the_run_s_is_not_used_and_named(dense, templates, case):
    """Before: attributes.json had no checksum: an edited or copied-in file was compared as the run's (a false alarm
    or a missed change), a link followed, a broken one skipped with an INFO line, a FIFO hung the load. Now each is a
    warning naming the file, the problem and the fix, and the check is skipped (a byte-order mark is read as the
    same file)."""
    edit, problem = ATTRIBUTE_FILES[case]
    path = dense / "attributes.json"
    if edit is None:
        shutil.copyfile(templates / "other/attributes.json", path)
    else:
        edit(path)
    found: list[list[str]] = []
    loader = threading.Thread(target=lambda: found.append(_attribute_warnings(dense)), daemon=True)
    loader.start()
    loader.join(timeout=60)
    assert found, "Trajectory.load did not return (blocked on attributes.json)"
    if problem is None:
        assert found[0] == []
        return
    assert len(found[0]) == 1, found
    assert found[0][0].startswith(f"The attribute fingerprint 'attributes.json' of the store {str(dense)!r} ")
    assert "Fix: restore attributes.json from a copy of the store, or delete it" in found[0][0]
    import re
    assert re.search(problem, found[0][0]), found[0][0]


def test_the_attribute_fingerprint_still_warns_about_a_changed_attribute(dense):
    """The bound file is the run's: a plain attribute changed since the recording is still named (also in a file of
    the format before round 8, without run_id and checksum)."""
    model = _model()
    model.temperature = 2.0
    assert any("temperature" in w and "differs from the recording" in w for w in _attribute_warnings(dense, model))
    path = dense / "attributes.json"
    record = json.loads(path.read_text())
    assert set(record) == {"checksum", "entries", "format", "ignore", "run_id"}
    assert record["run_id"] == _manifest(dense)["run_id"]
    path.write_text(json.dumps({k: v for k, v in record.items() if k not in ("checksum", "run_id")}))
    warned = _attribute_warnings(dense, model)
    assert len(warned) == 1 and "temperature" in warned[0] and "differs from the recording" in warned[0]


# --------------------------------------------------------------------------- 1c: what a failed write leaves
def test_a_full_disk_in_a_step_file_says_that_step_is_not_stored(tmp_path, templates, monkeypatch):
    real = os.write

    def write(fd, data):
        if "000002.safetensors.tmp" in _fd_path(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(TrajectoryError, match=r"Writing step 2 of the trajectory store .* failed: OSError: \[Errno "
                                              r"28\] No space left on device: '.*/steps/000002\.safetensors'\. On "
                                              r"disk: steps 0 to 1 are stored "
                                              r"\(their journal lines written and flushed\); step 2 is not.*fix the "
                                              r"cause and resume"):
        _record(tmp_path / "run", 2 * STEPS, fsync=True, background_writes=False)
    monkeypatch.setattr(os, "write", real)
    assert read_manifest(tmp_path / "run").n_steps == 2
    _record(tmp_path / "run", 2 * STEPS, resume=True)
    assert _same(_values(tmp_path / "run"), _values(templates / "long"))


def test_a_full_disk_on_the_journal_says_its_line_may_be_on_disk(tmp_path, templates, monkeypatch):
    """Before: "Steps before it are stored", while the failing step's journal line was whole on disk (the flush
    failed, not the write) and a reader and a resume kept that step."""
    _fail_journal_fsync(monkeypatch, 3)
    with pytest.raises(TrajectoryError, match=r"Writing step 2 of .* On disk: steps 0 to 1 are stored \(their journal "
                                              r"lines written and flushed\); the journal lines of step 2 were being "
                                              r"appended when the error came and may be on disk whole"):
        _record(tmp_path / "run", 2 * STEPS, fsync=True, background_writes=False)
    monkeypatch.undo()
    assert read_manifest(tmp_path / "run").n_steps == 3  # step 2's line is whole: it is stored
    _record(tmp_path / "run", 2 * STEPS, resume=True)
    assert _same(_values(tmp_path / "run"), _values(templates / "long"))


# --------------------------------------------------------------------------- 1d: interrupted writes retried
@pytest.mark.parametrize("error", [InterruptedError(errno.EINTR, "Interrupted system call"),
                                   BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")])
def test_interrupted_writes_are_retried_then_loud(tmp_path, templates, monkeypatch, error):
    """Before: one EINTR or EAGAIN from os.write failed the step. Now WRITE_RETRIES in a row are retried (the same
    store), one more is a TrajectoryError naming the error and the retries, and the store resumes bit for bit."""
    real, failures = os.write, {"left": 0}

    def write(fd, data):
        if "000002.safetensors.tmp" in _fd_path(fd) and failures["left"] > 0:
            failures["left"] -= 1
            raise type(error)(error.errno, error.strerror)
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    failures["left"] = WRITE_RETRIES
    _record(tmp_path / "retried", 2 * STEPS, background_writes=False)
    assert failures["left"] == 0
    assert _same(_values(tmp_path / "retried"), _values(templates / "long"))
    failures["left"] = WRITE_RETRIES + 1
    with pytest.raises(TrajectoryError, match=rf"Writing step 2 .*{type(error).__name__}: \[Errno {error.errno}\] "
                                              rf".*\({WRITE_RETRIES + 1} times in a row at byte 0 of \d+; retried "
                                              rf"{WRITE_RETRIES} times\)"):
        _record(tmp_path / "run", 2 * STEPS, background_writes=False)
    monkeypatch.setattr(os, "write", real)
    _record(tmp_path / "run", 2 * STEPS, resume=True)
    assert _same(_values(tmp_path / "run"), _values(templates / "long"))


def test_writes_of_at_most_16_bytes_give_the_same_store_and_a_whole_lock(tmp_path, templates, monkeypatch):
    """Every os.write writes at most 16 bytes (a pipe-like device, a signal at every call): before, the writer lock
    was written with one os.write, kept its first 16 bytes and, unreadable, was left behind after the run."""
    real, locks = os.write, []

    def write(fd, data):
        if ".explaind-writer.lock" in _fd_path(fd):
            locks.append(fd)
        return real(fd, memoryview(data)[:16])

    monkeypatch.setattr(os, "write", write)
    _record(tmp_path / "run", STEPS, background_writes=False, fsync=False)
    monkeypatch.setattr(os, "write", real)
    assert locks and not (tmp_path / "run/.explaind-writer.lock").exists()
    assert _same(_values(tmp_path / "run"), _values(templates / "dense"))


# --------------------------------------------------------------------------- file systems that refuse or fail
def _directory_fsync(monkeypatch, number: int) -> list[str]:
    real, seen = os.fsync, []

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            seen.append(_fd_path(fd))
            raise OSError(number, os.strerror(number))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_a_file_system_that_does_not_flush_directories_records_the_same_store(tmp_path, templates, monkeypatch):
    seen = _directory_fsync(monkeypatch, errno.EINVAL)
    _record(tmp_path / "run", 2 * STEPS, fsync=True)
    monkeypatch.undo()
    assert any(p.endswith("/run/steps") for p in seen)
    assert _same(_values(tmp_path / "run"), _values(templates / "long"))


def test_a_failing_directory_flush_is_an_error_and_the_store_resumes(tmp_path, templates, monkeypatch):
    """Before: an EIO from the flush of a directory was ignored: the renames of a step might not survive a power
    loss and the recording went on as if they would."""
    _directory_fsync(monkeypatch, errno.EIO)
    with pytest.raises(TrajectoryError, match=r"(set up|Writing step \d+ of the trajectory store).*Input/output error"):
        _record(tmp_path / "run", 2 * STEPS, fsync=True, background_writes=False)
    monkeypatch.undo()
    _record(tmp_path / "run", 2 * STEPS, resume=True)
    assert _same(_values(tmp_path / "run"), _values(templates / "long"))


def test_a_rename_across_devices_is_an_error_and_the_store_resumes(tmp_path, templates, monkeypatch):
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith("000002.safetensors"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(TrajectoryError, match=r"Writing step 2 .*\[Errno 18\] Invalid cross-device link\. On disk: "
                                              r"steps 0 to 1 are stored"):
        _record(tmp_path / "run", 2 * STEPS, background_writes=False)
    monkeypatch.setattr(os, "replace", real)
    assert not list((tmp_path / "run/steps").glob("*.tmp-*"))  # the temporary file is gone
    _record(tmp_path / "run", 2 * STEPS, resume=True)
    assert _same(_values(tmp_path / "run"), _values(templates / "long"))


# --------------------------------------------------------------------------- how a store is named
def test_a_store_path_with_a_tilde_is_in_the_home_directory(tmp_path, templates, monkeypatch):
    """Before: store="~/run" wrote a directory named '~' below the working directory."""
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "cwd")
    _record("~/run", STEPS)
    assert not (tmp_path / "cwd/~").exists()
    assert _same(_values(tmp_path / "home/run"), _values(templates / "dense"))
    assert explaind.Trajectory.load("~/run", model=_model()).n_steps == STEPS
    with pytest.raises(TrajectoryError, match=r"The store path '~no-such-user-f8/run' starts with '~', but the home "
                                              r"directory it names is unknown"):
        _record("~no-such-user-f8/run", STEPS)


def test_a_store_path_with_a_trailing_slash_is_the_same_store(tmp_path, templates):
    _record(f"{tmp_path / 'run'}/", STEPS)
    _record(tmp_path / "run", 2 * STEPS, resume=True)
    assert _same(_values(Path(f"{tmp_path / 'run'}//")), _values(templates / "long"))


# --------------------------------------------------------------------------- index files of the wrong type or size
@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ("3", "int"), ("null", "NoneType"), ('"x"', "str")])
def test_a_manifest_of_another_json_type_is_refused_naming_it(dense, text, kind):
    (dense / "manifest.json").write_text(text)
    with pytest.raises(TrajectoryError, match=rf"manifest.json' holds a JSON {kind}, not an object"):
        explaind.Trajectory.load(dense, model=_model())


@pytest.mark.parametrize("line", ["[1, 2]", "3", "null"])
def test_a_journal_line_of_another_json_type_is_refused_naming_the_line(dense, line):
    manifest = _manifest(dense)
    manifest.update(steps=[], complete=False)
    _write_manifest(dense, manifest)
    journal = dense / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:2]) + line + "\n" + "".join(lines[2:]))
    with pytest.raises(TrajectoryError, match=r"journal.jsonl' is corrupted at line 3: the whole = .*Input should be "
                                              r"an object"):
        explaind.Trajectory.load(dense, model=_model())


def test_a_manifest_holding_a_100_mb_name_is_refused_with_a_short_message(dense):
    """Before: the loss name was looked up in the registry, whose error quoted all 100 MB of it."""
    manifest = _manifest(dense)
    manifest["loss"] = "x" * (100 << 20)
    _write_manifest(dense, manifest)
    with pytest.raises(TrajectoryError, match=r"loss = 'xxx+\.\.\.: String should have at most 4096 characters") as exc:
        explaind.Trajectory.load(dense, model=_model())
    assert len(str(exc.value)) < 1000


def test_a_manifest_holding_a_100_mb_string_in_extras_loads(dense, templates):
    manifest = _manifest(dense)
    manifest["extras"] = {"note": "x" * (100 << 20)}  # free-form, read for information only
    _write_manifest(dense, manifest)
    assert _same(_values(dense), _values(templates / "dense"))


# --------------------------------------------------------------------------- stores beside each other
def test_steps_directory_linked_to_another_store_is_refused_and_the_other_untouched(dense, templates, tmp_path):
    other = Path(shutil.copytree(templates / "other", tmp_path / "other"))
    shutil.rmtree(dense / "steps")
    (dense / "steps").symlink_to(other / "steps", target_is_directory=True)
    before = _files(other)
    with pytest.raises(TrajectoryError, match=r"'steps/000000\.safetensors' of the store '[^']*' leads outside the "
                                              r"store \(a symbolic link\)"):
        explaind.Trajectory.load(dense, model=_model()).params(1)
    with pytest.raises(TrajectoryError, match=r"'steps/000003\.safetensors' of the store '[^']*' leads outside"):
        _record(dense, 2 * STEPS, resume=True)
    assert _files(other) == before


def test_two_recorders_in_one_process_write_two_stores_at_once(tmp_path, templates):
    """Steps of two runs interleaved, both stores written in the background at once: each is its run's."""
    runs = []
    for name, shift in (("a", 0.0), ("b", 0.01)):
        model = _model()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(shift)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, Y), store=tmp_path / name)
        runs.append((model, opt, rec))
    for _, _, rec in runs:
        rec.__enter__()
    try:
        for idx in ORDER[:STEPS]:
            for model, opt, rec in runs:
                opt.zero_grad()
                F.mse_loss(model(X[idx]), Y[idx]).backward()
                rec.log_batch(idx)
                opt.step()
    finally:
        for _, _, rec in reversed(runs):
            rec.__exit__(None, None, None)
    assert _same(_values(tmp_path / "a"), _values(templates / "dense"))
    assert _same(_values(tmp_path / "b"), _values(templates / "other"))


def test_a_reader_beside_a_resume_reads_a_consistent_prefix(dense, templates):
    """Trajectory.load in a loop while another thread resumes the store: the resume rewrites the journal and the
    manifest (atomically); every load is a prefix of the run, never fewer steps than the one before."""
    long = explaind.Trajectory.load(templates / "long", model=_model())
    thetas = [t for s in range(2 * STEPS + 1) for t in long.params(s).values()]
    stop, seen, problems = threading.Event(), [], []
    template = _model()

    def read() -> None:
        while not stop.is_set():
            try:
                traj = explaind.Trajectory.load(dense, model=template)
            except TrajectoryError as exc:
                problems.append(exc)
                continue
            n = traj.n_steps
            got = [t for s in range(n + 1) for t in traj.params(s).values()]
            if not _same(got, thetas[: len(got)]) or (seen and n < seen[-1]) or n < STEPS:
                problems.append(f"{n} steps read, not a prefix of the run")
            seen.append(n)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        _record(dense, 2 * STEPS, resume=True)
    finally:
        stop.set()
        reader.join()
    assert not problems, problems[:3]
    assert seen and _same(_values(dense), _values(templates / "long"))


def test_a_manifest_naming_another_optimizer_class_is_refused_when_a_step_is_read(dense):
    manifest = _manifest(dense)
    assert manifest["optimizer_class"] == "torch.optim.sgd.SGD"
    manifest["optimizer_class"] = "torch.optim.adam.Adam"  # the steps were recorded with SGD
    _write_manifest(dense, manifest)
    with pytest.raises(TrajectoryError, match=r"000000\.safetensors' \(step 0\) of the store '[^']*' was recorded "
                                              r"with another description of the run than the manifest's"):
        explaind.Trajectory.load(dense, model=_model()).updates(0)
