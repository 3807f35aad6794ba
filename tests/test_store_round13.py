"""Processes forked around the recording one, round 13: a process forked inside ``with rec:`` that trains or leaves
the block, and a recorder built before a fork and entered in the child. (Readers in other processes and signals:
``test_store_round13_readers.py``; the writer lock across PID namespaces: ``test_store_round13_locks.py``.)

docs/recording.md, "Processes, permissions and versions, round 13", lists each case with what explaind did before.
A store read as the same run equals the uninterrupted run recorded in memory bit for bit (``same_run``), and
resumed, the uninterrupted longer run (``resumes_to_the_end``).
"""

from __future__ import annotations

import pytest
from _round12_kit import STEPS, reference, resumes_to_the_end, same_run
from _round13_kit import run_child

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
