"""A recording that SIGKILLs itself at a chosen point (tests/test_store_kill_points.py runs it in a subprocess).

Usage: ``python _kill_child.py STORE EVERY STEPS POINT K``

Records steps ``0..STEPS-1`` of the run of ``resumable_setup`` into the store at STORE with
``checkpoint_every=EVERY``; when STORE exists (left by an earlier kill, or a schema-1 store) it is
opened with ``resume=True`` and the recording goes on from where the store ends.
* ``POINT``: where the process kills itself, at the ``K``-th time it gets there:

  - ``write``: inside a tensor file's ``os.write`` on the store's file-I/O thread, after half of the
    chunk is written (a torn write);
  - ``writeto:<name>``: the same, counting only writes into a file whose store-relative path starts with
    ``<name>`` (``optimizer/checkpoint-``: a sparse store's checkpoint state written in the background);
  - ``restored``: right after ``rec.restore()`` of a resumed recording returns (its writer lock held, nothing
    of the resume written yet);
  - ``journal``: inside the append of a group of committed steps to ``journal.jsonl``, after half
    of its bytes reached the file (a torn journal line);
  - ``copy``: inside the optimizer-state copier thread, after half of the state's tensors are copied;
  - ``before:<name>`` / ``after:<name>``: just before or after ``os.replace`` moves a file whose
    store-relative path starts with ``<name>`` into place (``manifest.json``, ``journal.jsonl``,
    ``steps/``, ``optimizer/state-``, ``optimizer/checkpoint-``).

Before dying it prints ``kept <n>``: the steps the store holds at that moment for a reader (those
listed by its manifest and journal; for a sparse store, up to its last checkpoint), or ``kept -1``
when there is no store yet. After each step whose ``optimizer.step()`` returned it prints
``returned <s>``. A run that ends without reaching its kill point prints ``finished <arrivals at it>``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _recording_helpers import resumable_setup, resumable_step  # noqa: E402

import explaind  # noqa: E402
from explaind.exceptions import ExplaindError  # noqa: E402
from explaind.trajectory import _background, _filewrite  # noqa: E402
from explaind.trajectory import store as store_module  # noqa: E402
from explaind.trajectory.store import read_manifest  # noqa: E402

_lock = threading.Lock()
_seen = [0]  # arrivals at the kill point so far


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # unbuffered: what was said survives the kill


def _die(store: Path) -> None:
    with _lock:  # one thread reports and dies; any other one waits here until the kill
        try:
            manifest = read_manifest(store)
            steps = manifest.steps
            kept = max((r.step + 1 for r in steps if r.has_params), default=0) if manifest.param_stride > 1 \
                else len(steps)
        except ExplaindError:
            kept = -1
        _say(f"kept {kept}")
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)


def _arm(store: Path, point: str, k: int) -> None:
    """Install the kill at the ``k``-th arrival at ``point``."""
    def arrived() -> bool:
        with _lock:
            _seen[0] += 1
            return _seen[0] == k

    if point == "write":
        real_write_all = _filewrite._write_all

        def write_all(fd, data):
            if arrived():
                os.write(fd, data[: len(data) // 2])
                _die(store)
            return real_write_all(fd, data)

        _filewrite._write_all = write_all
    elif point.startswith("writeto:"):
        real_write_all, name = _filewrite._write_all, point.partition(":")[2]

        def write_all(fd, data):
            target = os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), os.path.realpath(store))
            if target.startswith(name) and arrived():
                os.write(fd, data[: len(data) // 2])
                _die(store)
            return real_write_all(fd, data)

        _filewrite._write_all = write_all
    elif point == "restored":
        pass  # main() kills after restore()
    elif point == "journal":
        class Journal:
            def __init__(self, raw):
                self._raw = raw

            def write(self, data):
                if arrived():
                    self._raw.write(data[: len(data) // 2])
                    self._raw.flush()
                    _die(store)
                return self._raw.write(data)

            def __getattr__(self, name):
                return getattr(self._raw, name)

        store_module.open = lambda path, mode="r", *a, **kw: Journal(open(path, mode, *a, **kw))
    elif point == "copy":
        real_submit = _background.StateCopier.submit

        class Torn(list):
            def __iter__(self):
                items = list.__iter__(self)
                for i, pair in enumerate(items):
                    if i == len(self) // 2:
                        _die(store)
                    yield pair

        def submit(self, pairs):
            return real_submit(self, Torn(pairs) if arrived() else pairs)

        _background.StateCopier.submit = submit
    elif point.startswith(("before:", "after:")):
        when, _, name = point.partition(":")
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            mine = os.path.relpath(dst, store).startswith(name) and arrived()
            if mine and when == "before":
                _die(store)
            real_replace(src, dst, *args, **kwargs)
            if mine:
                _die(store)

        os.replace = replace
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def main(store: Path, every: int, steps: int, point: str, k: int) -> None:
    model, opt, X, y = resumable_setup()
    resume = store.exists()
    _arm(store, point, k)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, resume=resume,
                                      checkpoint_every=every)
    start = rec.restore() if resume else 0
    if point == "restored" and resume:
        _die(store)
    with rec:
        for s in range(start, steps):
            resumable_step(model, opt, X, y, s, rec)
            _say(f"returned {s}")
    _say(f"finished {_seen[0]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
