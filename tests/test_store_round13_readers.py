"""Readers and signals around the recording process, round 13: ``multiprocessing`` pools (fork, spawn, forkserver)
started inside ``with rec:`` that read the store mid-run, a reader that holds the store across the writer's close
and a resume, and a real SIGINT while the writer commits.

Each case, and what explaind did before, is in the table of the section
docs/recording.md, "Processes, permissions and versions, round 13"; stores are compared with the uninterrupted run as
in ``test_store_round13.py``.
"""

from __future__ import annotations

import pytest
from _round12_kit import LONG, STEPS, load, record, reference, resumes_to_the_end, same_run
from _round13_kit import run_child
from test_store_faults import _assert_same

from explaind.exceptions import TrajectoryError
from explaind.trajectory.lock import LOCK


@pytest.fixture(scope="module")
def ref():
    return reference()


# --------------------------------------------------------------------------- readers in other processes
_POOL = """
import multiprocessing
from _round13_kit import steps_seen
rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, background_writes=False)
with rec:
    for s in range(6):
        resumable_step(model, opt, X, y, s, rec)
        if s == 2:
            with multiprocessing.get_context(mode).Pool(2) as pool:
                print("seen", pool.map(steps_seen, [store] * 2), flush=True)
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_multiprocessing_pool_inside_with_reads_the_steps_committed_and_leaves_the_run(tmp_path, ref, method):
    """A pool of 2 workers started inside ``with rec:`` after step 2 (fork: copies of the recorder; spawn and
    forkserver: fresh interpreters importing explaind), each loading and verifying the store: each reads the 3
    committed steps; the run is recorded bit for bit, the lock given back (the same before)."""
    store = tmp_path / "run"
    done = run_child(_POOL, store, method)
    assert done.returncode == 0, done.stderr
    assert "seen [3, 3]" in done.stdout
    assert same_run(store, ref) == STEPS
    assert not (store / LOCK).exists()


# --------------------------------------------------------------------------- a reader that holds the store
@pytest.mark.parametrize("then", ["close", "resume"])
def test_a_reader_holding_the_store_across_the_writers_close_and_a_resume_verifies(tmp_path, ref, then):
    """A ``Trajectory`` loaded after step 2, kept while the recording goes on to step 5 and closes (and, with
    ``resume``, a second process resumes it to step 7): its optimizer-state slot now holds a later step's state.
    Before: ``verify()`` reported it corrupted ("copied ... while its run was being recorded") although nothing was,
    since no writer was running any more. Now the slot is checked against the store's index as it is now when that
    continues the reader's; the reader still reads its 3 steps bit for bit."""
    store = tmp_path / "run"
    held = {}
    record(store, STEPS, after=lambda st, s: held.setdefault("traj", load(st)) if s == 2 else None)
    if then == "resume":
        record(store, LONG, resume=True)
    traj = held["traj"]
    traj.verify()
    assert traj.n_steps == 3
    assert same_run(store, ref) == (STEPS if then == "close" else LONG)
    _assert_same(ref, traj)


def test_a_reader_holding_a_store_replaced_by_another_run_is_still_told_it_differs(tmp_path, ref):
    """The check against the index as it is now takes only a continuation of the reader's run: a store replaced by
    another recording (``overwrite=True``, a new ``run_id``) is still refused by the reader's ``verify()``."""
    store = tmp_path / "run"
    held = {}
    record(store, STEPS, after=lambda st, s: held.setdefault("traj", load(st)) if s == 2 else None)
    record(store, LONG, overwrite=True)
    with pytest.raises(TrajectoryError):
        held["traj"].verify()


# --------------------------------------------------------------------------- a real signal while the writer commits
_SIGNAL_AT_COMMIT = """
from explaind.trajectory import store as store_module
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a handler, as a job scheduler's preemption expects
# Ctrl-C's default: a test run started in the background of a non-interactive shell (a CI script's `cmd &`)
# inherits SIGINT ignored, and the child would never see the signal
signal.signal(signal.SIGINT, signal.default_int_handler)
real = store_module.StoreWriter._commit
killed = []
def slow(self, items):  # the signal arrives while the writer thread commits, once two steps have returned
    # (a count of commits is not enough: a writer slowed under load may take all eight steps in two commits)
    if returned >= 2 and not killed:
        killed.append(True)
        os.kill(os.getpid(), getattr(signal, mode))
    time.sleep(0.2)
    real(self, items)
store_module.StoreWriter._commit = slow
rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store)
returned = 0
try:
    with rec:
        for s in range(8):
            resumable_step(model, opt, X, y, s, rec)
            returned = s + 1
except (KeyboardInterrupt, SystemExit):
    print("interrupted after", returned, flush=True)
"""


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_real_signal_while_the_writer_thread_commits_keeps_every_returned_step(tmp_path, ref, signal_name):
    """SIGINT, or SIGTERM with a handler calling ``sys.exit``, delivered (``os.kill``) while the background writer
    commits, the disk slowed to 0.2 s a commit: Python raises ``KeyboardInterrupt`` or ``SystemExit`` in the main
    thread, ``__exit__`` lets the writer commit every step whose ``step()`` returned, and gives the lock back; the
    store resumes bit for bit (the same before)."""
    store = tmp_path / "run"
    done = run_child(_SIGNAL_AT_COMMIT, store, signal_name)
    assert done.returncode == 0, done.stderr
    assert "interrupted after" in done.stdout, (done.stdout, done.stderr)
    returned = int(done.stdout.split("interrupted after")[1].split()[0])
    assert 2 <= returned <= 8
    assert same_run(store, ref) == returned
    assert not (store / LOCK).exists()
    resumes_to_the_end(store, ref)
