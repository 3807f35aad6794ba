"""Interruptions from the user's own loop, round 11: Ctrl-C and exceptions at each point of a step and in ``__exit__``,
a second ``with rec:`` on the same recorder, a recorder never exited (``sys.exit()`` in the loop, an abandoned
loop), ``os.fork()`` and a fork-start DataLoader during recording, the store deleted mid-run, read by the recording
process, written under ``umask 077`` on a path with spaces and non-ASCII letters, and a recorder stepped from a
second thread.

docs/recording.md, "Interruptions from the loop, round 11", lists each case with what explaind did before. A store is
compared bit for bit with the uninterrupted run recorded in memory (``_assert_same``, after ``verify()``), and resumed
to the end, bit for bit with the uninterrupted run.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _recording_helpers import resumable_reference, resumable_setup, resumable_step
from test_store_faults import _assert_same

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import store as store_module
from explaind.trajectory.lock import LOCK

HERE = Path(__file__).parent
STEPS = 8


@pytest.fixture(scope="module")
def reference():
    return resumable_reference(STEPS)


def _recorder(store: Path, resume: bool = False, **kwargs):
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, resume=resume, **kwargs)
    start = rec.restore() if resume else 0
    return rec, model, opt, X, y, start


def _stored(store: Path, reference) -> int:
    """The steps the store holds for a reader; it verifies and equals the uninterrupted run."""
    traj = explaind.Trajectory.load(store, model=resumable_setup()[0])
    traj.verify()
    _assert_same(reference, traj)
    return traj.n_steps


def _resume_to_the_end(store: Path, reference) -> int:
    """Resume here to ``STEPS`` steps; the run equals the uninterrupted one bit for bit. The step resumed at."""
    rec, model, opt, X, y, start = _recorder(store, resume=True)
    with rec:
        for s in range(start, STEPS):
            resumable_step(model, opt, X, y, s, rec)
    assert _stored(store, reference) == STEPS
    assert not (store / LOCK).exists()
    return start


# --------------------------------------------------------------------------- exceptions raised in the loop
class _LossFailed(ValueError):
    pass


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit, AssertionError, _LossFailed, FloatingPointError])
@pytest.mark.parametrize("where", ["forward", "between backward and step"])
def test_an_exception_from_the_loop_keeps_every_step_and_resumes(tmp_path, reference, raised, where):
    """Ctrl-C, ``sys.exit()``, an ``assert``, the user's loss raising, a NaN check raising, in the forward of step 4 or
    between its backward and ``step()`` (its batch logged): steps 0-3 are kept, the store resumes bit for bit. Before:
    the same."""
    store = tmp_path / "run"
    rec, model, opt, X, y, _ = _recorder(store)
    with pytest.raises(raised), rec:
        for s in range(4):
            resumable_step(model, opt, X, y, s, rec)
        idx = torch.arange(8)
        opt.zero_grad()
        if where == "forward":
            raise raised("in the forward")
        torch.nn.functional.mse_loss(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        raise raised("between backward and step")
    assert _stored(store, reference) == 4
    assert _resume_to_the_end(store, reference) == 4


def test_ctrl_c_while_the_background_writer_is_behind_keeps_every_returned_step(tmp_path, reference, monkeypatch):
    """Ctrl-C in the loop while the background writer still commits earlier steps (each commit slowed by 0.1 s, so
    steps wait in its queue): ``__exit__`` lets the writer finish; all 5 returned steps are kept, resumed bit for bit.
    Before: the same."""
    real = store_module.StoreWriter._commit

    def slow(self, items):
        time.sleep(0.1)
        real(self, items)

    monkeypatch.setattr(store_module.StoreWriter, "_commit", slow)
    store = tmp_path / "run"
    rec, model, opt, X, y, _ = _recorder(store)
    with pytest.raises(KeyboardInterrupt), rec:
        for s in range(5):
            resumable_step(model, opt, X, y, s, rec)
        assert len((store / "journal.jsonl").read_bytes().splitlines()) < 5  # the writer is behind
        raise KeyboardInterrupt
    monkeypatch.undo()
    assert _stored(store, reference) == 5
    assert _resume_to_the_end(store, reference) == 5


def test_a_second_with_on_the_same_recorder_is_refused_and_the_store_resumes(tmp_path, reference):
    """An exception inside ``with rec:``, then a second ``with rec:`` on the same recorder: refused before anything is
    written, naming the store and the fix (a new recorder with ``resume=True``). Before: the second block set the store
    up as a new run over the first one's files, and the store could not be read ("belongs to the run ...")."""
    store = tmp_path / "run"
    rec, model, opt, X, y, _ = _recorder(store)
    with pytest.raises(_LossFailed), rec:
        for s in range(3):
            resumable_step(model, opt, X, y, s, rec)
        raise _LossFailed("loss")
    with pytest.raises(TrajectoryError, match=r"already recorded into the trajectory store .*resume=True"), rec:
        resumable_step(model, opt, X, y, 3, rec)
    assert _stored(store, reference) == 3
    assert _resume_to_the_end(store, reference) == 3


@pytest.mark.parametrize("where", ["flush", "write_manifest"])
def test_ctrl_c_in_exit_gives_the_lock_back(tmp_path, reference, monkeypatch, where):
    """Ctrl-C while ``__exit__`` waits for the background writer (``flush``) or writes the final manifest: the writer
    commits what it holds and the lock is given back, so this process resumes the store bit for bit. Before: the same
    for the manifest; in the wait the lock stayed held by the live process and every later recorder of it was refused
    as "being written by process" its own id."""
    store = tmp_path / "run"
    rec, model, opt, X, y, _ = _recorder(store)

    def interrupted(self):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), rec:
        for s in range(3):
            resumable_step(model, opt, X, y, s, rec)
        monkeypatch.setattr(store_module.StoreWriter, where, interrupted)
    monkeypatch.undo()
    assert not (store / LOCK).exists()
    assert _stored(store, reference) == 3
    assert _resume_to_the_end(store, reference) == 3


def test_a_recorder_left_open_in_this_process_is_named_with_the_fix(tmp_path, reference):
    """A loop left without ``__exit__`` (``rec.__enter__()`` by hand, an abandoned generator): a new recorder on the
    store is refused naming this process, the recorder left open and the fix; after ``rec.__exit__`` it resumes bit
    for bit. Before: "being written by process <this one> ... Wait for that recording to finish"."""
    store = tmp_path / "run"
    rec, model, opt, X, y, _ = _recorder(store)
    rec.__enter__()
    for s in range(3):
        resumable_step(model, opt, X, y, s, rec)
    with pytest.raises(TrajectoryError, match=rf"process {os.getpid()} \(this one.*was left without __exit__.*"
                                              r"rec.__exit__\(None, None, None\)"):
        _recorder(store, resume=True)
    rec.__exit__(None, None, None)
    assert _resume_to_the_end(store, reference) == 3


def test_a_generator_loop_closed_mid_run_exits_the_recorder(tmp_path, reference):
    """A generator-based loop with ``with rec:`` inside, closed after 3 steps: ``GeneratorExit`` runs ``__exit__``, the
    lock is given back, the 3 steps are kept and resume bit for bit. Before: the same."""
    store = tmp_path / "run"

    def loop():
        rec, model, opt, X, y, _ = _recorder(store)
        with rec:
            for s in range(STEPS):
                resumable_step(model, opt, X, y, s, rec)
                yield s

    steps = loop()
    assert [next(steps) for _ in range(3)] == [0, 1, 2]
    steps.close()
    assert not (store / LOCK).exists()
    assert _stored(store, reference) == 3
    assert _resume_to_the_end(store, reference) == 3


def _abandoned_loop(store: Path, steps: int) -> None:
    """Enter a recorder by hand, take ``steps`` steps and drop it with its model and optimizer (its own frame)."""
    rec, model, opt, X, y, _ = _recorder(store)
    rec.__enter__()
    for s in range(steps):
        resumable_step(model, opt, X, y, s, rec)


def test_a_recorder_collected_without_exit_commits_and_unlocks(tmp_path, reference, caplog):
    """A recorder entered by hand and dropped with its model and optimizer (an abandoned loop), then garbage-collected:
    when the next recorder of this process opens the store, the old writer commits the steps it was handed and gives
    the lock back, with a warning, and the store resumes bit for bit from all 3. Before: the lock stayed held by this
    live process and the resume was refused."""
    store = tmp_path / "run"
    _abandoned_loop(store, 3)
    gc.collect()
    assert _resume_to_the_end(store, reference) == 3
    assert "was garbage-collected without __exit__" in caplog.text


# --------------------------------------------------------------------------- leaving the process
_CHILD = """
import atexit, os, signal, sys, threading, time
sys.path.insert(0, sys.argv[2])
from _recording_helpers import resumable_setup, resumable_step
import explaind
from explaind.trajectory import store as store_module
real = store_module.StoreWriter._commit
def slow(self, items):  # a slow disk: steps pile up in the writer's queue
    time.sleep(0.2)
    real(self, items)
store_module.StoreWriter._commit = slow
store, mode = sys.argv[1], sys.argv[3]
def report():  # the user's own exit hook, registered after the recorder's: it sees the store as left
    print(explaind.Trajectory.load(store, model=resumable_setup()[0]).n_steps, flush=True)
model, opt, X, y = resumable_setup()
rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store)
atexit.register(report)
if mode == "sigterm-handler":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
if mode == "thread":  # a non-daemon training thread inside `with rec:` while the main thread exits
    def train():
        with rec:
            for s in range(6):
                resumable_step(model, opt, X, y, s, rec)
                time.sleep(0.1)
    trainer = threading.Thread(target=train)
    trainer.start()
    while not rec._active and trainer.is_alive():
        time.sleep(0.01)
    sys.exit(3)
if mode == "late-thread":  # a thread that enters `with rec:` only after the main thread has exited
    def late():
        time.sleep(1.0)
        with rec:
            resumable_step(model, opt, X, y, 0, rec)
    threading.Thread(target=late).start()
    sys.exit(3)
if mode.startswith("sigterm"):
    with rec:
        for s in range(6):
            resumable_step(model, opt, X, y, s, rec)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
rec.__enter__()  # a loop that never reaches __exit__
for s in range(6):
    resumable_step(model, opt, X, y, s, rec)
if mode == "fork":
    pid = os.fork()
    if pid == 0:  # the child leaves through sys.exit(): its exit hooks run
        sys.exit(0)
    os.waitpid(pid, 0)
sys.exit(3)
"""


def _child(store: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE.parent / "plugins")]))
    return subprocess.run([sys.executable, "-c", _CHILD, str(store), str(HERE), mode], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("mode", ["", "fork"])
def test_sys_exit_without_exit_commits_every_returned_step(tmp_path, reference, mode):
    """``sys.exit()`` in a loop that never reaches ``__exit__``, with the writer behind (a slow disk): at exit, before
    the user's ``atexit`` hooks, the recorder is exited with a warning; all 6 steps whose ``step()`` returned are kept,
    the lock is given back, and the store resumes bit for bit. With a child forked first that leaves through
    ``sys.exit()`` too, the child touches nothing. Before: the writer's daemon thread died with the interpreter and
    the queued steps were lost (4 of 6 kept; with the fork, whose wait let the writer catch up, 6, without a word)."""
    store = tmp_path / "run"
    done = _child(store, mode)
    assert done.returncode == 3, done.stderr
    assert _stored(store, reference) == 6
    assert done.stdout.split()[-1] == "6"  # what the user's atexit hook read (a forked child prints first)
    assert "was not exited" in done.stderr
    assert not (store / LOCK).exists()
    assert _resume_to_the_end(store, reference) == 6


def test_a_training_thread_inside_with_when_the_main_thread_exits_records_to_its_end(tmp_path, reference):
    """The main thread ends (``sys.exit``) while a non-daemon thread records 6 steps inside its ``with rec:``: the exit
    hook waits until that block has ended (before the thread pools shut down), and the store ends complete with all
    6 steps. Before: the pools shut down under the thread; its first step's write failed with "RuntimeError: cannot
    schedule new futures after shutdown" and the store kept 0 steps."""
    store = tmp_path / "run"
    done = _child(store, "thread")
    assert done.returncode == 3, done.stderr
    assert "was not exited" not in done.stderr
    assert _stored(store, reference) == 6
    assert explaind.Trajectory.load(store, model=resumable_setup()[0]).manifest.complete


def test_a_thread_entering_with_after_the_main_thread_exited_is_told_why(tmp_path):
    """A thread that enters ``with rec:`` only after the main thread has exited: a ``TrajectoryError`` naming the cause
    (the interpreter shutting down) and the fix (join the thread that records). Before: "RuntimeError: cannot schedule
    new futures after interpreter shutdown"."""
    done = _child(tmp_path / "run", "late-thread")
    assert done.returncode == 3, done.stderr
    assert re.search(r"TrajectoryError: Recording into .* cannot start: the main thread has exited.*thread\.join\(\)",
                     done.stderr), done.stderr


def test_sigterm_with_a_handler_keeps_every_step_and_without_one_the_crash_bound(tmp_path, reference):
    """SIGTERM after step 5 inside ``with rec:``: with a handler calling ``sys.exit`` (``SystemExit`` through
    ``__exit__``) all 6 steps are kept; without one the process ends at once as after a SIGKILL, and keeps what a crash
    keeps (here, the disk slow, fewer than 6, at most 4 returned steps lost); each store resumes bit for bit. Before:
    the same."""
    handled = _child(tmp_path / "handled", "sigterm-handler")
    assert handled.returncode == 143, handled.stderr
    assert _stored(tmp_path / "handled", reference) == 6
    assert _resume_to_the_end(tmp_path / "handled", reference) == 6
    killed = _child(tmp_path / "killed", "sigterm")
    assert killed.returncode == -15, killed.stderr
    kept = _stored(tmp_path / "killed", reference)
    assert 6 - 4 <= kept < 6
    assert _resume_to_the_end(tmp_path / "killed", reference) == kept


def test_a_fork_start_dataloader_and_a_forked_reader_leave_the_run_alone(tmp_path, reference):
    """A DataLoader with ``num_workers=2`` and the fork start method, iterated inside ``with rec:``, and a child forked
    after the recorder started that loads the store and leaves with ``os._exit``: the run is recorded as without them,
    bit for bit. Before: the same."""
    store = tmp_path / "run"
    rec, model, opt, X, y, _ = _recorder(store)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(32)), batch_size=8,
                                         num_workers=2, multiprocessing_context="fork")
    with rec:
        for s in range(STEPS):
            if s == 2:
                assert sorted(int(i) for (b,) in loader for i in b) == list(range(32))
                pid = os.fork()
                if pid == 0:
                    code = 0
                    try:
                        explaind.Trajectory.load(store, model=resumable_setup()[0])
                    except BaseException:
                        code = 1
                    os._exit(code)
                assert os.waitpid(pid, 0)[1] == 0
            resumable_step(model, opt, X, y, s, rec)
    assert _stored(store, reference) == STEPS


# --------------------------------------------------------------------------- the store's directory
def test_the_store_deleted_while_recording_is_an_error_naming_the_journal(tmp_path):
    """``shutil.rmtree`` of the store after step 2: the next step is a ``TrajectoryError`` naming the journal, what
    happened and the fix. Before: no error; the writer went on into the deleted journal and a directory made anew,
    and left a manifest listing 8 steps without the start files or steps 0-2."""
    store = tmp_path / "run"
    rec, model, opt, X, y, _ = _recorder(store, background_writes=False)
    with pytest.raises(TrajectoryError, match=r"journal.jsonl' of the trajectory store being recorded is gone.*"
                                              r"deleted, moved or replaced while recording.*Fix: keep") as exc, rec:
        for s in range(STEPS):
            resumable_step(model, opt, X, y, s, rec)
            if s == 2:
                shutil.rmtree(store)
    assert "Nothing stored is lost" not in str(exc.value)  # the note on what is on disk speaks of a directory gone
    assert not (store / "manifest.json").exists()


def test_a_reader_in_the_recording_process_sees_a_growing_prefix(tmp_path, reference):
    """``Trajectory.load`` of the store after every step, in the recording process: each load a prefix of the run,
    never fewer steps than the one before; the store ends complete. Before: the same."""
    store = tmp_path / "run"
    rec, model, opt, X, y, _ = _recorder(store)
    seen = [0]
    with rec:
        for s in range(STEPS):
            resumable_step(model, opt, X, y, s, rec)
            seen.append(_stored(store, reference))
            assert seen[-1] >= seen[-2]
    assert _stored(store, reference) == STEPS


def test_umask_077_on_a_path_with_spaces_and_unicode(tmp_path, reference):
    """A store recorded under ``umask 077`` at a path with spaces and non-ASCII letters: files 0600, directories 0700
    (the owner reads them; the group and others do not), read and resumed bit for bit. Before: the same."""
    store = tmp_path / "mit Lücke é 日本"
    old = os.umask(0o077)
    try:
        rec, model, opt, X, y, _ = _recorder(store)
        with rec:
            for s in range(4):
                resumable_step(model, opt, X, y, s, rec)
        modes = {p.is_dir(): oct(p.stat().st_mode & 0o777) for p in store.rglob("*")}
        assert modes == {False: "0o600", True: "0o700"}
        assert _resume_to_the_end(store, reference) == 4
    finally:
        os.umask(old)


def test_steps_taken_on_a_second_thread(tmp_path, reference):
    """Steps 2-3 taken on another thread (one thread at a time), inside ``with rec:`` of the main thread: recorded as
    on one thread, bit for bit. Before: the same."""
    store = tmp_path / "run"
    rec, model, opt, X, y, _ = _recorder(store)
    errors: list[BaseException] = []

    def other():
        try:
            for s in range(2, 4):
                resumable_step(model, opt, X, y, s, rec)
        except BaseException as exc:
            errors.append(exc)

    with rec:
        for s in range(2):
            resumable_step(model, opt, X, y, s, rec)
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert errors == []
    assert _resume_to_the_end(store, reference) == 4
