"""Stores attacked by strangers and crashes, round 7: forged optimizer states, files of another run, the previous
format, torn and failing journal writes, and the places a store lives (long paths, a private umask, a symbolic
link, tmpfs, a copy without its times, a reader beside the recorder).

A forged file here keeps a valid checksum (its record in the manifest is rewritten to match), as a stranger's
tool would leave it: since schema 3 the step files bind the run's identity, its start files and the layout of
the optimizer state written with them (explaind/trajectory/_binding.py), so such a file is refused naming the
file, the entry, what the step recorded and the fix. docs/recording.md, "Strangers' files, round 7", lists the
cases.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import batches, regression_data
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from test_store_round5 import _read_all as _values  # everything a reader gets, after verify()
from test_store_round5 import _same
from test_store_strangers import _model

import explaind
from explaind.exceptions import ConfigError, TrajectoryError
from explaind.trajectory._checksum import checksum
from explaind.trajectory._index import read_manifest
from explaind.trajectory._setup import LONGEST_FILE
from explaind.trajectory.manifest import SCHEMA_VERSION

STEPS = 4
X, Y = regression_data(n=12)
ORDER = batches(12, 4) * 3


def _record(store: Path, stop: int, *, shift: float = 0.0, resume: bool = False, accept_unbound: bool = False,
            **kwargs) -> explaind.TrajectoryRecorder:
    """SGD with momentum on a 3-5-2 MLP (a buffer too), steps ``start .. stop - 1`` of a fixed batch order; ``shift``
    moves every initial weight (another run of the same shapes); ``accept_unbound``: ``restore()`` takes an optimizer
    state its step file does not bind (a store written before schema 3)."""
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, Y), store=store, resume=resume, **kwargs)
    start = rec.restore(accept_unbound_state=accept_unbound) if resume else 0
    with rec:
        for idx in ORDER[start:stop]:
            opt.zero_grad()
            F.mse_loss(model(X[idx]), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec


def _record_templates(root: Path, *, sparse: bool = True) -> Path:
    """The runs the tests copy and compare with, recorded below ``root``."""
    _record(root / "dense", STEPS)
    _record(root / "other", STEPS, shift=0.01)  # another run: the same shapes, other values
    _record(root / "long", 2 * STEPS)  # the uninterrupted reference of resumed runs
    if sparse:
        _record(root / "sparse", 7, checkpoint_every=3)
    return root


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return _record_templates(tmp_path_factory.mktemp("round7"))


@pytest.fixture
def dense(templates, tmp_path):
    return Path(shutil.copytree(templates / "dense", tmp_path / "dense"))


def _manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def _write_manifest(store: Path, manifest: dict) -> None:
    (store / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _header(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def _rewrite(store: Path, record: dict, edit) -> None:
    """Rewrite the safetensors file ``record`` names as ``edit(tensors, metadata)`` leaves them; fix its record."""
    path = store / record["path"]
    tensors, metadata = dict(st_load(path.read_bytes())), dict(_header(path).get("__metadata__", {}))
    edit(tensors, metadata)
    data = st_save(tensors, metadata=metadata)
    path.write_bytes(data)
    record.update(nbytes=len(data), checksum=checksum(data, "xxh3-128"))


def _newest_state(manifest: dict) -> dict:
    return next(r for r in reversed(manifest["steps"]) if r.get("optimizer_state"))["optimizer_state"]


def _first_key(tensors: dict, prefix: str = "state.") -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix))


def _rename(tensors, _meta):
    key = _first_key(tensors)
    tensors[key.replace("momentum_buffer", "exp_avg")] = tensors.pop(key)


def _drop(tensors, _meta):
    del tensors[_first_key(tensors)]


def _recast(tensors, _meta):
    key = _first_key(tensors)
    tensors[key] = tensors[key].float()


def _reshape(tensors, _meta):
    key = _first_key(tensors)
    tensors[key] = tensors[key].reshape(-1)


def _momentum_edited(_tensors, meta):
    meta["optimizer"] = meta["optimizer"].replace('"momentum": 0.9', '"momentum": 0.5')
    assert '"momentum": 0.5' in meta["optimizer"]


STATE_FORGERIES = {
    "an entry renamed": (_rename, r"'state\.0\.exp_avg' \(float64 of shape \[5, 3\]\) is not among the tensors the "
                                  r"step records"),
    "an entry dropped": (_drop, r"'state\.0\.momentum_buffer' is missing; the step records float64 of shape \[5, 3\]"),
    "an entry cast to float32": (_recast, r"'state\.0\.momentum_buffer' is float32 of shape \[5, 3\]; the step "
                                          r"records float64 of shape \[5, 3\]"),
    "an entry of another shape": (_reshape, r"'state\.0\.momentum_buffer' is float64 of shape \[15\]; the step "
                                            r"records float64 of shape \[5, 3\]"),
    "a hyperparameter edited": (_momentum_edited, r"its description \(the 'optimizer' metadata: hyperparameters, "
                                                  r"step counts\) has the checksum xxh3-128:"),
}


# --------------------------------------------------------------------------- forged optimizer states
@pytest.mark.parametrize("case", list(STATE_FORGERIES))
def test_a_forged_optimizer_state_is_refused_by_resume_and_verify_naming_the_entry(dense, case):
    edit, problem = STATE_FORGERIES[case]
    manifest = _manifest(dense)
    _rewrite(dense, _newest_state(manifest), edit)
    _write_manifest(dense, manifest)
    before = {p: p.read_bytes() for p in dense.rglob("*") if p.is_file()}
    message = (rf"'optimizer/state-\d\.safetensors' \(step 3\) "
               r"of the store '[^']*' is not the optimizer state recorded with "
               rf"'steps/000003\.safetensors': {problem}.*Restore the store from a copy, or re-record the run")
    with pytest.raises(TrajectoryError, match=message):
        _record(dense, STEPS + 2, resume=True)
    after = {p: p.read_bytes() for p in dense.rglob("*") if p.is_file() and not p.name.startswith(".explaind-lock")}
    assert after == {p: b for p, b in before.items() if not p.name.startswith(".explaind-lock")}
    with pytest.raises(TrajectoryError, match=message):
        explaind.Trajectory.load(dense, model=_model()).verify()


def test_a_forged_checkpoint_state_of_a_sparse_store_is_refused_when_replayed_and_by_verify(templates, tmp_path):
    sparse = Path(shutil.copytree(templates / "sparse", tmp_path / "sparse"))
    manifest = _manifest(sparse)
    first = next(r for r in manifest["steps"] if r.get("optimizer_state"))
    _rewrite(sparse, first["optimizer_state"], _recast)
    _write_manifest(sparse, manifest)
    s = first["step"]
    message = (rf"'optimizer/checkpoint-{s:06d}\.safetensors' \(step {s}\) "
               r"of the store '[^']*' is not the optimizer state recorded with "
               rf"'steps/{s:06d}\.safetensors': 'state\.0\.momentum_buffer' is float32")
    traj = explaind.Trajectory.load(sparse, model=_model(), train_data=(X, Y))
    with pytest.raises(TrajectoryError, match=message):
        for t in range(traj.n_steps):  # the step after the checkpoint is replayed from its state
            traj.updates(t)
    with pytest.raises(TrajectoryError, match=message):
        traj.verify()


# --------------------------------------------------------------------------- files of another run
def test_a_step_file_of_another_run_with_its_record_is_refused_naming_both_runs(dense, templates):
    other, manifest = templates / "other", _manifest(dense)
    theirs = _manifest(other)
    shutil.copyfile(other / "steps/000002.safetensors", dense / "steps/000002.safetensors")
    manifest["steps"][2] = theirs["steps"][2]  # its record too: the checksum and the bound record match the file
    _write_manifest(dense, manifest)
    with pytest.raises(TrajectoryError, match=rf"000002\.safetensors' \(step 2\) "
                                              r"of the store '[^']*' belongs to the run "
                                              rf"'{theirs['run_id']}', but the store is the run "
                                              rf"'{manifest['run_id']}'"):
        explaind.Trajectory.load(dense, model=_model()).params(3)
    with pytest.raises(TrajectoryError, match=r"a step file of another run was put in its place"):
        explaind.Trajectory.load(dense, model=_model()).verify()


def test_a_start_file_of_another_run_with_its_checksum_rewritten_is_refused(dense, templates):
    manifest = _manifest(dense)
    assert (templates / "other/initial.safetensors").read_bytes() != (dense / "initial.safetensors").read_bytes()
    shutil.copyfile(templates / "other/initial.safetensors", dense / "initial.safetensors")
    manifest["initial_file"] = _manifest(templates / "other")["initial_file"]
    _write_manifest(dense, manifest)
    with pytest.raises(TrajectoryError, match=r"recorded from start files other than those the manifest names "
                                              r"\(initial_file: "):
        explaind.Trajectory.load(dense, model=_model()).params(1)


@pytest.mark.parametrize("field, value", [("loss", "cross_entropy"), ("dtype", "float32")])
def test_a_manifest_describing_the_run_otherwise_is_refused_when_a_step_is_read(dense, field, value):
    manifest = _manifest(dense)
    assert manifest[field] != value
    manifest[field] = value  # valid on its own: nothing but the step files' binding tells it from the recorded one
    _write_manifest(dense, manifest)
    with pytest.raises(TrajectoryError, match=r"000000\.safetensors' \(step 0\) "
                                              r"of the store '[^']*' was recorded with another "
                                              r"description of the run than the manifest's.*manifest\.json was edited"):
        explaind.Trajectory.load(dense, model=_model()).updates(0)


def test_two_stores_journals_concatenated_are_refused_naming_the_step_listed_twice(dense, templates):
    manifest = _manifest(dense)
    manifest.update(steps=[], complete=False)  # the steps left to the journal, as a crash leaves them
    _write_manifest(dense, manifest)
    journal = dense / "journal.jsonl"
    journal.write_bytes(journal.read_bytes() + (templates / "other/journal.jsonl").read_bytes())
    with pytest.raises(TrajectoryError, match=r"lists step 0 at line 1 and again at line 5 with another record"):
        explaind.Trajectory.load(dense, model=_model())


# --------------------------------------------------------------------------- the previous format
def _as_schema_2(store: Path) -> None:
    """What explaind wrote before schema 3: step files without the "run" and "state" entries, no run_id."""
    manifest = _manifest(store)
    for step in manifest["steps"]:
        _rewrite(store, step["file"], lambda _t, meta: [meta.pop(k) for k in ("run", "state") if k in meta])
    manifest.pop("run_id")
    manifest["schema_version"] = 2
    _write_manifest(store, manifest)
    attributes = json.loads((store / "attributes.json").read_text())  # neither identity nor checksum then
    (store / "attributes.json").write_text(json.dumps({k: v for k, v in attributes.items()
                                                       if k not in ("run_id", "checksum")}, sort_keys=True))
    (store / "journal.jsonl").write_text("".join(json.dumps(s, separators=(",", ":")) + "\n"
                                                 for s in manifest["steps"]))


def test_a_store_of_the_previous_format_reads_and_resumes_bit_for_bit_and_binds_its_new_steps(dense, templates):
    _as_schema_2(dense)
    old = read_manifest(dense)
    assert old.schema_version == 2 and old.run_id is None
    assert _same(_values(dense), _values(templates / "dense"))
    _record(dense, 2 * STEPS, resume=True, accept_unbound=True)  # its state is unbound: round 8 asks for consent
    m = read_manifest(dense)
    assert m.schema_version == SCHEMA_VERSION == 3 and m.run_id is None and m.complete  # no identity given later
    assert _same(_values(dense), _values(templates / "long"))
    metas = [_header(dense / r.file.path)["__metadata__"] for r in m.steps]
    assert not any("run" in meta for meta in metas)
    assert ["state" in meta for meta in metas] == [s >= STEPS for s in range(2 * STEPS)]  # the state of every step
    manifest = _manifest(dense)
    _rewrite(dense, _newest_state(manifest), _recast)  # a step recorded after the resume binds its state
    _write_manifest(dense, manifest)
    with pytest.raises(TrajectoryError, match=r"state-\d\.safetensors' \(step 7\) "
                                              r"of the store '[^']*' is not the optimizer state "
                                              r"recorded with 'steps/000007\.safetensors'"):
        explaind.Trajectory.load(dense, model=_model()).verify()


# --------------------------------------------------------------------------- empty and torn
def test_a_store_with_no_step_loads_verifies_and_resumes_and_the_estimator_names_the_fix(tmp_path, templates):
    _record(tmp_path / "empty", 0)
    traj = explaind.Trajectory.load(tmp_path / "empty", model=_model())
    traj.verify()
    assert traj.n_steps == 0 and traj.manifest.complete
    assert _same(list(traj.params(0).values()),
                 list(explaind.Trajectory.load(templates / "dense", model=_model()).params(0).values()))
    with pytest.raises(ConfigError, match=r"the trajectory has no recorded steps; record at least one optimizer step"):
        explaind.InfluenceEstimator().fit(traj)
    _record(tmp_path / "empty", STEPS, resume=True)
    assert _same(_values(tmp_path / "empty"), _values(templates / "dense"))


def test_the_last_journal_line_torn_at_every_byte_keeps_the_steps_before_it(dense, templates, caplog):
    manifest = _manifest(dense)
    manifest.update(steps=[], complete=False)
    _write_manifest(dense, manifest)
    lines = (dense / "journal.jsonl").read_bytes().splitlines(keepends=True)
    head, last = b"".join(lines[:-1]), lines[-1]
    for cut in range(len(last) + 1):
        (dense / "journal.jsonl").write_bytes(head + last[:cut])
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            kept = read_manifest(dense).n_steps
        whole = cut >= len(last) - 1  # all of the record (its newline or not): the step is committed
        assert kept == (STEPS if whole else STEPS - 1), cut
        assert whole or cut == 0 or "Ignoring the incomplete last line" in caplog.text, cut
    (dense / "journal.jsonl").write_bytes(head + last[: len(last) // 2])
    _record(dense, 2 * STEPS, resume=True)
    assert _same(_values(dense), _values(templates / "long"))


# --------------------------------------------------------------------------- failing writes
def _fail_journal_fsync(monkeypatch, nth: int) -> None:
    """The ``nth`` ``fsync`` of the appended journal (not of its rewrite) fails with ``ENOSPC``."""
    real, calls = os.fsync, []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/journal.jsonl"):
            calls.append(fd)
            if len(calls) == nth:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_enospc_on_the_journal_fsync_only_is_an_error_and_the_store_resumes_bit_for_bit(tmp_path, templates,
                                                                                          monkeypatch):
    _fail_journal_fsync(monkeypatch, 3)
    with pytest.raises(TrajectoryError, match=r"Writing step 2 of the trajectory store .* failed: OSError: "
                                              r"\[Errno 28\] No space left on device.*fix the cause and resume"):
        _record(tmp_path / "run", 2 * STEPS, fsync=True, background_writes=False)
    monkeypatch.undo()
    assert read_manifest(tmp_path / "run").n_steps >= 2  # every step committed before the failure
    _record(tmp_path / "run", 2 * STEPS, resume=True)
    assert _same(_values(tmp_path / "run"), _values(templates / "long"))


@pytest.mark.parametrize("fault", ["short writes", "EINTR", "EAGAIN"])
def test_short_and_interrupted_writes_give_the_same_store(tmp_path, templates, monkeypatch, fault):
    real, calls = os.write, []

    def write(fd, data):
        calls.append(fd)
        if fault == "EINTR" and len(calls) == 7:
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        if fault == "EAGAIN" and len(calls) == 7:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return real(fd, memoryview(data)[:8192])  # a multiple of the O_DIRECT block: at most 8 KiB per call

    monkeypatch.setattr(os, "write", write)
    _record(tmp_path / "run", 2 * STEPS)  # since round 8 one EINTR or EAGAIN is retried (tests/test_store_round8.py)
    assert len(calls) >= 7
    assert _same(_values(tmp_path / "run"), _values(templates / "long"))


# --------------------------------------------------------------------------- where a store lives
def _nested(base: Path, length: int) -> Path:
    """A path below ``base`` of exactly ``length`` bytes, in components of at most 200 bytes (the last created)."""
    path = str(base)
    while length - len(path) > 202:
        path += "/" + "d" * 200
    path += "/" + "s" * (length - len(path) - 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return Path(path)


def test_a_store_path_too_long_for_its_files_is_refused_before_anything_is_written(tmp_path):
    limit = os.pathconf(tmp_path, "PC_PATH_MAX") - 1
    fits = limit - len(LONGEST_FILE)
    too_long = _nested(tmp_path, fits + 1)
    with pytest.raises(TrajectoryError, match=rf"is {fits + 1} bytes long.*more than the {limit} this file system "
                                              rf"allows.*Allowed: a store path of at most {fits} bytes"):
        _record(too_long, 2)
    assert not too_long.exists()
    store = _nested(tmp_path, fits)
    _record(store, 2, checkpoint_every=2)  # a sparse store: its checkpoint states' names are the longest
    assert explaind.Trajectory.load(store, model=_model()).n_steps == 2


def test_a_store_recorded_under_umask_077_is_private_and_reads_back(tmp_path, templates):
    old = os.umask(0o077)
    try:
        _record(tmp_path / "run", STEPS)
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    assert _same(_values(tmp_path / "run"), _values(templates / "dense"))


def test_a_store_through_a_symbolic_link_is_the_same_store_by_either_path(tmp_path, templates):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    _record(tmp_path / "link/run", STEPS - 1)
    _record(tmp_path / "real/run", STEPS, resume=True)
    (tmp_path / "run-link").symlink_to(tmp_path / "real/run", target_is_directory=True)
    _record(tmp_path / "run-link", 2 * STEPS, resume=True)
    for path in ("real/run", "link/run", "run-link"):
        assert _same(_values(tmp_path / path), _values(templates / "long")), path


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
def test_a_store_on_tmpfs_equals_the_one_on_disk(templates, tmp_path):
    shm = Path(f"/dev/shm/explaind-round7-{os.getpid()}-{tmp_path.name}")
    try:
        _record(shm / "run", STEPS)
        assert _same(_values(shm / "run"), _values(templates / "dense"))
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_a_store_copied_without_times_or_modes_reads_and_resumes_as_the_same_run(templates, tmp_path):
    copy = Path(shutil.copytree(templates / "dense", tmp_path / "copy", copy_function=shutil.copyfile))
    assert (copy / "manifest.json").stat().st_mtime != (templates / "dense/manifest.json").stat().st_mtime
    assert _same(_values(copy), _values(templates / "dense"))
    _record(copy, 2 * STEPS, resume=True)
    assert _same(_values(copy), _values(templates / "long"))


def test_a_reader_beside_a_live_recording_reads_a_consistent_prefix(tmp_path, templates):
    store, reference = tmp_path / "live", _values(templates / "long")
    long = explaind.Trajectory.load(templates / "long", model=_model())
    thetas = [t for s in range(2 * STEPS + 1) for t in long.params(s).values()]
    stop, seen, problems = threading.Event(), [], []
    template = _model()  # built here: mlp() seeds torch's global generator, which the recording thread draws from

    def read() -> None:
        while not stop.is_set():
            try:
                traj = explaind.Trajectory.load(store, model=template)
            except TrajectoryError as exc:
                if seen or "is not an explaind trajectory store" not in str(exc):
                    problems.append(exc)  # only before the store exists may it not be one
                continue
            n = traj.n_steps
            got = [t for s in range(n + 1) for t in traj.params(s).values()]
            if not _same(got, thetas[: len(got)]) or (seen and n < seen[-1]):
                problems.append(f"{n} steps read, not a prefix of the run")
            seen.append(n)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        _record(store, 2 * STEPS)
    finally:
        stop.set()
        reader.join()
    assert not problems, problems[:3]
    assert seen and _same(_values(store), reference)


# --------------------------------------------------------------------------- the run's identity itself edited
@pytest.mark.parametrize("edit", ["malformed", "removed", "another"])
def test_a_manifest_whose_run_id_is_edited_is_refused_naming_it(dense, edit):
    """The manifest's ``run_id`` is what every step file of a schema-3 store names: one not of 32 hex digits is
    refused when the manifest is read; one removed or replaced by another valid identity is refused at the first
    step read (the step files still name the old one)."""
    manifest = _manifest(dense)
    if edit == "malformed":
        manifest["run_id"] = "not-an-id"
    elif edit == "removed":
        manifest.pop("run_id")
    else:
        manifest["run_id"] = "0" * 32
    _write_manifest(dense, manifest)
    if edit == "malformed":
        with pytest.raises(TrajectoryError, match=r"manifest.json' is invalid: run_id = 'not-an-id'"):
            explaind.Trajectory.load(dense, model=_model())
        return
    with pytest.raises(TrajectoryError, match=r"000000\.safetensors' \(step 0\) of the store .*(records a run "
                                              r"identity, but the manifest names no run identity|belongs to the run)"):
        explaind.Trajectory.load(dense, model=_model()).params(1)
