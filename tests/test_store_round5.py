"""Stores attacked by strangers, crashes and hostile files, round 5: the cases the earlier store tests do not try.

JSON that only some parsers read one way (a key given twice, ``NaN``), a journal that lists a step twice,
files of the store that are links, directories or FIFOs, unreadable directories, safetensors headers that
lie, writer locks that are FIFOs, links or copies (a reader beside a live recorder, a moved store, the
command line on broken runs, random SIGKILLs and a full disk in a group commit are
tests/test_store_round5_live.py). Each is read as the same run, or refused
with a :class:`~explaind.exceptions.TrajectoryError` naming the file, the value and the fix; nothing
hangs and nothing recorded is lost. docs/recording.md, "The store" (its table of strangers' files, round 5),
lists the checks.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import threading
from pathlib import Path

import pytest
import torch
from test_store_strangers import STEPS, _model, _record

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory._checksum import checksum
from explaind.trajectory.lock import LOCK, WriterLock


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("round5") / "dense"
    _record(root, STEPS)
    return root


@pytest.fixture
def store(template, tmp_path):
    return Path(shutil.copytree(template, tmp_path / "run"))


def _read_all(store: Path) -> list[torch.Tensor]:
    """Every value a reader gets from the store (theta of every step, coefficients, batches), after verify()."""
    traj = explaind.Trajectory.load(store, model=_model())
    traj.verify()
    out = [t for s in range(traj.n_steps + 1) for t in traj.params(s).values()]
    for s in range(traj.n_steps):
        out += [*traj.batch(s), torch.tensor(traj.grad_scale(s))]
        out += [c for u in traj.updates(s).values() for c in (u.a, u.b, u.P, u.q, u.n) if isinstance(c, torch.Tensor)]
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _open_manifest(store: Path) -> bytes:
    return (store / "manifest.json").read_bytes()


def _uncommit(store: Path) -> list[bytes]:
    """Leave the steps to the journal alone (as a crash before the final manifest does); its lines."""
    manifest = json.loads(_open_manifest(store))
    manifest.update(steps=[], complete=False)
    (store / "manifest.json").write_text(json.dumps(manifest))
    return (store / "journal.jsonl").read_bytes().splitlines()


# --------------------------------------------------------------------------- JSON that parsers read differently
def _repeat_key(data: bytes) -> bytes:
    return data.replace(b"{", b'{"loss": "cross_entropy",', 1)  # json keeps the last "loss", other parsers the first


JSON_REFUSED = {
    "a key given twice": (_repeat_key, r"the key 'loss' appears twice in one object"),
    "NaN in extras": (lambda d: d.replace(b'"extras": {}', b'"extras": {"x": NaN}'), r"NaN is not a JSON number"),
    "Infinity in a step record": (lambda d: d.replace(b'"grad_scale": 1.0', b'"grad_scale": Infinity', 1),
                                  r"Infinity is not a JSON number"),
    "bytes that are not UTF-8": (lambda d: d.replace(b'"explaind-trajectory"', b'"explaind-trajectory\xff"'),
                                 r"'utf-8' codec can't decode byte 0xff"),
    "an integer of 5000 digits": (lambda d: d.replace(b'"param_stride": 1', b'"param_stride": 1' + b"0" * 4999),
                                  r"Exceeds the limit \(4300 digits\)"),
}


@pytest.mark.parametrize("case", list(JSON_REFUSED))
def test_manifest_json_that_readers_could_read_differently_is_refused_naming_it(store, case):
    edit, message = JSON_REFUSED[case]
    data = _open_manifest(store)
    (store / "manifest.json").write_bytes(edit(data))
    assert edit(data) != data
    with pytest.raises(TrajectoryError, match=rf"manifest\.json' is not valid JSON: {message}.*allowed: UTF-8 JSON "
                                              rf"as explaind writes it, each key once per object, finite numbers"):
        explaind.Trajectory.load(store, model=_model())


@pytest.mark.parametrize("encode", [lambda d: b"\xef\xbb\xbf" + d, lambda d: d.replace(b"\n", b"\r\n"),
                                    lambda d: d.decode().encode("utf-16")], ids=["bom", "crlf", "utf-16"])
def test_a_manifest_saved_by_an_editor_with_a_bom_crlf_or_utf16_reads_as_the_same_run(template, store, encode):
    (store / "manifest.json").write_bytes(encode(_open_manifest(store)))
    assert _same(_read_all(store), _read_all(template))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(steps=[[1]]), r"steps\.0 = \[1\]: Input should be a valid dictionary"),
    (lambda m: m.update(params=None), r"params = None: Input should be a valid list"),
    (lambda m: m["steps"][0].update(n_samples=None), r"steps\.0\.n_samples = None: Input should be a valid integer"),
], ids=["nested list for a record", "null for a list", "null for a count"])
def test_a_manifest_field_of_the_wrong_json_type_is_refused_naming_the_field(store, edit, message):
    manifest = json.loads(_open_manifest(store))
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrajectoryError, match=message):
        explaind.Trajectory.load(store, model=_model())


NEWER = r"It was written by explaind 99\.0\.1, newer than this one \(0\.1\.0\), with the same schema version: upgrade"
#: since round 15 a field added at this explaind's version is named with its fix (not "corrupted ... re-record")
NOT_OURS = r"The field\(s\) \['resumed_from'\] are not ones that explaind writes.*Fix: remove that field"


@pytest.mark.parametrize(("version", "fix"), [("99.0.1", NEWER), (explaind.__version__, NOT_OURS)])
def test_an_unknown_manifest_key_names_an_upgrade_only_when_a_newer_explaind_wrote_it(store, version, fix):
    manifest = json.loads(_open_manifest(store))
    manifest.update(explaind_version=version, resumed_from="elsewhere")
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrajectoryError, match=rf"resumed_from = 'elsewhere': Extra inputs are not permitted\. {fix}"):
        explaind.Trajectory.load(store, model=_model())


# --------------------------------------------------------------------------- the journal
def test_a_journal_listing_a_step_twice_with_another_record_is_refused(store):
    lines = _uncommit(store)
    forged = lines[1].replace(b'"n_samples":4', b'"n_samples":3')
    assert forged != lines[1]
    (store / "journal.jsonl").write_bytes(b"\n".join([*lines[:2], forged, *lines[2:]]) + b"\n")
    with pytest.raises(TrajectoryError, match=r"journal\.jsonl' lists step 1 at line 2 and again at line 3 with "
                                              r"another record; allowed: each step once, or repeated unchanged"):
        explaind.Trajectory.load(store, model=_model())


def test_a_journal_repeating_a_step_unchanged_or_with_crlf_line_ends_reads_as_the_same_run(template, store):
    lines = _uncommit(store)
    (store / "journal.jsonl").write_bytes(b"\r\n".join([*lines[:2], lines[1], *lines[2:]]) + b"\r\n")
    assert _same(_read_all(store), _read_all(template))


@pytest.mark.parametrize("edit", [
    lambda line: line[:-1] + b',"grad_scale":5.0}',  # pydantic's parser keeps the last value
    lambda line: line.replace(b'"gradient_check":0.0', b'"gradient_check":NaN'),
], ids=["a key given twice", "NaN"])
def test_a_journal_value_that_parsers_could_read_differently_is_refused_when_the_store_is_opened(store, edit):
    """Journal lines are parsed strictly since round 6 (tests/test_store_round6.py): a line with a repeated key or
    ``NaN`` is refused when the store is opened, naming the line; before, only when its step was read."""
    lines = _uncommit(store)
    assert edit(lines[0]) != lines[0]
    (store / "journal.jsonl").write_bytes(b"\n".join([edit(lines[0]), *lines[1:]]) + b"\n")
    with pytest.raises(TrajectoryError, match=r"journal\.jsonl' is corrupted at line 1: .*(appears twice|NaN is not)"):
        explaind.Trajectory.load(store, model=_model())


# --------------------------------------------------------------------------- files that are not files
def test_a_step_file_replaced_by_a_link_to_another_step_names_the_link_and_the_fix(store):
    step = store / "steps" / "000001.safetensors"
    step.unlink()
    step.symlink_to("000000.safetensors")
    traj = explaind.Trajectory.load(store, model=_model())
    with pytest.raises(TrajectoryError, match=r"'steps/000001\.safetensors' of the store .* cannot be opened .* "
                                              r"It is a symbolic link.*replace the link by the file it names"):
        traj.params(2)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_manifest_that_is_a_directory_or_a_fifo_is_named_as_such_not_as_missing(store, kind):
    (store / "manifest.json").unlink()
    (store / "manifest.json").mkdir() if kind == "directory" else os.mkfifo(store / "manifest.json")
    with pytest.raises(TrajectoryError, match=r"'manifest\.json' of the store .* is not a regular file \(a "
                                              r"directory, a FIFO or a device\)"):
        explaind.Trajectory.load(store, model=_model())


def _denied(monkeypatch, call: str, suffix: str) -> None:
    """``os.<call>`` fails with EACCES on paths ending in ``suffix`` (the tests may run as root, which permission
    bits do not stop)."""
    real = getattr(os, call)

    def refuse(path, *args, **kwargs):
        if os.fspath(path).endswith(suffix):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, call, refuse)


def test_a_store_directory_without_read_permission_is_named_as_unreadable_not_as_empty(store, monkeypatch):
    _denied(monkeypatch, "stat", "manifest.json")
    with pytest.raises(TrajectoryError, match=r"The trajectory store .* cannot be read: Permission denied .*Fix: "
                                              r"give the user running explaind read and search permission"):
        explaind.Trajectory.load(store, model=_model())


def test_a_step_file_without_read_permission_names_the_permission_fix(store, monkeypatch):
    traj = explaind.Trajectory.load(store, model=_model())
    _denied(monkeypatch, "open", "000002.safetensors")
    with pytest.raises(TrajectoryError, match=r"'steps/000002\.safetensors' of the store .* \(Permission denied\)\. "
                                              r"Fix: give the user running explaind read permission on it"):
        traj.params(3)


def test_a_store_being_set_up_and_a_file_in_place_of_a_store_are_named(tmp_path):
    (tmp_path / "setup").mkdir()
    (tmp_path / "setup" / ".explaind-setup").write_bytes(b"")
    with pytest.raises(TrajectoryError, match=r"holds \.explaind-setup and no manifest\.json yet: a recording is "
                                              r"setting it up"):
        explaind.Trajectory.load(tmp_path / "setup", model=_model())
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrajectoryError, match=r"is not an explaind trajectory store: it is a file, not a directory"):
        explaind.Trajectory.load(tmp_path / "file", model=_model())


# --------------------------------------------------------------------------- safetensors headers that lie
def _forge_step(store: Path, edit) -> None:
    """Rewrite step 1's file with ``edit(header, payload) -> bytes`` and record its new size and checksum."""
    path = store / "steps" / "000001.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    data = edit(json.loads(data[8 : 8 + n]), data[8 + n :])
    path.write_bytes(data)
    manifest = json.loads(_open_manifest(store))
    manifest["steps"][1]["file"].update(nbytes=len(data), checksum=checksum(data, "xxh3-128"))
    (store / "manifest.json").write_text(json.dumps(manifest))  # the journal's copy of the record is not read


def _pack(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + payload


def _tensor(header: dict, name: str = "batch.weights") -> dict:
    return header[name]


HEADER_LIES = {
    "a header length past the end": (lambda h, p: struct.pack("<Q", 1 << 40) + _pack(h, p)[8:], "header too large"),
    "overlapping offsets": (lambda h, p: _pack({**h, "batch.weights": {**_tensor(h), "data_offsets":
                                               _tensor(h, "batch.indices")["data_offsets"]}}, p), "invalid offset"),
    "a dtype the format does not know": (lambda h, p: _pack({**h, "batch.weights": {**_tensor(h), "dtype": "F128"}},
                                                            p), "unknown variant `F128`"),
    "a zero-length tensor": (lambda h, p: _pack({**h, "batch.weights": {**_tensor(h), "shape": [0], "data_offsets":
                                                 [_tensor(h)["data_offsets"][0]] * 2}}, p), "invalid offset"),
    "metadata that is not text": (lambda h, p: _pack({**h, "__metadata__": {"step": 1}}, p), "expected a string"),
    "bytes after the last tensor": (lambda h, p: _pack(h, p + b"\0" * 8), "file not fully covered"),
}


@pytest.mark.parametrize("case", list(HEADER_LIES))
def test_a_step_file_whose_header_lies_is_refused_naming_the_file_and_step(store, case):
    edit, problem = HEADER_LIES[case]
    _forge_step(store, edit)
    traj = explaind.Trajectory.load(store, model=_model())
    with pytest.raises(TrajectoryError, match=rf"000001\.safetensors' \(step 1\) is not a safetensors file explaind "
                                              rf"can read: .*{problem}.*re-record the run"):
        traj.params(2)


def test_an_extra_tensor_named_like_a_path_is_ignored_and_nothing_is_written(template, store, tmp_path):
    def add(header, payload):
        end = len(payload)
        return _pack({**header, "../../outside": {"dtype": "F64", "shape": [1], "data_offsets": [end, end + 8]}},
                     payload + struct.pack("<d", 7.0))
    _forge_step(store, add)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert _same(_read_all(store), _read_all(template))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------- writer locks
def _in_thread(call, seconds: float = 30.0):
    """``call()`` on a thread; returns ``(finished, exception)`` (a call that blocks is not waited for)."""
    out: dict = {}

    def run():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["exc"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), out.get("exc")


def test_a_lock_that_is_a_fifo_is_refused_at_once_not_waited_on(store):
    lock = store / LOCK
    os.mkfifo(lock)
    try:
        finished, exc = _in_thread(lambda: _record(store, 2, resume=True))
    finally:
        try:  # a reader blocked on the FIFO (the fault this test guards against) gets its end of file
            os.close(os.open(lock, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert finished, "opening the store waited on a FIFO in place of the writer lock"
    assert isinstance(exc, TrajectoryError)
    assert f"The writer lock {str(lock)!r}" in str(exc) and "not a regular file" in str(exc)
    assert f"delete it (rm -r {str(lock)!r})" in str(exc)


@pytest.mark.parametrize("kind", ["symbolic link", "directory"])
def test_a_lock_that_is_a_link_or_a_directory_is_refused_naming_it_and_nothing_is_recorded(store, tmp_path, kind):
    before = _open_manifest(store)
    if kind == "directory":
        (store / LOCK).mkdir()
    else:  # a lock-shaped file outside, naming a live process: never followed
        (tmp_path / "elsewhere").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        (store / LOCK).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TrajectoryError, match=r"The writer lock .* is (a symbolic link|not a regular file).*not the "
                                              r"lock file explaind writes.*delete it"):
        _record(store, 2, resume=True)
    assert _open_manifest(store) == before


def _live_other_process() -> int:
    pid = os.getppid()  # the process that started this one: alive while the test runs
    assert pid != os.getpid() and pid > 1
    return pid


def test_a_lock_copied_with_a_store_being_written_does_not_block_the_copy(template, store, tmp_path):
    """``cp -r`` of a store while another process writes it copies that process's lock: the copy is not written
    by it, and resuming the copy takes the lock over."""
    alive = _live_other_process()
    origin = os.stat(template)
    (store / LOCK).write_text(json.dumps({"pid": alive, "host": socket.gethostname(), "since": "now",
                                          "directory": [origin.st_dev, origin.st_ino]}))
    _record(store, 2, resume=True)
    reference = tmp_path / "whole"
    _record(reference, STEPS + 2)
    assert _same(_read_all(store), _read_all(reference))
    assert not (store / LOCK).exists()


@pytest.mark.parametrize("through", ["the same path", "a symbolic link to it", "an old lock without a directory"])
def test_the_lock_of_a_live_writer_of_the_same_directory_still_refuses(store, tmp_path, through):
    alive = _live_other_process()
    here = os.stat(store)
    content = {"pid": alive, "host": socket.gethostname(), "since": "now", "directory": [here.st_dev, here.st_ino]}
    if through == "an old lock without a directory":
        content.pop("directory")
    (store / LOCK).write_text(json.dumps(content))
    path = store
    if through == "a symbolic link to it":
        path = tmp_path / "link"
        path.symlink_to(store)
    with pytest.raises(TrajectoryError, match=rf"is being written by process {alive} "):
        _record(path, 2, resume=True)
    assert json.loads((store / LOCK).read_text()) == content


def test_the_lock_names_the_directory_it_was_taken_in(tmp_path):
    (tmp_path / "s").mkdir()
    lock = WriterLock(tmp_path / "s").acquire()
    try:
        info = json.loads((tmp_path / "s" / LOCK).read_text())
        here = os.stat(tmp_path / "s")
        assert info["pid"] == os.getpid() and info["directory"] == [here.st_dev, here.st_ino]
    finally:
        lock.release()
    assert not (tmp_path / "s" / LOCK).exists()
