"""Permissions, full disks and versions, round 13: a store on a read-only mount, one written under ``umask 077`` and
read by another user, a full disk or an exceeded quota with the loop going on after the error, a store that names a
dtype of a newer torch or was written by a newer explaind of the same schema, step files laid out by another
safetensors writer, a store name of 255 bytes of non-ASCII letters, and a store path too long for its files.

docs/recording.md, "Processes, permissions and versions, round 13", lists each case with what explaind did before.
A store read as the same run equals the uninterrupted run recorded in memory bit for bit (``same_run``), and
resumed, the uninterrupted longer run (``resumes_to_the_end``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from _round12_kit import (
    STEPS,
    load,
    manifest,
    record,
    reference,
    resumes_to_the_end,
    salvaged,
    same_run,
    snapshot,
)
from _round13_kit import run_child

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory._checksum import checksum


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    store = tmp_path_factory.mktemp("finished") / "run"
    record(store)
    return store


@pytest.fixture
def store(finished, tmp_path):
    return Path(shutil.copytree(finished, tmp_path / "run"))


# --------------------------------------------------------------------------- permissions
_READ_ONLY = """
try:
    traj = explaind.Trajectory.load(store, model=model)
    traj.verify()
    print("loaded", traj.n_steps, flush=True)
    explaind.Trajectory.salvage(store, out=mode)
    print("salvaged", flush=True)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, resume=True)
    print("constructed", flush=True)  # before: refused only at `with rec:`, after restore() had run
    start = rec.restore()
    with rec:
        resumable_step(model, opt, X, y, start, rec)
    print("resumed", start, flush=True)
except TrajectoryError as exc:
    print("refused:", exc, flush=True)
"""


def test_a_store_on_a_read_only_mount_explains_salvages_and_refuses_a_resume_naming_the_fix(store, tmp_path, ref):
    """A real read-only bind mount (``mount -o bind,ro`` in a new mount namespace): ``Trajectory.load`` and
    ``verify()`` read the run, salvage copies it to a writable place, and ``TrajectoryRecorder(..., resume=True)``
    is refused at once, naming the store, the read-only mount and the fix (a writable mount, or resume a copy); no
    byte changes. Before: the recorder was built and restore() ran; the refusal came at `with rec:` (the lock could
    not be created), with the fix of a new recording (a store path in a writable directory)."""
    before = snapshot(store)
    out = tmp_path / "out"
    script = f"mount --bind -o ro {store} {store} && exec \"$@\""
    prefix = ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh")
    done = run_child(_READ_ONLY, store, str(out), prefix=prefix)
    assert done.returncode == 0, done.stderr
    assert "loaded 6" in done.stdout and "salvaged" in done.stdout, done.stdout + done.stderr
    assert "constructed" not in done.stdout
    refusal = done.stdout.split("refused:")[1]
    assert str(store) in refusal and "mounted read-only" in refusal and "resume the copy" in refusal
    assert snapshot(store) == before
    assert same_run(out, ref) == STEPS


_OTHER_USER = """
os.setgid(65534)
os.setuid(65534)  # nobody: neither the owner of the store nor root
try:
    explaind.Trajectory.load(store, model=model)
except TrajectoryError as exc:
    print("refused:", exc, flush=True)
"""


def test_a_store_written_under_umask_077_read_by_another_user_names_the_permission(tmp_path, ref):
    """Recorded with ``umask 077`` (files 0600, directories 0700), read by another user (``nobody``): refused,
    naming the store, the permission error and the fix (the same before)."""
    old = os.umask(0o077)
    try:
        store = tmp_path / "run"
        record(store)
    finally:
        os.umask(old)
    tmp_path.chmod(0o755)
    done = run_child(_OTHER_USER, store)
    refusal = done.stdout.split("refused:")[1]
    assert str(store) in refusal and "Permission denied" in refusal and "permission" in refusal.lower()
    assert same_run(store, ref) == STEPS


# --------------------------------------------------------------------------- a full disk, the loop going on
def _fail_once(monkeypatch, name: str, code: int) -> None:
    """The first write to a temporary file whose path holds ``name`` fails with ``code``."""
    real, failed = os.write, []

    def write(fd, data):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not failed and name in path and ".tmp-" in path:
            failed.append(fd)
            raise OSError(code, os.strerror(code))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize(("name", "code"),
                         [("steps/000002.safetensors", errno.EDQUOT), ("optimizer/state-", errno.ENOSPC)],
                         ids=["quota-step-file", "full-state-slot"])
def test_a_full_disk_or_quota_then_a_loop_that_goes_on_is_refused_at_every_later_step(tmp_path, ref, monkeypatch,
                                                                                        name, code):
    """A write fails (``EDQUOT``: the quota; ``ENOSPC`` on an optimizer-state slot) and the loop catches the error
    and goes on: every later ``step()`` is refused, naming the first error, so no step is recorded after a gap; the
    store keeps every step committed before it and resumes bit for bit (the same before)."""
    from _recording_helpers import resumable_setup, resumable_step
    _fail_once(monkeypatch, name, code)
    store = tmp_path / "run"
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, background_writes=False)
    errors = []
    with rec:
        for s in range(STEPS):
            try:
                resumable_step(model, opt, X, y, s, rec)
            except TrajectoryError as exc:
                errors.append((s, str(exc)))
    monkeypatch.undo()
    assert errors and os.strerror(code) in errors[0][1] and str(store) in errors[0][1]
    assert [s for s, _ in errors] == list(range(errors[0][0], STEPS))
    assert all("Recording stopped after an error" in text for _, text in errors[1:])
    kept = same_run(store, ref)
    assert kept <= errors[0][0]
    assert resumes_to_the_end(store, ref) == kept


# --------------------------------------------------------------------------- versions
def test_a_dtype_of_a_newer_torch_is_named_with_the_upgrade_fix(store):
    """A manifest naming a dtype this torch does not have (``float8_e3m4``, as a newer torch may). Before: "The store
    is corrupted or was not written by explaind". Now: the dtype, this torch's version and the fix (upgrade torch)."""
    text = (store / "manifest.json").read_text()
    (store / "manifest.json").write_text(text.replace('"dtype": "float64"\n  }', '"dtype": "float8_e3m4"\n  }', 1))
    with pytest.raises(TrajectoryError, match=r"'float8_e3m4' is not a dtype of this torch .* upgrade torch") as info:
        load(store)
    assert "corrupted" not in str(info.value)


def test_a_store_of_the_same_schema_from_a_newer_explaind_reads_and_resumes(store, ref):
    """A store whose manifest a newer explaind wrote with the same schema and fields this one knows: the same run,
    resumed bit for bit (the same before)."""
    text = (store / "manifest.json").read_text()
    (store / "manifest.json").write_text(text.replace(f'"explaind_version": "{explaind.__version__}"',
                                                      '"explaind_version": "9.0.0"'))
    assert manifest(store)["explaind_version"] == "9.0.0"
    assert same_run(store, ref) == STEPS
    assert resumes_to_the_end(store, ref) == STEPS


def _laid_out_otherwise(path: Path) -> bytes:
    """``path`` as another safetensors writer may lay it out: the same tensors and metadata, the header's entries in
    the reverse order, the metadata last and 16 more bytes of the header's padding (spaces)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(dict(reversed(list(header.items()))), separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8 + 16)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def test_step_files_laid_out_by_another_safetensors_writer_read_the_same_values(store, ref):
    """Each step file laid out as another safetensors writer may (header order, padding; the same tensors and
    metadata), its size and checksum in the journal and the manifest as a recorder using that writer would have
    written them: every value read is the recorded one and ``verify()`` passes (the same before)."""
    new = {}
    for f in sorted((store / "steps").iterdir()):
        data = _laid_out_otherwise(f)
        f.write_bytes(data)
        new[f"steps/{f.name}"] = {"nbytes": len(data), "checksum": checksum(data)}
    lines = [json.loads(line) for line in (store / "journal.jsonl").read_text().splitlines()]
    index = json.loads((store / "manifest.json").read_text())
    for step in lines + index["steps"]:
        step["file"].update(new[step["file"]["path"]])
    (store / "journal.jsonl").write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines))
    (store / "manifest.json").write_text(json.dumps(index, indent=1))
    assert same_run(store, ref) == STEPS



# --------------------------------------------------------------------------- names and paths
def test_a_store_name_of_255_bytes_of_non_ascii_letters_records_reads_salvages_and_resumes(tmp_path, ref):
    """The longest name a directory may have (255 bytes: 127 two-byte letters and one more byte): recorded, read,
    salvaged into another such name and resumed bit for bit (the same before)."""
    store = tmp_path / ("é" * 127 + "x")
    assert len(store.name.encode()) == 255
    record(store)
    assert same_run(store, ref) == STEPS
    assert salvaged(store, tmp_path / ("ö" * 127 + "y"), ref) == STEPS
    assert resumes_to_the_end(store, ref) == STEPS


def test_a_store_path_too_long_for_its_files_is_refused_before_anything_is_written(tmp_path):
    """A store path whose files' temporary names would pass PATH_MAX: refused at once, naming the length allowed and
    the fix; no file is written (the same before)."""
    deep = tmp_path
    while len(os.fsencode(deep)) < 3900:
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    store = deep / ("r" * (4070 - len(os.fsencode(deep))))
    with pytest.raises(TrajectoryError, match=r"more than the 4095 this file system allows .* Fix: choose a shorter"):
        record(store)
    assert not store.exists() or not any(store.iterdir())


def test_counts_past_2_to_the_31_are_held_exactly(tmp_path):
    """A record's counts are 64-bit integers in the step columns: a step of 2**33 samples reads back exactly, and the
    file name of step 2**31 + 5 keeps its number whole (a store of 2**31 steps would be terabytes: what a long run
    meets are the columns and the names)."""
    from explaind.trajectory._layout import step_path
    from explaind.trajectory._steps import StepIndex
    from explaind.trajectory.manifest import StepRecord
    index = StepIndex([StepRecord(step=0, n_samples=2**33, grad_scale=1.0)])
    assert index[0].n_samples == 2**33
    assert step_path(2**31 + 5) == "steps/2147483653.safetensors"
