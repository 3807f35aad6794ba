"""Stores attacked by strangers and crashes, round 9: forged metadata entries of a step file, what ``verify()``
checks of a step file, writer locks that explaind did not write (also from a clock that runs ahead), store paths
that are no paths, an editor's journal, safetensors headers that lie in new ways, files of zero bytes, files and
directories in each other's places, and index files that are huge, nested or from the future.

Each case names what explaind did before round 9; docs/recording.md, "Strangers' files, round 9", lists them. A
forged file keeps a valid checksum (its record rewritten to match), as a stranger's tool would leave it. Every
store that is read as the same run is compared bit for bit with the uninterrupted run (round 5's reader).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import struct
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_store_round5 import _denied, _forge_step, _in_thread, _pack, _same, _tensor
from test_store_round5 import _read_all as _values  # everything a reader gets, after verify()
from test_store_round7 import (
    ORDER,
    STEPS,
    X,
    Y,
    _as_schema_2,
    _manifest,
    _record,
    _record_templates,
    _rewrite,
    _write_manifest,
)
from test_store_round8 import _files
from test_store_strangers import _model

import explaind
from explaind.exceptions import ConfigError, TrajectoryError
from explaind.trajectory.lock import LOCK, WriterLock


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return _record_templates(tmp_path_factory.mktemp("round9"))  # dense, other, long (8 steps), sparse


@pytest.fixture
def dense(templates, tmp_path):
    return Path(shutil.copytree(templates / "dense", tmp_path / "dense"))


def _load(store: Path) -> explaind.Trajectory:
    return explaind.Trajectory.load(store, model=_model())


def _set_meta(key: str, value: str):
    def edit(_tensors, meta):
        meta[key] = value
    return edit


def _forge_meta(store: Path, step: int, key: str, value: str) -> None:
    """Set the metadata entry ``key`` of step ``step``'s file to ``value``; its record keeps a matching checksum."""
    manifest = _manifest(store)
    _rewrite(store, manifest["steps"][step]["file"], _set_meta(key, value))
    _write_manifest(store, manifest)


NESTED = "[" * 100_000 + "]" * 100_000
#: what a forged entry holds, and what the refusal says of it
ENTRIES = {
    "not JSON": ("not json", r"it is not valid JSON \(Expecting value"),
    "a JSON list": ("[1]", r"it is a JSON list, not an object"),
    "nested deeper than the parser goes": (NESTED, r"it is not valid JSON \(maximum recursion depth exceeded"),
}


# --------------------------------------------------------------------------- 1: a step file's metadata entries
@pytest.mark.parametrize("case", [*ENTRIES, "an object without the run's identity"])
def test_a_forged_run_entry_is_refused_by_a_read_and_by_verify_naming_the_entry(dense, case):
    """Before: the parser's JSONDecodeError, an AttributeError ('list' object has no attribute 'get') or a
    RecursionError escaped from the first read of the step and from verify()."""
    value, problem = ENTRIES.get(case, ('{"start": {}}', r"its fields \['id'\] are missing or of another type"))
    _forge_meta(dense, 1, "run", value)
    message = (rf"'steps/000001\.safetensors' \(step 1\) of the store '[^']*' holds a 'run' entry that explaind did "
               rf"not write: {problem}.*The file was forged with a matching checksum, or the store is corrupted")
    traj = _load(dense)
    with pytest.raises(TrajectoryError, match=message):
        traj.params(2)  # theta_2: step 1's file
    with pytest.raises(TrajectoryError, match=message):
        traj.verify()


@pytest.mark.parametrize("case", [*ENTRIES, "tensors that are a number", "tensors that are not [dtype, shape]"])
def test_a_forged_state_entry_is_refused_by_verify_and_by_a_resume_that_changes_nothing(dense, case):
    """The entry that binds the optimizer state written after step 3. Before: the parser's exception, a TypeError
    ('list indices must be integers', "'int' object is not iterable") or a RecursionError."""
    value, problem = {**ENTRIES, "tensors that are a number": ('{"tensors": 5, "description": null}',
                                                               r"its fields \['tensors'\] are missing"),
                      "tensors that are not [dtype, shape]": ('{"tensors": {"state.0.momentum_buffer": 5}, '
                                                              '"description": null}',
                                                              r"its tensors are not \[dtype, shape\] pairs")}[case]
    _forge_meta(dense, STEPS - 1, "state", value)
    message = (r"'steps/000003\.safetensors' \(the step file that bound 'optimizer/state-\d\.safetensors' \(step 3\) "
               rf"of the store '[^']*'\) holds a 'state' entry that explaind did not write: {problem}")
    with pytest.raises(TrajectoryError, match=message):
        _load(dense).verify()
    before = _files(dense)
    with pytest.raises(TrajectoryError, match=message):
        _record(dense, 2 * STEPS, resume=True)
    assert _files(dense) == before


def test_a_sparse_step_s_replay_record_nested_deeper_than_the_parser_goes_is_refused(templates, tmp_path):
    """Before: a RecursionError from the replay of the step."""
    sparse = Path(shutil.copytree(templates / "sparse", tmp_path / "sparse"))
    _forge_meta(sparse, 4, "replay", NESTED)
    traj = _load(sparse)
    with pytest.raises(TrajectoryError, match=r"steps/000004\.safetensors' lacks a valid replay record"):
        traj.params(5)


def test_a_start_state_s_parameter_list_nested_deeper_than_the_parser_goes_is_refused(tmp_path):
    """A store of schema 2 (its step files bind no start file) recorded from an optimizer that held state. Before: a
    RecursionError from ``optimizer_start()``."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    F.mse_loss(model(X), Y).backward()
    opt.step()  # an unrecorded step: the recording starts from optimizer state
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, Y), store=tmp_path / "run")
    with rec:
        for idx in ORDER[:2]:
            opt.zero_grad()
            F.mse_loss(model(X[idx]), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    _as_schema_2(tmp_path / "run")
    manifest = _manifest(tmp_path / "run")
    _rewrite(tmp_path / "run", manifest["initial_state_file"], _set_meta("params", NESTED))
    _write_manifest(tmp_path / "run", manifest)
    with pytest.raises(TrajectoryError, match=r"initial_state\.safetensors' holds the optimizer's start state without "
                                              r"its description"):
        _load(tmp_path / "run").optimizer_start()


# --------------------------------------------------------------------------- 2: what verify() checks of a step file
def _another_step_s_file(store: Path) -> None:
    """Step 2's file a hard link to step 1's, its record's size and checksum rewritten to match."""
    target = store / "steps/000002.safetensors"
    target.unlink()
    os.link(store / "steps/000001.safetensors", target)
    manifest = _manifest(store)
    manifest["steps"][2]["file"] = manifest["steps"][1]["file"] | {"path": "steps/000002.safetensors"}
    _write_manifest(store, manifest)


def _grad_scale_edited(store: Path) -> None:
    manifest = _manifest(store)
    manifest["steps"][2]["grad_scale"] *= 2
    _write_manifest(store, manifest)


VERIFY_CASES = {
    "a hard link to another step's file": (_another_step_s_file, r"holds step '1', not step 2: the manifest points "
                                                                  r"at another step's file"),
    "a step's gradient scale edited": (_grad_scale_edited, r"The record of step 2 in the manifest or journal "
                                                           r"\(gradient scale, .*\) differs from the one checksummed"),
}


@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_verify_finds_what_a_read_of_the_step_finds(dense, case):
    """Before: verify() compared each step file with its checksum and its run only, and passed both stores (a read of
    step 2 refused them)."""
    edit, message = VERIFY_CASES[case]
    edit(dense)
    traj = _load(dense)
    with pytest.raises(TrajectoryError, match=message):
        traj.params(3)  # theta_3: step 2's file
    with pytest.raises(TrajectoryError, match=message):
        traj.verify()


# --------------------------------------------------------------------------- 3: writer locks explaind did not write
def _lock(store: Path, content: bytes, age: float) -> None:
    """A lock holding ``content``, last modified ``age`` seconds ago (negative: in the future)."""
    (store / LOCK).write_bytes(content)
    then = time.time() - age
    os.utime(store / LOCK, (then, then))


def _holder_json(pid) -> bytes:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "since": "2026-01-01 00:00:00"}).encode()


LOCKS = {
    "a process id past what kill takes (10**30)": _holder_json(10**30),  # before: OverflowError
    "process id 0": _holder_json(0),  # before: refused forever, "being written by process 0"
    "process id -1": _holder_json(-1),  # the same
    "process id true": _holder_json(True),  # the same, "process True" (os.kill(1, 0): init runs)
    "a process id as a string": _holder_json("1"),  # the same
    "JSON nested deeper than the parser goes": b"[" * 4096,  # before: RecursionError
    "a JSON list": b"[1, 2]",  # before: taken over (unchanged)
}


@pytest.mark.parametrize("case", list(LOCKS))
def test_a_lock_explaind_did_not_write_is_named_while_new_and_taken_over_once_old(dense, templates, case):
    _lock(dense, LOCKS[case], age=0)
    with pytest.raises(TrajectoryError, match=r"is being written by process \? on host '\?' \(since just now\).* "
                                              r"delete '[^']*\.explaind-writer\.lock'"):
        _record(dense, 2 * STEPS, resume=True)
    _lock(dense, LOCKS[case], age=60)
    _record(dense, 2 * STEPS, resume=True)
    assert _same(_values(dense), _values(templates / "long"))
    assert not (dense / LOCK).exists()


def test_an_empty_lock_from_the_future_is_taken_over_not_refused_forever(dense, templates):
    """Clock skew: an empty lock (a crash of a writer without hard links) stamped a day ahead. Before: refused as
    "being written ... since just now" until the clock caught up."""
    _lock(dense, b"", age=-86_400)
    _record(dense, 2 * STEPS, resume=True)
    assert _same(_values(dense), _values(templates / "long"))


def test_every_file_of_a_store_ten_years_in_the_future_changes_nothing(dense, templates):
    then = time.time() + 10 * 365 * 86_400
    for path in [*dense.rglob("*"), dense]:
        os.utime(path, (then, then))
    _record(dense, 2 * STEPS, resume=True)
    assert _same(_values(dense), _values(templates / "long"))


# --------------------------------------------------------------------------- 4: store paths that are no paths
@pytest.mark.parametrize("call", ["Trajectory.load", "TrajectoryRecorder"])
def test_a_store_path_with_a_nul_or_of_another_type_is_named(templates, tmp_path, call):
    """Before: ValueError('embedded null byte') and TypeError('expected str, bytes or os.PathLike object')."""
    open_ = ((lambda p: explaind.Trajectory.load(p, model=_model())) if call == "Trajectory.load"
             else (lambda p: _record(p, 1)))
    with pytest.raises(TrajectoryError, match=r"The store path '.*\\x00x' holds a NUL character.*Fix: pass the path "
                                              r"without it"):
        open_(f"{templates / 'dense'}\0x")
    with pytest.raises(ConfigError, match=r"The store path 5 is a int; allowed: a str, bytes or os\.PathLike"):
        open_(5)
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("kind", ["/dev/null", "a FIFO", "a path below a regular file"])
def test_a_store_path_that_is_a_device_a_fifo_or_below_a_file_is_refused_without_blocking(tmp_path, kind):
    path = {"/dev/null": Path("/dev/null"), "a FIFO": tmp_path / "fifo",
            "a path below a regular file": tmp_path / "file" / "run"}[kind]
    if kind == "a FIFO":
        os.mkfifo(path)
    (tmp_path / "file").write_text("x")
    finished, exc = _in_thread(lambda: _record(path, 1), 60)
    assert finished
    assert isinstance(exc, TrajectoryError)
    assert "is a file; pass a directory path" in str(exc) or "Not a directory" in str(exc)


# --------------------------------------------------------------------------- 5: the journal
def _journal_only(store: Path) -> None:
    """Leave the steps to the journal (as a crash before the final manifest does)."""
    manifest = _manifest(store)
    manifest.update(steps=[], complete=False)
    _write_manifest(store, manifest)


def test_a_journal_saved_with_a_byte_order_mark_reads_as_the_same_run(dense, templates):
    """Before: 'corrupted at line 1' (the manifest with a byte-order mark was read since round 5)."""
    _journal_only(dense)
    (dense / "journal.jsonl").write_bytes(b"\xef\xbb\xbf" + (dense / "journal.jsonl").read_bytes())
    assert _same(_values(dense), _values(templates / "dense"))


def test_a_journal_ending_in_zeros_after_a_power_loss_keeps_every_step(dense, templates, caplog):
    """A file system that extended the journal but lost the data: its tail is NUL bytes."""
    _journal_only(dense)
    (dense / "journal.jsonl").write_bytes((dense / "journal.jsonl").read_bytes() + b"\0" * 4096)
    with caplog.at_level(logging.WARNING):
        assert _same(_values(dense), _values(templates / "dense"))
    assert "Ignoring the incomplete last line" in caplog.text


JOURNAL_LINES = {
    "a step of 10**18": (lambda line: line.replace(b'"step":3', b'"step":1000000000000000000', 1),
                         r"jumps from step 2 to step 1000000000000000000"),
    "a line nested deeper than the parser goes": (lambda line: b"[" * 100_000 + b"]" * 100_000 + b"\n" + line,
                                                  r"corrupted at line 4: .*recursion limit exceeded"),
}


@pytest.mark.parametrize("case", list(JOURNAL_LINES))
def test_a_journal_line_of_a_huge_step_or_nested_too_deep_is_refused_naming_it(dense, case):
    edit, message = JOURNAL_LINES[case]
    _journal_only(dense)
    lines = (dense / "journal.jsonl").read_bytes().splitlines(keepends=True)
    (dense / "journal.jsonl").write_bytes(b"".join(lines[:3]) + edit(lines[3]) + b"".join(lines[4:]))
    with pytest.raises(TrajectoryError, match=message):
        _load(dense)


def test_a_journal_without_read_permission_names_the_fix(dense, monkeypatch):
    _denied(monkeypatch, "open", "journal.jsonl")
    with pytest.raises(TrajectoryError, match=r"'journal\.jsonl' of the store .* \(Permission denied\)\. Fix: give "
                                              r"the user running explaind read permission"):
        _load(dense)


# --------------------------------------------------------------------------- 6: safetensors headers that lie
HEADER_LIES = {
    "a negative shape": (lambda h, p: _pack({**h, "batch.weights": {**_tensor(h), "shape": [-1]}}, p),
                         r"invalid value: integer `-1`, expected usize"),
    "a shape whose size overflows": (lambda h, p: _pack({**h, "batch.weights": {**_tensor(h), "shape":
                                                         [2**62, 2**62, 16]}}, p), r"overflow computing buffer size"),
    "offsets backwards": (lambda h, p: _pack({**h, "batch.weights": {**_tensor(h), "data_offsets":
                                              _tensor(h)["data_offsets"][::-1]}}, p), r"invalid offset"),
    "an end 1 TiB past the data": (lambda h, p: _pack({**h, "batch.weights": {**_tensor(h), "data_offsets": [
        _tensor(h)["data_offsets"][0], _tensor(h)["data_offsets"][1] + 2**40]}}, p), r"invalid shape, data type, or "
                                                                                      r"offset"),
    "a header that is a JSON list": (lambda h, p: _pack([1, 2], p), r"invalid type: sequence, expected struct"),
    "__metadata__ given twice": (lambda h, p: _pack(h, p).replace(b"{", b'{"__metadata__": {"step": "2"}, ', 1),
                                 r"duplicate field `__metadata__`"),
    "NaN in a shape": (lambda h, p: _pack(h, p).replace(b'"shape": [', b'"shape": [NaN, ', 1), r"expected value"),
    "a header length of 0": (lambda h, p: struct.pack("<Q", 0) + p, r"EOF while parsing"),
}


def _repack(edit):
    """``edit`` of round 5's header forgeries, the header padded to 8 bytes again where an edit grew it."""
    def forge(header, payload):
        data = edit(header, payload)
        n = struct.unpack("<Q", data[:8])[0]
        head = data[8:].removesuffix(payload)
        return data if n == len(head) else struct.pack("<Q", len(head)) + head + payload
    return forge


@pytest.mark.parametrize("case", list(HEADER_LIES))
def test_a_step_file_whose_header_lies_in_a_new_way_is_refused_naming_the_file(dense, case):
    edit, problem = HEADER_LIES[case]
    _forge_step(dense, _repack(edit))
    traj = _load(dense)
    with pytest.raises(TrajectoryError, match=rf"000001\.safetensors' \(step 1\) is not a safetensors file explaind "
                                              rf"can read: .*{problem}.*re-record the run"):
        traj.params(2)
    with pytest.raises(TrajectoryError, match=problem):
        traj.verify()


def test_a_metadata_key_given_twice_counts_once_as_both_parsers_read_it(dense, templates):
    """A key repeated inside ``__metadata__`` (checksum matched): Python's json and safetensors' own parser both keep
    the last value, so no reader sees another step; the step reads as the run's step 1."""
    _forge_step(dense, _repack(lambda h, p: _pack(h, p).replace(b'"__metadata__": {', b'"__metadata__": {"step": '
                                                                                     b'"2", ', 1)))
    assert _same(_values(dense), _values(templates / "dense"))


# --------------------------------------------------------------------------- 7: files of zero bytes, huge or nested
ZERO = {
    "manifest.json": r"manifest\.json' is not valid JSON: Expecting value: line 1 column 1",
    "steps/000002.safetensors": r"000002\.safetensors' \(step 2\) is truncated or was modified: it has 0 bytes",
    "initial.safetensors": r"initial\.safetensors' is truncated or was modified: it has 0 bytes",
    "the newest optimizer state": r"state-\d\.safetensors' \(step 3\) is truncated or was modified: it has 0 bytes",
}


@pytest.mark.parametrize("relpath", list(ZERO))
def test_a_file_truncated_to_zero_bytes_is_named(dense, relpath):
    newest = _manifest(dense)["steps"][-1]["optimizer_state"]["path"]
    (dense / (newest if relpath == "the newest optimizer state" else relpath)).write_bytes(b"")
    with pytest.raises(TrajectoryError, match=ZERO[relpath]):
        _load(dense).verify()


def test_a_zero_byte_journal_beside_a_complete_manifest_changes_nothing(dense, templates):
    (dense / "journal.jsonl").write_bytes(b"")
    assert _same(_values(dense), _values(templates / "dense"))


def test_a_manifest_of_300_mb_is_refused_unread_and_one_of_100_mb_whitespace_reads(dense, templates):
    data = (dense / "manifest.json").read_bytes()
    with open(dense / "manifest.json", "r+b") as f:
        f.truncate(300 << 20)  # a sparse file: nothing allocated on disk
    with pytest.raises(TrajectoryError, match=r"'manifest\.json' has 314572800 bytes, more than the 268435456"):
        _load(dense)
    (dense / "manifest.json").write_bytes(data[:-1] + b" " * (100 << 20) + data[-1:])
    assert _same(_values(dense), _values(templates / "dense"))


MANIFEST_VALUES = {
    "schema_version true": ({"schema_version": True}, r"has schema_version True; allowed: an integer from 1 to 3"),
    "schema_version 3.0": ({"schema_version": 3.0}, r"has schema_version 3\.0; allowed: an integer from 1 to 3"),
    "param_stride 10**18": ({"param_stride": 10**18}, r"manifest\.json was edited"),
    "n_train 10**15": ({"n_train": 10**15}, r"manifest\.json was edited"),
}


@pytest.mark.parametrize("case", list(MANIFEST_VALUES))
def test_a_manifest_value_of_the_wrong_kind_or_size_is_refused_before_anything_is_allocated(dense, case):
    values, message = MANIFEST_VALUES[case]
    _write_manifest(dense, _manifest(dense) | values)
    with pytest.raises(TrajectoryError, match=message):
        _load(dense).verify()


def test_a_manifest_whose_step_count_disagrees_with_its_steps_reads_the_steps(dense, templates):
    """``n_steps`` is derived from the step records (and the journal), never trusted."""
    _write_manifest(dense, _manifest(dense) | {"n_steps": 99})
    assert _load(dense).n_steps == STEPS
    assert _same(_values(dense), _values(templates / "dense"))


@pytest.mark.parametrize("path", ["a/" * 2500 + "x", "a" * 300])
def test_a_file_path_too_long_for_the_file_system_is_named(dense, path):
    manifest = _manifest(dense)
    manifest["steps"][1]["file"]["path"] = path
    _write_manifest(dense, manifest)
    with pytest.raises(TrajectoryError, match=r"cannot be opened as a file of the store \(File name too long\)"):
        _load(dense).params(2)


# --------------------------------------------------------------------------- 8: files and directories swapped
def _swap(store: Path, relpath: str, make: str) -> None:
    path = store / relpath
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    {"file": lambda: path.write_text("x"), "directory": path.mkdir, "FIFO": lambda: os.mkfifo(path)}[make]()


SWAPS = {
    "steps/ a file, read": ("steps", "file", "load", r"'steps/000000\.safetensors' .*\(Not a directory\)\. A folder "
                                                     r"on its path is not a directory"),
    "steps/ a file, resumed": ("steps", "file", "resume", r"'steps/000003\.safetensors' .*\(Not a directory\)"),
    "optimizer/ a file, resumed": ("optimizer", "file", "resume", r"'optimizer/state-\d\.safetensors' .*\(Not a "
                                                                  r"directory\)"),
    "a step file a directory": ("steps/000002.safetensors", "directory", "load", r"'steps/000002\.safetensors' of "
                                                                                r"the store .* is not a regular file"),
    "the journal a directory, resumed": ("journal.jsonl", "directory", "resume", r"'journal\.jsonl' of the store .* "
                                                                                 r"is not a regular file"),
    "the journal a FIFO": ("journal.jsonl", "FIFO", "load", r"'journal\.jsonl' of the store .* is not a regular "
                                                            r"file \(a directory, a FIFO or a device\)"),
}


@pytest.mark.parametrize("case", list(SWAPS))
def test_a_file_where_a_directory_belongs_or_the_reverse_is_named_without_blocking(dense, case):
    relpath, make, how, message = SWAPS[case]
    _swap(dense, relpath, make)
    before = _files(dense)
    call = (lambda: _load(dense).verify()) if how == "load" else (lambda: _record(dense, 2 * STEPS, resume=True))
    finished, exc = _in_thread(call, 60)
    assert finished
    assert isinstance(exc, TrajectoryError) and exc.args and re.search(message, str(exc)), exc
    assert _files(dense) == before


def test_a_directory_named_like_a_temporary_file_is_kept_and_the_store_resumes(dense, templates):
    (dense / "steps" / "000009.safetensors.tmp-999999-1").mkdir()
    _record(dense, 2 * STEPS, resume=True)
    assert (dense / "steps" / "000009.safetensors.tmp-999999-1").is_dir()
    assert _same(_values(dense), _values(templates / "long"))


@pytest.mark.parametrize("make", ["directory", "FIFO"])
def test_a_set_up_marker_that_is_a_directory_or_a_fifo_is_refused_without_blocking(tmp_path, make):
    store = tmp_path / "run"
    store.mkdir()
    (store / ".explaind-setup").mkdir() if make == "directory" else os.mkfifo(store / ".explaind-setup")
    finished, exc = _in_thread(lambda: _record(store, 1), 60)
    assert finished
    assert isinstance(exc, TrajectoryError) and "is a non-empty directory that is not an explaind trajectory store " \
                                                "('.explaind-setup')" in str(exc)
    assert os.listdir(store) == [".explaind-setup"]


# --------------------------------------------------------------------------- 9: steps past the index, links that loop
def test_step_files_the_journal_does_not_list_are_named_by_a_load_and_a_resume(dense, templates, caplog):
    """A journal that lost its lines (0 bytes beside a manifest without steps): the intact files of steps 0 to 3 are
    neither read nor kept by a resume. Before: a load read 0 steps and the resume replaced the files, without a
    word. Now both warn, naming the steps and the fix (restore journal.jsonl first)."""
    _journal_only(dense)
    (dense / "journal.jsonl").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert _load(dense).n_steps == 0
    assert re.search(r"holds the files of steps 0, 1, 2, 3, which its journal does not list: .*they are not read.* "
                     r"restore it from a copy first", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _record(dense, 2 * STEPS, resume=True)
    assert "this resumed recording records them again, replacing their files" in caplog.text
    assert _same(_values(dense), _values(templates / "long"))  # re-recorded from step 0: the same run


def test_a_reader_beside_a_live_writer_is_not_warned_of_the_steps_it_is_committing(dense, caplog):
    """The recorder renames a step's files before it appends their journal line: while its lock is live, a reader
    that finds the next step's file says nothing."""
    shutil.copyfile(dense / "steps/000003.safetensors", dense / "steps/000004.safetensors")
    lock = WriterLock(dense).acquire()
    try:
        with caplog.at_level(logging.WARNING):
            assert _load(dense).n_steps == STEPS
        assert "does not list" not in caplog.text
    finally:
        lock.release()
    with caplog.at_level(logging.WARNING):
        _load(dense)
    assert "holds the files of steps 4, which its journal does not list" in caplog.text


@pytest.mark.parametrize("target", ["itself", "nowhere"])
def test_a_store_path_that_is_a_looping_or_dangling_link_names_the_link_and_the_fix(tmp_path, target):
    """Before: "FileExistsError ... Fix: pass a store path in a writable directory with free space", and a load
    of the loop asked for read permission."""
    link = tmp_path / "run"
    os.symlink(link if target == "itself" else tmp_path / "nowhere", link)
    with pytest.raises(TrajectoryError, match=r"store='[^']*run' is a symbolic link to '[^']*', which does not exist "
                                              r"or leads back to itself.*Fix: create the directory the link names"):
        _record(link, 1)
    if target == "itself":
        with pytest.raises(TrajectoryError, match=r"cannot be read: Too many levels of symbolic links .*Fix: the store "
                                                  r"path, or a directory on it, is a symbolic link that leads back"):
            _load(link)


def test_a_directory_that_cannot_be_opened_for_its_flush_is_named_once(templates, tmp_path, monkeypatch, caplog):
    """``steps/`` with write and search permission but not read permission: its renames cannot be flushed. Before:
    skipped silently (round 8 left it); now a warning names the directory and the fix, once."""
    _denied(monkeypatch, "open", f"{os.sep}steps")
    with caplog.at_level(logging.WARNING):
        _record(tmp_path / "run", STEPS)
    monkeypatch.undo()
    assert caplog.text.count("to flush it (Permission denied)") == 1
    assert re.search(r"Cannot open the directory '[^']*run/steps' to flush it .*Fix: give the user running explaind "
                     r"read permission on the directory \(chmod u\+r\)", caplog.text)
    assert _same(_values(tmp_path / "run"), _values(templates / "dense"))


@pytest.mark.parametrize(("option", "value"), [("overwrite", "false"), ("resume", "no"), ("overwrite", 0)])
def test_overwrite_or_resume_that_is_not_a_bool_is_refused_and_the_stored_run_stays(dense, templates, option, value):
    """Before: ``overwrite="false"`` counted as true and deleted the stored run (recording a new one in its place);
    ``resume="no"`` appended to it."""
    before, model = _files(dense), _model()
    with pytest.raises(ConfigError, match=rf"{option}={value!r} is a {type(value).__name__}; allowed: True or False "
                                          rf".*Nothing was written\. Fix: pass {option}=True or {option}=False"):
        explaind.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.05), loss="mse",
                                    train_data=(X, Y), store=dense, **{option: value})
    assert _files(dense) == before
    assert _same(_values(dense), _values(templates / "dense"))


def test_a_file_system_without_hard_links_records_resumes_and_leaves_no_lock(templates, tmp_path, monkeypatch):
    """The writer lock appears by a hard link of a complete file; where links are refused (``EPERM``, as on FAT or
    some network file systems) it is created with ``O_EXCL`` instead."""
    def no_links(*_args, **_kwargs):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
    monkeypatch.setattr(os, "link", no_links)
    _record(tmp_path / "run", STEPS)
    _record(tmp_path / "run", 2 * STEPS, resume=True)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".explaind")) == []
    assert _same(_values(tmp_path / "run"), _values(templates / "long"))


@pytest.mark.parametrize(("option", "value"), [("fsync", "false"), ("background_writes", "no"),
                                               ("store_data", 0), ("fsync", None)])
def test_an_on_off_option_that_is_not_a_bool_is_refused_before_anything_is_written(tmp_path, option, value):
    """Before: ``fsync="false"`` and ``background_writes="no"`` switched the option on, ``store_data=0`` off,
    without a word."""
    model = _model()
    with pytest.raises(ConfigError, match=rf"{option}={value!r} is a {type(value).__name__}; allowed: True or False "
                                          rf".*Nothing was written\. Fix: pass {option}=True or {option}=False"):
        explaind.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.05), loss="mse",
                                    train_data=(X, Y), store=tmp_path / "run", **{option: value})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("option", "value"), [("cache_steps", "x"), ("cache_steps", 0), ("cache_segments", 1.5),
                                               ("cache_steps", True)])
def test_a_cache_size_that_is_not_a_positive_int_is_refused_naming_it(dense, option, value):
    """Before: ``cache_steps="x"`` raised a raw ``ValueError`` from ``int()``; 0 and 1.5 were taken as 1."""
    with pytest.raises(ConfigError, match=rf"Trajectory\.load: {option}={value!r} is not allowed: it takes a "
                                          rf"positive int .*Fix: leave it out, or pass e\.g\. {option}=4"):
        explaind.Trajectory.load(dense, model=_model(), **{option: value})
    assert _load(dense).n_steps == STEPS
