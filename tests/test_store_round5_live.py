"""Stores attacked while they are written, round 5: a reader verifying a store beside its live recorder, SIGKILLs
at random moments, a full disk inside a group commit, a moved store and the command line on broken runs.

Every kept step and every resumed run equals the uninterrupted run bit for bit; a reader never reports a
healthy store as corrupted; a broken run is one line and exit code 2. The strangers' files of round 5 are
tests/test_store_round5.py; docs/recording.md, "The store", lists the checks.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import batches, regression_data
from test_store_round5 import _read_all, _repeat_key, _same
from test_store_strangers import STEPS, _model, _record

import explaind
from explaind.cli import main
from explaind.exceptions import TrajectoryError


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("round5_live") / "dense"
    _record(root, STEPS)
    return root


# --------------------------------------------------------------------------- readers beside a live recorder
def test_verify_while_the_recorder_replaces_the_state_slots_is_not_reported_as_corruption(tmp_path):
    X, y = regression_data(n=12)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=tmp_path / "live",
                                      background_writes=False)
    order = batches(12, 4) * 3
    with rec:
        for s in range(8):
            if s == 3:
                reader = explaind.Trajectory.load(tmp_path / "live", model=_model())  # knows steps 0..2
                first = [t.clone() for k in range(4) for t in reader.params(k).values()]
            if s == 5:  # steps 3 and 4 committed: step 2's state slot now holds step 4's state
                reader.verify()
            opt.zero_grad()
            F.mse_loss(model(X[order[s]]), y[order[s]]).backward()
            rec.log_batch(order[s])
            opt.step()
        later = explaind.Trajectory.load(tmp_path / "live", model=_model())
        slot = later.manifest.steps[-1].optimizer_state.path  # step 7's
        (tmp_path / "live" / slot).write_bytes(b"\0" * 64)
        with pytest.raises(TrajectoryError, match=rf"{slot}' \(step 7\) is truncated or was modified"):
            later.verify()  # a live recorder, but no step committed since: the damage is reported
    assert reader.n_steps == 3
    assert _same(first, [t for k in range(4) for t in explaind.Trajectory.load(tmp_path / "live", model=_model())
                        .params(k).values()])


# --------------------------------------------------------------------------- moved stores and the command line
def test_a_store_moved_to_a_path_with_spaces_and_unicode_reads_through_a_relative_path(template, tmp_path,
                                                                                       monkeypatch):
    moved = tmp_path / "a dir ü" / "run 1"
    moved.parent.mkdir()
    shutil.copytree(template, tmp_path / "copy")
    (tmp_path / "copy").rename(moved)
    monkeypatch.chdir(moved.parent)
    assert _same(_read_all(Path("run 1")), _read_all(template))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "-q", "--steps", "3", "--batch-size", "40", "--eval-every", "3", "--dtype", "float64",
                 "--model", "hidden_sizes=[6]", "--data", "classes=[0,1,2]", "--out", str(folder)]) == 0
    return folder


@pytest.mark.parametrize(("damage", "fragment"), [
    (lambda t: (t / "manifest.json").write_bytes(_repeat_key((t / "manifest.json").read_bytes())),
     "the key 'loss' appears twice in one object"),
    (lambda t: ((t / "steps" / "000001.safetensors").unlink(), os.mkfifo(t / "steps" / "000001.safetensors")),
     "'steps/000001.safetensors' of the store"),
], ids=["a key given twice", "a step file that is a FIFO"])
def test_cli_commands_on_a_broken_run_exit_2_with_one_line_naming_the_problem(cli_run, tmp_path, capsys, damage,
                                                                              fragment):
    run = Path(shutil.copytree(cli_run, tmp_path / "run"))
    damage(run / "trajectory")
    for argv in (["replicate", str(run), "--n-test", "4", "-q"],
                 ["influence", str(run), "--n-test", "4", "-q", "--out", str(tmp_path / "scores")]):
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (argv[0], err)
        assert fragment in lines[0], (argv[0], lines[0])


# --------------------------------------------------------------------------- SIGKILL at random moments
def _crash_trials():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_store_crash_trials.py"
    spec = importlib.util.spec_from_file_location("bench_store_crash_trials", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_recordings_killed_at_random_moments_keep_their_steps_and_resume_bit_for_bit(tmp_path):
    """The small variant of benchmarks/bench_store_crash_trials.py: three SIGKILLs at delays drawn from a fixed seed."""
    duration, results = _crash_trials().run_trials(tmp_path, trials=3, steps=6, seed=5)
    assert duration > 0 and len(results) == 3
    for r in results:
        assert r.kept_equal and r.resumed_equal, r


# --------------------------------------------------------------------------- a full disk inside a group commit
def test_a_full_disk_while_a_group_of_steps_is_flushed_keeps_the_steps_before_it_and_resumes_exactly(tmp_path,
                                                                                                    monkeypatch):
    """The writer falls behind (held until 3 steps wait), so steps 1-3 (or 1-4) are committed as one group, whose flush
    finds the disk full: the loop gets the error, step 0 stays, no file of the group is left, and the resumed
    store equals the uninterrupted run bit for bit."""
    from _kill_chain import resume_to_the_end
    from _recording_helpers import resumable_reference, resumable_setup, resumable_step
    from test_store_faults import _assert_same

    from explaind.trajectory import _filewrite
    from explaind.trajectory import store as store_module

    steps, store = 6, tmp_path / "run"
    reference = resumable_reference(steps)
    commit, flush = store_module.StoreWriter._commit_queued, _filewrite.TensorFileWriter._fsync_all
    groups: list[int] = []  # files flushed together, per flush
    calls = [0]

    def held(self, q):
        calls[0] += 1
        if calls[0] == 2:  # step 0 committed alone: wait until steps 1-3 are queued, then take them as one group
            for _ in range(2000):
                if q.qsize() >= 3:
                    break
                threading.Event().wait(0.005)
        return commit(self, q)

    def full(self, fds):
        groups.append(len(fds))
        if len(fds) >= 4:  # the group: three (or four) step files and the newest optimizer state
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return flush(self, fds)

    model, opt, X, y = resumable_setup()
    with monkeypatch.context() as m:
        m.setattr(store_module.StoreWriter, "_commit_queued", held)
        m.setattr(_filewrite.TensorFileWriter, "_fsync_all", full)
        with pytest.raises(TrajectoryError, match=r"store '.*run' failed: OSError: \[Errno 28\] No space left"):
            with explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store) as rec:
                for s in range(steps):
                    resumable_step(model, opt, X, y, s, rec)
    assert groups[-2] == 2 and groups[-1] >= 4, groups  # step 0 (its file and state), then the group
    traj = explaind.Trajectory.load(store, model=resumable_setup()[0])
    assert traj.n_steps == 1 and not traj.manifest.complete
    traj.verify()
    _assert_same(reference, traj)
    assert not (store / "steps" / "000001.safetensors").exists()
    resume_to_the_end(store, reference, steps)
