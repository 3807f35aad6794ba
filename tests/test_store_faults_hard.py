"""Store faults a user meets that tests/test_store_faults.py does not simulate: a directory that cannot be written,
a full disk while the store is set up, a second process on the same store, Ctrl-C inside ``optimizer.step()``,
a store written by a newer explaind, and someone else's files inside a store.

Every case ends in an explaind error naming the path, the cause and the fix (never a bare ``OSError``), and no
step recorded before it is lost: the store still loads, verifies and resumes to the uninterrupted run bit for bit.
Truncated and bit-flipped tensor files, manifests and journals are tests/test_store_corruption.py and
tests/test_store_disk.py; a kill or a full disk at every write point is tests/test_store_faults.py.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.optim.adam as torch_adam
from _recording_helpers import mlp, resumable_reference, resumable_setup, resumable_step

import explaind
from explaind.exceptions import ExplaindError, TrajectoryError
from explaind.recurrence import COEFFICIENT_NAMES
from explaind.trajectory import Trajectory
from explaind.trajectory._filewrite import TensorFileWriter
from explaind.trajectory.lock import LOCK
from explaind.trajectory.manifest import SCHEMA_VERSION

HERE = Path(__file__).parent
STEPS = 6


@pytest.fixture(scope="module")
def reference():
    """The run recorded in memory without interruption."""
    return resumable_reference(STEPS)


def _record(store, start, stop, **kwargs):
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, **kwargs)
    if kwargs.get("resume"):
        assert rec.restore() == start
    with rec:
        for s in range(start, stop):
            resumable_step(model, opt, X, y, s, rec)
    return rec


def _assert_prefix(reference, store, n, complete):
    traj = Trajectory.load(store, model=mlp(seed=1))
    assert traj.n_steps == n and traj.manifest.complete is complete
    traj.verify()
    for s in range(n + 1):
        for k, v in traj.params(s).items():
            assert torch.equal(v, reference.params(s)[k]), (s, k)
    for s in range(n):
        assert all(torch.equal(a, b) for a, b in zip(traj.batch(s), reference.batch(s)))


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(params=[errno.EACCES, errno.EROFS], ids=["no-permission", "read-only-fs"])
def read_only(request, monkeypatch):
    """``read_only(root)``: from then on every write under ``root`` fails as on a read-only directory.

    The tests run as any user (root ignores permission bits), so the refusals are injected where the
    library creates, replaces, links or removes files.
    """
    roots: list[str] = []
    code = request.param

    def refused(path) -> bool:
        path = os.fspath(path)
        return any(path == r or path.startswith(r + os.sep) for r in roots)

    def fail(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    real_open, real = builtins.open, {n: getattr(os, n) for n in ("open", "mkdir", "replace", "link", "unlink")}

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, str | os.PathLike) and set(mode) & set("wax+") and refused(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
            fail(path)
        return real["open"](path, flags, *args, **kwargs)

    def on_path(name, index):
        def wrapper(*args, **kwargs):
            if refused(args[index]):
                fail(args[index])
            return real[name](*args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    for name, index in (("mkdir", 0), ("replace", 1), ("link", 1), ("unlink", 0)):
        monkeypatch.setattr(os, name, on_path(name, index))
    return lambda root: roots.append(os.fspath(root))


SETUP_ERROR = (r"Cannot set up the trajectory store at '.*{}': (PermissionError|OSError): .*Nothing was recorded.*"
               r"Fix: pass a store path in a writable directory.*or store=None to record in memory")


def test_a_new_store_in_a_read_only_directory_is_an_explaind_error(tmp_path, read_only):
    read_only(tmp_path)
    with pytest.raises(TrajectoryError, match=SETUP_ERROR.format("run")):
        _record(tmp_path / "run", 0, 1)
    assert not (tmp_path / "run").exists()
    with pytest.raises(TrajectoryError, match=SETUP_ERROR.format(tmp_path.name)):
        _record(tmp_path, 0, 1)  # the empty directory itself
    assert _listing(tmp_path) == []


def test_a_stored_run_in_a_directory_turned_read_only_loads_and_refuses_resume_and_overwrite(tmp_path, read_only,
                                                                                              reference):
    store = tmp_path / "run"
    _record(store, 0, 3)
    before = _listing(store)
    read_only(store)
    _assert_prefix(reference, store, 3, complete=True)  # reading writes nothing
    with pytest.raises(TrajectoryError, match=SETUP_ERROR.format("run")):
        _record(store, 3, STEPS, resume=True)
    with pytest.raises(TrajectoryError, match=SETUP_ERROR.format("run")):
        _record(store, 0, STEPS, overwrite=True)
    assert _listing(store) == before
    _assert_prefix(reference, store, 3, complete=True)


def test_a_full_disk_while_the_store_is_set_up_is_an_explaind_error_and_the_path_is_reusable(tmp_path, monkeypatch,
                                                                                              reference):
    real = TensorFileWriter.write
    failed = []

    def full(self, root, relpath, *args, **kwargs):
        if relpath == "initial.safetensors" and not failed:
            failed.append(relpath)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, root, relpath, *args, **kwargs)

    monkeypatch.setattr(TensorFileWriter, "write", full)
    store = tmp_path / "run"
    with pytest.raises(TrajectoryError, match=SETUP_ERROR.format("run")) as info:
        _record(store, 0, STEPS)
    assert "No space left on device" in str(info.value)
    assert failed and not (store / LOCK).exists()  # the abandoned writer released its lock
    with pytest.raises(TrajectoryError, match="is not an explaind trajectory store"):
        Trajectory.load(store, model=mlp(seed=1))  # an interrupted set-up leaves no store
    _record(store, 0, STEPS)  # the same process records there once space is back
    _assert_prefix(reference, store, STEPS, complete=True)


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from _recording_helpers import resumable_setup, resumable_step
    import explaind

    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store={store!r})
    with rec:
        for s in range({steps}):
            resumable_step(model, opt, X, y, s, rec)
            if s == 0:
                print("recording", flush=True)
                sys.stdin.readline()  # hold the store until the parent has tried it
    """
)


def test_a_second_process_on_a_store_being_written_is_refused_and_the_first_finishes(tmp_path, reference):
    store = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(HERE), store=str(store), steps=STEPS))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert proc.stdout.readline().strip() == "recording"
        for kwargs in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(TrajectoryError, match=rf"being written by process {proc.pid} .* a second writer "
                                                      rf"would corrupt"):
                _record(store, 0, 1, **kwargs)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_prefix(reference, store, STEPS, complete=True)


def _interrupt_torch_update(monkeypatch, at_call):
    """Ctrl-C in the middle of ``torch.optim.Adam``'s update: half the parameters moved, then KeyboardInterrupt."""
    real, calls = torch_adam.adam, [0]

    def update(params, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at_call:
            real(params[:2], *[a[:2] if isinstance(a, list) else a for a in args], **kwargs)
            raise KeyboardInterrupt
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch_adam, "adam", update)


def _interrupt_gradient_check(monkeypatch, at_call):
    """Ctrl-C while the recorder's pre-step hook recomputes the batch gradient."""
    import explaind.trajectory._recorder_checks as checks

    real, calls = checks.check_batch_gradient, [0]

    def check(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(checks, "check_batch_gradient", check)


def _interrupt_step_write(monkeypatch, at_call):
    """Ctrl-C while the recorder's post-step hook hands the step to the store (torch's update is done)."""
    from explaind.trajectory.store import StoreWriter

    real, calls = StoreWriter.write_step, [0]

    def write_step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at_call:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "write_step", write_step)


@pytest.mark.parametrize("where", [_interrupt_torch_update, _interrupt_gradient_check, _interrupt_step_write],
                         ids=["inside-torch-update", "inside-gradient-check", "inside-the-step-write"])
def test_ctrl_c_inside_optimizer_step_keeps_every_step_before_and_resumes_bit_for_bit(tmp_path, monkeypatch,
                                                                                       reference, where):
    store, stop = tmp_path / "run", 3  # Ctrl-C at step 2: the third call (the gradient check runs at every step)
    where(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        _record(store, 0, STEPS, check_gradients=True)
    monkeypatch.undo()
    _assert_prefix(reference, store, stop - 1, complete=False)
    _record(store, stop - 1, STEPS, resume=True)  # restore() undoes the half-applied update
    _assert_prefix(reference, store, STEPS, complete=True)


def test_a_store_from_a_newer_explaind_is_neither_resumed_nor_overwritten(tmp_path):
    store = tmp_path / "run"
    _record(store, 0, 2)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (store / "manifest.json").write_text(json.dumps(manifest))
    before = _listing(store)
    with pytest.raises(TrajectoryError, match=rf"schema_version {SCHEMA_VERSION + 1}; this explaind reads up to "
                                              rf"{SCHEMA_VERSION}\. Upgrade explaind"):
        _record(store, 2, 4, resume=True)
    with pytest.raises(TrajectoryError, match=r"overwrite=True deletes only a valid explaind trajectory store.*"
                                              r"schema_version.*Nothing was deleted"):
        _record(store, 0, 2, overwrite=True)
    assert _listing(store) == before


def test_someone_elses_files_inside_a_store_are_ignored_and_kept(tmp_path, reference):
    store = tmp_path / "run"
    _record(store, 0, 3)
    (store / "notes.txt").write_text("mine")
    (store / "steps" / "plot.png").write_bytes(os.urandom(64))
    (store / "steps" / "000099.safetensors").write_bytes(os.urandom(64))  # looks like a step; no journal line
    _assert_prefix(reference, store, 3, complete=True)
    _record(store, 3, STEPS, resume=True)
    _assert_prefix(reference, store, STEPS, complete=True)
    _record(store, 0, STEPS, overwrite=True)
    assert (store / "notes.txt").read_text() == "mine" and (store / "steps" / "plot.png").exists()


def _what_the_engine_reads(traj):
    """Everything the replica and influence estimators read of a store, as comparable values."""
    out = {"n_steps": traj.n_steps, "loss": traj.loss.name, "names": tuple(traj.param_names)}
    for s in range(traj.n_steps + 1):
        out |= {f"theta_{s}.{k}": v for k, v in traj.params(s).items()}
    for s in range(traj.n_steps):
        out |= {f"batch_{s}.{i}": t for i, t in enumerate(traj.batch(s))}
        out[f"c_{s}"] = float(traj.grad_scale(s))
        out |= {f"update_{s}.{k}.{f}": torch.as_tensor(getattr(u, f)) for k, u in traj.updates(s).items()
                for f in COEFFICIENT_NAMES}
    return out


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


@pytest.mark.parametrize("relpath", ["manifest.json", "journal.jsonl"])
def test_one_flipped_bit_in_the_manifest_or_journal_is_an_error_or_changes_nothing_read(tmp_path, relpath):
    """Every 9th byte of the file, one bit flipped: an explaind error, or the engine reads exactly the same run.

    Bytes nothing reads (the creation time, ``extras``, the hyperparameters kept for information, the journal of a
    store whose manifest is complete) may change freely; the adapter's name is read by the counterfactual
    estimator only, where an unknown name is an ``UnknownEntryError``, so it is left out of the comparison.
    """
    store = tmp_path / "run"
    _record(store, 0, 3)
    X, y = resumable_setup()[2:]
    base = _what_the_engine_reads(Trajectory.load(store, model=mlp(seed=1), train_data=(X, y)))
    path = store / relpath
    data = path.read_bytes()
    outcomes = {"error": 0, "same": 0}
    for i in range(0, len(data), 9):
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
        try:
            traj = Trajectory.load(store, model=mlp(seed=1), train_data=(X, y))
            traj.verify()
            read = _what_the_engine_reads(traj)
        except ExplaindError:
            outcomes["error"] += 1
            continue
        assert _equal(read, base), (i, data[max(0, i - 20) : i + 5])
        outcomes["same"] += 1
    path.write_bytes(data)
    assert outcomes["error"] > outcomes["same"] / 10  # the flips do reach what is checked
