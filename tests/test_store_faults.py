"""Fault injection: a kill at every write point of a recording leaves a store that resumes exactly or a
directory that a new recording accepts, loses no step whose ``optimizer.step()`` returned, and no
temporary file survives the next open.

The kills are simulated in-process (tests/_fault_injection.py): the k-th write operation under the
store raises :class:`Killed` and so does every later one, then a fresh recorder opens the same
path. ``test_sigkill_*`` kills real processes. Corruption of every file kind is checked at the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _fault_injection import Injector, Killed
from _recording_helpers import mlp, resumable_setup, resumable_step

import explaind
from explaind.exceptions import TrajectoryError
from explaind.recurrence import COEFFICIENT_NAMES
from explaind.trajectory import Trajectory
from explaind.trajectory._layout import SETUP, TEMP_FILE
from explaind.trajectory.lock import _ACTIVE, LOCK

HERE = Path(__file__).parent
N = 3  # steps of the recordings that are killed
#: kill points covered by the tests of this file (filled in as they run; printed by the last test)
COVERED: dict[str, int] = {}


def _model():
    model = mlp(seed=1)
    model.register_buffer("offset", torch.tensor([0.5, -0.25], dtype=torch.float64))  # a constants file
    return model


def _setup():
    model, opt, X, y = resumable_setup()
    model.register_buffer("offset", torch.tensor([0.5, -0.25], dtype=torch.float64))
    return model, opt, X, y


def _recorder(store, **kwargs):
    model, opt, X, y = _setup()
    kwargs.setdefault("background_writes", False)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, **kwargs)
    return rec, model, opt, X, y


def _record(store, start, stop, progress=None, **kwargs):
    """Record steps ``start..stop-1`` (restoring first when resuming); ``progress[0]``: steps whose step() returned."""
    rec, model, opt, X, y = _recorder(store, **kwargs)
    if kwargs.get("resume"):
        assert rec.restore() == start
    with rec:
        for s in range(start, stop):
            resumable_step(model, opt, X, y, s, rec)
            if progress is not None:
                progress[0] = s + 1
    return rec


@pytest.fixture
def tmp_path(tmp_path):
    """A directory on tmpfs where there is one (fsync costs nothing there; the kill points are the same)."""
    if not Path("/dev/shm").is_dir():
        yield tmp_path
        return
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="explaind-faults-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def reference():
    model, opt, X, y = _setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y))
    with rec:
        for s in range(8):
            resumable_step(model, opt, X, y, s, rec)
    return rec.trajectory


def _assert_same(ref, traj):
    """Bit-identical to the uninterrupted run over the stored steps."""
    n = traj.n_steps
    for s in range(n + 1):
        for k, v in traj.params(s).items():
            assert torch.equal(v, ref.params(s)[k]), (s, k)
    for s in range(n):
        for a, b in zip(traj.batch(s), ref.batch(s)):
            assert torch.equal(a, b), s
        expected = ref.updates(s)
        for k, u in traj.updates(s).items():
            for field in COEFFICIENT_NAMES:
                assert torch.equal(torch.as_tensor(getattr(u, field)), torch.as_tensor(getattr(expected[k], field)))
        assert traj.grad_scale(s) == ref.grad_scale(s)


def _temporary_files(store):
    return [str(p.relative_to(store)) for p in store.rglob("*") if TEMP_FILE.fullmatch(p.name)]


def _recover(store, returned, reference):
    """Open the killed store again: resume it (or start anew); returns the number of steps it kept."""
    try:
        rec, model, opt, X, y = _recorder(store, resume=True)
    except TrajectoryError as exc:  # nothing recorded there
        if "Pass overwrite=True to delete the interrupted recording's files" in str(exc):
            rec, model, opt, X, y = _recorder(store, overwrite=True)  # an interrupted overwrite, foreign files kept
            assert (store / "notes.txt").read_text() == "mine"
        else:
            assert "resume=True but no trajectory is stored" in str(exc)
            assert not store.exists() or not any(store.iterdir()), sorted(p.name for p in store.iterdir())
            rec, model, opt, X, y = _recorder(store)
        n = 0
    else:
        n = rec.restore()
    assert n >= returned, f"a step whose optimizer.step() returned was lost ({n} < {returned})"
    with rec:
        assert not _temporary_files(store)
        for s in range(n, N):
            resumable_step(model, opt, X, y, s, rec)
    traj = Trajectory.load(store, model=_model())
    traj.verify()
    assert traj.manifest.complete and traj.n_steps == max(n, N)
    assert not (store / SETUP).exists() and not (store / LOCK).exists()
    _assert_same(reference, traj)
    return n


def _kill_every_point(tmp_path, monkeypatch, reference, name, prepare, run, check_overwrite=False):
    """Run ``run(store, progress)`` once per write point, killed there, and recover each time."""
    inj = Injector(monkeypatch, tmp_path)
    prepare(tmp_path / "clean")
    inj.start()
    run(tmp_path / "clean", [0])
    inj.stop()
    total, lost = len(inj.events), {}
    assert total > 20
    for k in range(total):
        store = tmp_path / f"k{k}"
        prepare(store)
        progress = [0]
        inj.start(kill_at=k)
        with pytest.raises(Killed):
            run(store, progress)
        inj.stop()
        _ACTIVE.clear()  # the killed writer's process is gone: its lock is stale
        if check_overwrite and store.exists():
            copy = tmp_path / f"o{k}"
            shutil.copytree(store, copy, symlinks=True)
            _record(copy, 0, N, overwrite=True)
            _assert_same(reference, Trajectory.load(copy, model=_model()))
            shutil.rmtree(copy)
        kept = _recover(store, progress[0], reference)
        lost[k] = progress[0] + 1 - kept  # the step in flight counts as lost when it did not make it
        shutil.rmtree(store)
    COVERED[name] = total
    return lost


def test_a_kill_at_any_write_point_of_a_new_recording(tmp_path, monkeypatch, reference):
    lost = _kill_every_point(tmp_path, monkeypatch, reference, "new recording",
                             prepare=lambda store: None,
                             run=lambda store, progress: _record(store, 0, N, progress),
                             check_overwrite=True)
    assert max(lost.values()) <= 1  # at most the step in flight


def test_a_kill_at_any_write_point_of_an_overwrite(tmp_path, monkeypatch, reference):
    def prepare(store):
        _record(store, 0, 5)
        (store / "notes.txt").write_text("mine")

    def run(store, progress):
        _record(store, 0, N, progress, overwrite=True)

    lost = _kill_every_point(tmp_path, monkeypatch, reference, "overwrite", prepare, run)
    assert max(lost.values()) <= 1


def test_a_kill_at_any_write_point_of_a_resumed_recording(tmp_path, monkeypatch, reference):
    def prepare(store):
        _record(store, 0, 1)

    def run(store, progress):
        progress[0] = 1
        _record(store, 1, N, progress, resume=True)

    lost = _kill_every_point(tmp_path, monkeypatch, reference, "resume", prepare, run)
    assert max(lost.values()) <= 1
