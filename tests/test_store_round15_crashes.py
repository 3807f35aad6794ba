"""Crashes and a full disk, round 15
(docs/recording.md, "What tools do to a store, round 15"): a kill at every write point of a dropout run's recording
and a full disk at every write point of a resumed step (real SIGKILLs and processes beside a resume:
tests/test_store_round15_processes.py).

Every store left behind is read as a prefix of the uninterrupted run bit for bit (round 5's in-memory reference:
``resumable_reference``, or the dropout run recorded in memory with the same seeds) and resumed to its end, bit for
bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _fault_injection import Injector, Killed
from _round12_kit import STEPS, record, reference, resumes_to_the_end, same_run
from test_store_faults import _assert_same
from test_store_salvage_round15 import ORDER, Net, X, Y, _batch_loss

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory.lock import _ACTIVE

HERE = Path(__file__).parent


# --------------------------------------------------------------------------- a kill at every write of a dropout run
def _dropout_run(store: Path | None, start: int, stop: int, *, resume: bool = False, progress: list | None = None):
    """The dropout run of tests/test_store_salvage_round15.py (``torch.manual_seed(100 + s)`` before step ``s``)."""
    model = Net("dropout")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, Y), store=store, resume=resume,
                                      **({} if store is None else {"background_writes": False}))
    if resume:
        start = rec.restore()
    model.train()
    with rec:
        for s in range(start, stop):
            torch.manual_seed(100 + s)
            opt.zero_grad()
            _batch_loss("dropout", model, ORDER[s]).backward()
            rec.log_batch(ORDER[s], torch.full((4,), 0.25, dtype=torch.float64))
            opt.step()
            if progress is not None:
                progress[0] = s + 1
    return rec


def _random_states(traj) -> list[torch.Tensor]:
    return [m.state.cpu for s in range(traj.n_steps) for m in traj.micro_batches(s)]


def test_a_kill_at_every_write_point_of_a_dropout_run_loses_no_returned_step(tmp_path, monkeypatch):
    """A dropout run (each step's random state in its file) killed at each of the write operations of its recording
    (tests/_fault_injection.py): the store holds every step whose ``optimizer.step()`` returned but the one in flight,
    its random states are the loop's, and resumed to the end it is the uninterrupted run bit for bit (its masks
    replayed from the seeds)."""
    ref = _dropout_run(None, 0, len(ORDER)).trajectory
    inj = Injector(monkeypatch, tmp_path)
    inj.start()
    _dropout_run(tmp_path / "clean", 0, len(ORDER))
    inj.stop()
    total = len(inj.events)
    assert total > 20
    for k in range(total):
        store, progress = tmp_path / f"k{k}", [0]
        inj.start(kill_at=k)
        with pytest.raises(Killed):
            _dropout_run(store, 0, len(ORDER), progress=progress)
        inj.stop()
        _ACTIVE.clear()  # the killed writer's lock is stale
        try:
            kept = explaind.Trajectory.load(store, model=Net("dropout")).n_steps
        except TrajectoryError as exc:
            assert "not an explaind trajectory store" in str(exc), (k, inj.events[-1], exc)
            kept = 0
        assert kept >= progress[0] - 1, (k, inj.events[-1], kept, progress)
        try:
            _dropout_run(store, 0, len(ORDER), resume=True)
        except TrajectoryError as exc:  # killed while it was set up: nothing recorded, a new recording accepts it
            assert kept == 0 and "no trajectory is stored" in str(exc), (k, inj.events[-1], exc)
            _dropout_run(store, 0, len(ORDER))
        traj = explaind.Trajectory.load(store, model=Net("dropout"))
        traj.verify()
        assert traj.n_steps == len(ORDER) and traj.manifest.complete
        _assert_same(ref, traj)
        assert all(torch.equal(a, b) for a, b in zip(_random_states(traj), _random_states(ref), strict=True))
        shutil.rmtree(store)


# --------------------------------------------------------------------------- a full disk mid-step
def test_a_full_disk_at_every_write_point_of_a_resumed_step_then_space_freed(tmp_path, monkeypatch):
    """A store of ``STEPS`` steps resumed while the disk is full: ``ENOSPC`` at each write operation of the resume's
    first step (tests/_fault_injection.py, ``error=True``). The resume raises, naming the full disk, or goes on where
    the failed operation was one it can do without; the store keeps every step it had; with the space freed it
    resumes to the end, the uninterrupted longer run bit for bit."""
    ref = reference()
    record(tmp_path / "template")
    inj = Injector(monkeypatch, tmp_path)
    probe = Path(shutil.copytree(tmp_path / "template", tmp_path / "probe"))
    inj.start()
    record(probe, STEPS + 1, resume=True)
    inj.stop()
    total = len(inj.events)
    assert total > 5
    raised = 0
    for k in range(total):
        store = Path(shutil.copytree(tmp_path / "template", tmp_path / f"k{k}"))
        inj.start(kill_at=k, error=True)
        try:
            record(store, STEPS + 1, resume=True)
        except (OSError, TrajectoryError) as exc:
            raised += 1
            assert "No space left on device" in str(exc) or "No space left on device" in str(exc.__cause__), exc
        inj.stop()
        _ACTIVE.clear()
        assert same_run(store, ref) >= STEPS  # nothing recorded before the full disk is lost
        assert resumes_to_the_end(store, ref) >= STEPS
        shutil.rmtree(store)
    assert raised > 0
