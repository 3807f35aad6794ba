"""A disk that fills up while a recording runs: a step file's write, the journal's append (torn half-way) or the
final manifest fails with ENOSPC. The loop gets a TrajectoryError naming the store and the system's
error; every step committed before stays readable and verifies, and the store, resumed once there is
room again, is bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import errno
import os

import pytest
from _kill_chain import resume_to_the_end
from _recording_helpers import resumable_reference, resumable_setup, resumable_step
from test_store_faults import _assert_same

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import _filewrite
from explaind.trajectory import store as store_module

STEPS = 6
#: the write operation of its kind that finds the disk full: the set-up writes three files; then a step
#: writes its file and the optimizer state, and appends its journal line
FAIL_AT = {"file": 8, "journal": 3}


@pytest.fixture(scope="module")
def reference():
    return resumable_reference(STEPS)


def _full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _countdown(kind: str) -> callable:
    left = [FAIL_AT[kind]]

    def due() -> bool:
        left[0] -= 1
        return left[0] == 0
    return due


def _fill_step_files(monkeypatch):
    due, real = _countdown("file"), _filewrite._write_all

    def write_all(fd, data):
        if due():
            _full()
        return real(fd, data)
    monkeypatch.setattr(_filewrite, "_write_all", write_all)


class _TornJournal:
    def __init__(self, raw, due):
        self._raw, self._due = raw, due

    def write(self, data):
        if self._due():
            self._raw.write(data[: len(data) // 2])
            self._raw.flush()
            _full()
        return self._raw.write(data)

    def __getattr__(self, name):
        return getattr(self._raw, name)


def _fill_journal(monkeypatch):
    due = _countdown("journal")
    monkeypatch.setattr(store_module, "open", lambda path, mode="r", *a, **kw: _TornJournal(open(path, mode, *a, **kw),
                                                                                            due), raising=False)


def _fill_final_manifest(monkeypatch):
    real, written = store_module.write_bytes, [0]

    def write_bytes(root, relpath, data, **kwargs):
        if relpath == "manifest.json":
            written[0] += 1
            if written[0] == 2:  # the first is the new store's; the second, at close, the final one
                _full()
        return real(root, relpath, data, **kwargs)
    monkeypatch.setattr(store_module, "write_bytes", write_bytes)


FILLS = {"a step file": _fill_step_files, "the journal (torn)": _fill_journal,
         "the final manifest": _fill_final_manifest}


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
@pytest.mark.parametrize("where", list(FILLS))
def test_a_full_disk_mid_run_is_an_explaind_error_loses_no_committed_step_and_resumes_exactly(tmp_path, monkeypatch,
                                                                                             reference, where,
                                                                                             background):
    store = tmp_path / "run"
    model, opt, X, y = resumable_setup()
    with monkeypatch.context() as m:
        FILLS[where](m)
        with pytest.raises(TrajectoryError, match=r"trajectory store '.*run' failed: OSError: \[Errno 28\] No space "
                                                  r"left on device"):
            with explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store,
                                             background_writes=background) as rec:
                for s in range(STEPS):
                    resumable_step(model, opt, X, y, s, rec)
    traj = explaind.Trajectory.load(store, model=resumable_setup()[0])
    assert traj.n_steps >= (STEPS if where == "the final manifest" else 1)
    assert not traj.manifest.complete
    traj.verify()
    _assert_same(reference, traj)
    resume_to_the_end(store, reference, STEPS)
