"""A group of the store's files flushed together (explaind/trajectory/_filewrite.py, ``settle``; store.py ``_commit``).

The writer leaves the files of the steps it commits together under their temporary names, flushes
them all at once (one ``fsync`` per file, each on a thread of its own), then renames them, flushes
the directories and only then appends the journal line. These tests check that the flushes really
run at the same time, that nothing is renamed before every file of the group is flushed, that the
journal line comes after the directories, and that a failure leaves no temporary file behind.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch
from _recording_helpers import mlp, regression_data
from safetensors.torch import load as st_load

import explaind
from explaind.trajectory import Trajectory
from explaind.trajectory._filewrite import TensorFileWriter
from explaind.trajectory._layout import ATTRIBUTES, JOURNAL, TEMP_FILE
from explaind.trajectory.store import StoreWriter


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"param.w": torch.randn(300, 7, generator=g), "update.scalars": torch.randn(2, 7, generator=g,
                                                                                    dtype=torch.float64)}


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if TEMP_FILE.fullmatch(p.name))


def _fd_path(fd: int) -> str:
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


def _run(store, steps, stall=None, before_step=None, **options):
    """Record ``steps`` SGD-momentum steps of a small MLP into ``store``; ``stall.set()`` after the last step."""
    X, y = regression_data(n=16)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, check_gradients=False,
                                      **options)
    with rec:
        for s in range(steps):
            idx = torch.arange(4 * s, 4 * s + 4) % 16
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            if before_step is not None:
                before_step(s)
            opt.step()
        if stall is not None:
            stall.set()


linux = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc/self/fd")


@pytest.mark.parametrize("direct", [True, False])
def test_staged_files_are_flushed_at_the_same_time_then_renamed(tmp_path, monkeypatch, direct):
    n = 3
    barrier = threading.Barrier(n, timeout=20)  # broken (an error) unless all n flushes wait here together
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        barrier.wait()
        events.append("fsync")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    writer = TensorFileWriter(direct=direct)
    staged: list = []
    records = [writer.write(tmp_path, f"steps/{s:06d}.safetensors", _tensors(s), {"step": str(s)}, staged=staged)
               for s in range(n)]
    assert [p.name for p in (tmp_path / "steps").iterdir() if not TEMP_FILE.fullmatch(p.name)] == []  # not in place
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    writer.settle(staged)
    writer.close()
    assert events == ["fsync"] * n + ["replace"] * n
    assert _leftovers(tmp_path) == []
    for s, record in enumerate(records):
        data = (tmp_path / record.path).read_bytes()
        assert record.nbytes == len(data)
        got = st_load(data)
        for k, v in _tensors(s).items():
            assert torch.equal(got[k], v)


def test_a_failed_flush_leaves_no_file_and_no_temporary_file(tmp_path, monkeypatch):
    writer = TensorFileWriter()
    staged: list = []
    for s in range(3):
        writer.write(tmp_path, f"steps/{s:06d}.safetensors", _tensors(s), staged=staged)
    bad = staged[1].fd
    real_fsync = os.fsync

    def fsync(fd):
        if fd == bad:
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="injected"):
        writer.settle(staged)
    writer.close()
    assert list((tmp_path / "steps").iterdir()) == []
    for f in staged:  # every descriptor was closed
        with pytest.raises(OSError):
            os.fstat(f.fd)


def test_discarded_files_are_removed(tmp_path):
    writer = TensorFileWriter()
    staged: list = []
    writer.write(tmp_path, "a.safetensors", _tensors(0), staged=staged)
    assert len(_leftovers(tmp_path)) == 1
    writer.discard(staged)
    writer.close()
    assert list(tmp_path.iterdir()) == []


@linux
def test_a_group_of_steps_is_flushed_then_renamed_then_journaled(tmp_path, monkeypatch):
    """Steps queued behind a stalled write are committed as one group, in the order a power loss needs."""
    gate, started = threading.Event(), threading.Event()
    real_write = TensorFileWriter.write

    def stalled(self, root, relpath, *args, **kwargs):
        if relpath == "steps/000000.safetensors":
            started.set()
            gate.wait(60)
        return real_write(self, root, relpath, *args, **kwargs)

    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        with lock:
            events.append(("fsync", _fd_path(fd)))
        return real_fsync(fd)

    def replace(src, dst):
        with lock:
            events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    def watch(s):
        if s == 1:
            assert started.wait(60)
            monkeypatch.setattr(os, "fsync", fsync)
            monkeypatch.setattr(os, "replace", replace)

    monkeypatch.setattr(TensorFileWriter, "write", stalled)
    steps = 4
    _run(tmp_path / "run", steps, stall=gate, before_step=watch, audit=False)
    monkeypatch.undo()
    traj = Trajectory.load(tmp_path / "run", model=mlp())
    assert traj.n_steps == steps
    traj.verify()
    journal = [i for i, (k, name) in enumerate(events) if k == "fsync" and name == JOURNAL]
    assert len(journal) >= 2
    # the second group, between the journal lines of step 0 and of steps 1..3: every step file and one state
    # (attributes.json, which the loop's thread writes when the recording ends, may fall in that window while the
    # stalled writer commits the group: it is no file of the group)
    kinds = [(k, name.split(".tmp-")[0]) for k, name in events[journal[0] + 1 : journal[1] + 1]
             if name.split(".tmp-")[0] != ATTRIBUTES]
    renamed = [name for k, name in kinds if k == "replace"]
    assert sorted(renamed) == ["000001.safetensors", "000002.safetensors", "000003.safetensors",
                               "state-0.safetensors"]
    first_replace = min(i for i, (k, _) in enumerate(kinds) if k == "replace")
    last_replace = max(i for i, (k, _) in enumerate(kinds) if k == "replace")
    assert {name for k, name in kinds[:first_replace] if k == "fsync"} == set(renamed)  # all flushed, then renamed
    dirs = [i for i, (k, name) in enumerate(kinds) if k == "fsync" and name in ("steps", "optimizer")]
    assert len(dirs) == 2 and min(dirs) > last_replace  # the directories after the renames
    assert kinds[-1] == ("fsync", JOURNAL) and max(dirs) < len(kinds) - 1  # the journal line last


def _queue_of(n):
    def patch(init):
        def wrapped(self, *args, **kwargs):
            kwargs["max_queue"] = n  # room for every step behind the stalled one
            return init(self, *args, **kwargs)
        return wrapped
    return patch




def test_a_group_with_two_files_for_one_slot_writes_the_newer_one(tmp_path, monkeypatch):
    """A sparse store's audit momentum alternates between two slots; a group holding three such checkpoints
    writes one slot twice: the older file is moved into place first, then replaced (as one file at a time)."""
    steps = 10  # checkpoint_every=2 and the state at every 4th step: states at steps 3, 7 and the last, 9
    _run(tmp_path / "plain", steps, checkpoint_every=2)
    gate, started = threading.Event(), threading.Event()
    real_write = TensorFileWriter.write
    slots: list[str] = []

    def stalled(self, root, relpath, *args, **kwargs):
        if relpath == "steps/000000.safetensors":
            started.set()
            gate.wait(60)
        if relpath.startswith("optimizer/state-"):
            slots.append(relpath)
        return real_write(self, root, relpath, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "__init__", _queue_of(steps + 2)(StoreWriter.__init__))
    monkeypatch.setattr(TensorFileWriter, "write", stalled)
    _run(tmp_path / "grouped", steps, stall=gate, checkpoint_every=2)
    monkeypatch.undo()
    assert started.is_set()
    assert len(slots) == 3 and slots[0] == slots[2] != slots[1]  # one slot written twice in the group
    grouped, plain = (Trajectory.load(tmp_path / name, model=mlp()) for name in ("grouped", "plain"))
    grouped.verify()
    assert grouped.n_steps == plain.n_steps == steps
    for s in (3, 7, 9):
        for name, value in plain.params(s + 1).items():
            assert torch.equal(grouped.params(s + 1)[name], value)
    newest = (tmp_path / "grouped" / slots[2]).read_bytes()
    assert newest == (tmp_path / "plain" / slots[2]).read_bytes()  # the newer momentum, as written one by one
