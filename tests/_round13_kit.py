"""Shared kit of the round-13 store tests (processes, permissions and versions): child processes that record, fork,
hold the writer lock in another PID namespace or read a store as another user.

A store read as the same run equals, after ``verify()``, the uninterrupted run recorded in memory bit for bit
(``_round12_kit.same_run``, against :func:`_recording_helpers.resumable_reference`); resumed, the longer run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _round12_kit import load

HERE = Path(__file__).parent
PYTHONPATH = os.pathsep.join([str(HERE.parent), str(HERE.parent / "plugins"), str(HERE)])

#: The head of every child script: the recording of the kill/resume run, ``store`` and ``mode`` from argv.
HEAD = """
import os, signal, sys, time
from _recording_helpers import resumable_setup, resumable_step
import explaind
from explaind.exceptions import TrajectoryError
store, mode = sys.argv[1], sys.argv[2]
model, opt, X, y = resumable_setup()
"""


def run_child(script: str, store: Path, mode: str = "", *, prefix: tuple[str, ...] = (), timeout: float = 120,
              wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run ``HEAD + script`` in a new Python (after ``prefix``, e.g. ``unshare ...``); its completed process, or the
    running one when ``wait`` is false (stdout a pipe of text lines)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=PYTHONPATH)
    argv = [*prefix, sys.executable, "-c", HEAD + script, str(store), mode]
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    """Read ``proc``'s stdout until a line equal to ``text``."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.strip() == text:
            return
    raise AssertionError(f"the child never printed {text!r}: {proc.stderr.read() if proc.poll() is not None else ''}")


def steps_seen(store: str) -> int:
    """A reader in another process (a multiprocessing worker): the steps the store holds for it, verified."""
    traj = load(Path(store))
    traj.verify()
    return traj.n_steps
