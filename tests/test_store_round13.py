"""Processes around the recording one, round 13: a process forked inside ``with rec:`` that trains or leaves the
block, ``multiprocessing`` pools (fork, spawn, forkserver) reading the store mid-run, a recorder built before a fork
and entered in the child, a reader that holds the store across the writer's close and a resume, a real SIGINT while
the writer commits.
(The writer lock across PID namespaces: ``test_store_round13_locks.py``.)

docs/recording.md, "Processes, permissions and versions, round 13", lists each case with what explaind did before.
A store read as the same run equals the uninterrupted run recorded in memory bit for bit (``same_run``), and
resumed, the uninterrupted longer run (``resumes_to_the_end``).
"""

from __future__ import annotations

import pytest
from _round12_kit import LONG, STEPS, load, record, reference, resumes_to_the_end, same_run
from _round13_kit import run_child

from explaind.exceptions import TrajectoryError
from explaind.trajectory.lock import LOCK


@pytest.fixture(scope="module")
def ref():
    return reference()


# --------------------------------------------------------------------------- a process forked inside `with rec:`
_FORK_TRAINS = """
rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store,
                                  background_writes=mode == "background")
with rec:
    for s in range(3):
        resumable_step(model, opt, X, y, s, rec)
    pid = os.fork()
    if pid == 0:  # the child goes on training with the parent's recorder (a forked search, a forgotten os._exit)
        signal.alarm(20)  # a hang ends here, as a failure
        try:
            resumable_step(model, opt, X, y, 3, rec)
        except TrajectoryError as exc:
            print("child:", exc, flush=True)
            os._exit(7)
        os._exit(0)
    for s in range(3, 6):
        resumable_step(model, opt, X, y, s, rec)
    print("child exit", os.waitpid(pid, 0)[1] >> 8, flush=True)
"""


@pytest.mark.parametrize("mode", ["background", "foreground"])
def test_a_forked_child_that_steps_inside_with_is_refused_and_the_parent_records_the_run(tmp_path, ref, mode):
    """Before: the child's ``optimizer.step()`` waited forever for the gradient check's thread, which a forked
    process does not have (ended by the alarm). Now it is a ``TrajectoryError`` naming both processes and the fix;
    the parent records its 6 steps bit for bit."""
    store = tmp_path / "run"
    done = run_child(_FORK_TRAINS, store, mode)
    assert done.returncode == 0, done.stderr
    assert "child exit 7" in done.stdout
    assert "forked from process" in done.stdout and "os._exit()" in done.stdout and str(store) in done.stdout
    assert same_run(store, ref) == STEPS
    assert not (store / LOCK).exists()
    assert resumes_to_the_end(store, ref) == STEPS


_FORK_LEAVES = """
rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store,
                                  background_writes=mode == "background")
read_end, write_end = os.pipe()
with rec:
    for s in range(3):
        resumable_step(model, opt, X, y, s, rec)
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        os.read(read_end, 1)  # the parent has finished its run: now the child leaves the block
    else:
        for s in range(3, 6):
            resumable_step(model, opt, X, y, s, rec)
if pid == 0:
    os._exit(0)
before = {p: open(os.path.join(r, p), "rb").read() for r, _, fs in os.walk(store) for p in fs}
os.write(write_end, b"x")
print("child exit", os.waitpid(pid, 0)[1], flush=True)
after = {p: open(os.path.join(r, p), "rb").read() for r, _, fs in os.walk(store) for p in fs}
print("unchanged", before == after, flush=True)
"""


@pytest.mark.parametrize("mode", ["background", "foreground"])
def test_a_forked_child_leaving_with_after_the_parent_finished_changes_nothing(tmp_path, ref, mode):
    """A child forked inside ``with rec:`` that runs on to the end of the block after the parent's run ended. Before:
    without background writes its ``__exit__`` wrote the parent's store again (a manifest of 3 steps over the
    parent's 6), with them it waited forever for a writer thread it does not have. Now it leaves the store alone,
    with a warning naming both processes."""
    store = tmp_path / "run"
    done = run_child(_FORK_LEAVES, store, mode)
    assert done.returncode == 0, done.stderr
    assert "child exit 0" in done.stdout and "unchanged True" in done.stdout, done.stdout + done.stderr
    assert "forked from process" in done.stderr and "left `with rec:`" in done.stderr
    assert same_run(store, ref) == STEPS
    assert resumes_to_the_end(store, ref) == STEPS


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


_FORK_FIRST = """
rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, background_writes=False)
pid = os.fork()  # the recorder built in the parent, entered and stepped in the child only
if pid == 0:
    with rec:
        for s in range(6):
            resumable_step(model, opt, X, y, s, rec)
    os._exit(0)
print("child exit", os.waitpid(pid, 0)[1], flush=True)
"""


def test_a_recorder_built_before_a_fork_and_entered_in_the_child_records_there(tmp_path, ref):
    """The process that enters ``with rec:`` is the one that records, also when the recorder was built in its
    parent: 6 steps bit for bit, the lock given back (the same before)."""
    store = tmp_path / "run"
    done = run_child(_FORK_FIRST, store)
    assert "child exit 0" in done.stdout, done.stderr
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
    from test_store_faults import _assert_same
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
_SIGINT_AT_COMMIT = """
import threading
from explaind.trajectory import store as store_module
real = store_module.StoreWriter._commit
commits = []
def slow(self, items):  # the signal arrives while the writer thread commits its third group
    commits.append(len(items))
    if len(commits) == 3:
        os.kill(os.getpid(), signal.SIGINT)
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
except KeyboardInterrupt:
    print("interrupted after", returned, flush=True)
"""


def test_a_real_sigint_while_the_writer_thread_commits_keeps_every_returned_step(tmp_path, ref):
    """SIGINT delivered (``os.kill``) while the background writer commits, the disk slowed to 0.2 s a commit:
    Python raises ``KeyboardInterrupt`` in the main thread, ``__exit__`` lets the writer commit every step whose
    ``step()`` returned, and gives the lock back; the store resumes bit for bit (the same before)."""
    store = tmp_path / "run"
    done = run_child(_SIGINT_AT_COMMIT, store)
    assert done.returncode == 0, done.stderr
    returned = int(done.stdout.split("interrupted after")[1].split()[0])
    assert 1 <= returned < 8
    assert same_run(store, ref) == returned
    assert not (store / LOCK).exists()
    resumes_to_the_end(store, ref)
