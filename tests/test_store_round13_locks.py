"""The writer lock across processes, round 13: a writer in another PID namespace on the same host name (a container
sharing the host's name and the store's volume), live or killed; a dead writer whose process id was given to another
process (a container restarted); a lock an older explaind wrote (no flock).

docs/recording.md, "Processes, permissions and versions, round 13", lists each case with what explaind did before.
A store read as the same run equals the uninterrupted run recorded in memory bit for bit, and resumed, the
uninterrupted longer run (``resumes_to_the_end``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from _round12_kit import LONG, record, reference, resumes_to_the_end, snapshot
from _round13_kit import run_child, wait_for_line

from explaind.exceptions import TrajectoryError
from explaind.trajectory.lock import LOCK


@pytest.fixture(scope="module")
def ref():
    return reference()


def _until_free(lock: Path, timeout: float = 30) -> None:
    """Wait until no process holds the flock of ``lock`` (a killed process's is dropped as it ends)."""
    deadline = time.monotonic() + timeout
    with open(lock, "rb") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the killed writer's process did not end"
                time.sleep(0.1)


# --------------------------------------------------------------------------- the writer lock across PID namespaces
_SLOW_WRITER = """
rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, background_writes=False)
with rec:
    for s in range(3):
        resumable_step(model, opt, X, y, s, rec)
    print("recording", os.getpid(), flush=True)
    time.sleep(120)  # killed here
"""


def _in_new_pid_namespace() -> tuple[str, ...]:
    prefix = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc")
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    assert probe.returncode == 0, probe.stderr  # root in this container: new PID namespaces are allowed
    return prefix


def test_a_writer_in_another_pid_namespace_is_refused_while_it_lives_and_taken_over_once_killed(tmp_path, ref):
    """A recording in a new PID namespace (a container on this host's name): its process is process 1 there, and
    process 1 of this namespace is alive too. While it records, a resume here is refused; once it is killed (the
    container stopped), its lock's process id names a live process of this namespace. Before: that lock was refused
    for ever ("being written by process 1"; delete it by hand). Now the writer holds an flock on its lock while it
    writes, which the kernel drops with its process: the lock is taken over and the store resumes bit for bit."""
    store = tmp_path / "run"
    proc = run_child(_SLOW_WRITER, store, prefix=_in_new_pid_namespace(), wait=False)
    try:
        wait_for_line(proc, "recording 1")
        assert json.loads((store / LOCK).read_bytes())["pid"] == 1
        with pytest.raises(TrajectoryError, match="is being written by process 1"):
            record(store, LONG, resume=True)
    finally:
        proc.kill()  # unshare's child, process 1 of its namespace, is killed with it (--kill-child)
        proc.wait(timeout=60)
    assert (store / LOCK).exists()
    _until_free(store / LOCK)
    assert resumes_to_the_end(store, ref) == 3


def _held_lock(store: Path, pid: int) -> subprocess.Popen:
    """A live process holding the store's writer lock, whose content then names ``pid`` (a process of another PID
    namespace, or a process id reused): the lock rewritten in place, its flock kept."""
    script = """
from explaind.trajectory.lock import WriterLock, LOCK
lock = WriterLock(store).acquire()
with open(os.path.join(store, LOCK), "r+b") as f:
    info = json.loads(f.read()); info["pid"] = int(mode); f.seek(0); f.truncate(); f.write(json.dumps(info).encode())
print("held", flush=True)
time.sleep(120)
"""
    proc = run_child("import json\n" + script, store, str(pid), wait=False)
    wait_for_line(proc, "held")
    return proc


def test_a_lock_held_by_a_process_of_another_pid_namespace_is_refused_not_taken_over(tmp_path, ref):
    """Two containers sharing the host's name (host networking) and the store's volume: the first records, its
    process id means nothing here (no such process). Before: the lock was taken for stale and a second writer
    started on the store. Now its flock is held, so it is refused, the message naming the other PID namespace."""
    store = tmp_path / "run"
    record(store, 3)
    before = snapshot(store)
    proc = _held_lock(store, 2**22 + 12345)  # past this machine's pid_max: no process of this namespace has it
    try:
        with pytest.raises(TrajectoryError, match=r"held \(flock\) by process 4206649 of another PID namespace"):
            record(store, LONG, resume=True)
        assert {k: v for k, v in snapshot(store).items() if k != LOCK} == \
            {k: v for k, v in before.items() if k != LOCK}
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert resumes_to_the_end(store, ref) == 3


def test_the_lock_of_a_killed_writer_whose_process_id_was_reused_is_taken_over(tmp_path, ref):
    """A writer killed, its process id then given to another live process (a container restarted, a busy host).
    Before: the lock named a live process and every resume was refused ("being written by process ..."). Now no
    process holds its flock: it is taken over, and the store resumes bit for bit."""
    store = tmp_path / "run"
    record(store, 3)
    proc = _held_lock(store, os.getppid())  # the process id of a live process that holds no lock
    proc.kill()
    proc.wait(timeout=60)
    assert (store / LOCK).exists()
    _until_free(store / LOCK)
    assert resumes_to_the_end(store, ref) == 3


@pytest.mark.parametrize("holder", ["dead", "alive"])
def test_a_lock_without_flock_from_an_older_explaind_is_judged_by_process_id_as_before(tmp_path, ref, holder):
    """A lock an older explaind wrote (no ``flock`` field): a process of this host that is gone is stale, a live one
    holds the store (the same before)."""
    store = tmp_path / "run"
    record(store, 3)
    pid = os.getppid() if holder == "alive" else 2**22 + 12345
    (store / LOCK).write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "since": "earlier"}))
    if holder == "alive":
        with pytest.raises(TrajectoryError, match=f"being written by process {pid} "):
            record(store, LONG, resume=True)
        (store / LOCK).unlink()
    assert resumes_to_the_end(store, ref) == 3


def test_the_writer_holds_an_flock_on_its_lock_while_it_records(tmp_path):
    """The lock a recorder takes says it is held by flock, and is: another open file description cannot take it
    while the recording runs, and can once it ended (the lock file removed)."""
    store = tmp_path / "run"
    seen = []

    def probe(st: Path, s: int) -> None:
        if s == 1:
            info = json.loads((st / LOCK).read_bytes())
            with open(st / LOCK, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    seen.append((info.get("flock"), "free"))
                except BlockingIOError:
                    seen.append((info.get("flock"), "held"))

    record(store, 3, after=probe)
    assert seen == [(True, "held")]
    assert not (store / LOCK).exists()
    shutil.rmtree(store)


_WORKER_OUTLIVES = """
rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, background_writes=False)
with rec:
    for s in range(3):
        resumable_step(model, opt, X, y, s, rec)
    worker = os.fork()
    if worker == 0:  # a worker forked inside `with rec:` (a DataLoader worker): it shares the lock's descriptor
        time.sleep(120)
        os._exit(0)
    print("worker", worker, flush=True)
    time.sleep(120)  # killed here
"""


def test_a_killed_writer_whose_forked_worker_lives_is_taken_over_at_once(tmp_path, ref):
    """The recording process killed while a worker it forked inside ``with rec:`` (a DataLoader worker) still runs:
    the worker closed its inherited descriptor of the lock when it was forked, so the flock went with the writer,
    and a resume takes the lock over at once and records bit for bit while the worker lives (the same before, by
    the writer's process id)."""
    store = tmp_path / "run"
    proc = run_child(_WORKER_OUTLIVES, store, wait=False)
    worker = None
    try:
        line = ""
        while not line.startswith("worker"):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
        worker = int(line.split()[1])
        proc.kill()
        proc.wait(timeout=60)
        assert resumes_to_the_end(store, ref) == 3
        os.kill(worker, 0)  # the worker still runs
    finally:
        if worker is not None:
            os.kill(worker, 9)
