"""Crash safety: a recording killed with SIGKILL keeps every completed step and resumes exactly."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from _recording_helpers import RESUME_STEPS, kill_after, mlp, resumable_reference, resumable_setup, resumable_step

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import Trajectory

HERE = Path(__file__).parent

CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import explaind
    from _recording_helpers import RESUME_STEPS, resumable_setup, resumable_step

    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store={store!r})
    with rec:
        for s in range(RESUME_STEPS):
            resumable_step(model, opt, X, y, s, rec)
            print(s, flush=True)
            time.sleep(0.02)
    print("finished", flush=True)
    """
)


def _assert_prefix_equal(ref, traj, n):
    for s in range(n + 1):
        for k, v in traj.params(s).items():
            assert torch.equal(v, ref.params(s)[k]), (s, k)
    for s in range(n):
        assert torch.equal(traj.batch(s)[0], ref.batch(s)[0])
        for k, u in traj.updates(s).items():
            assert torch.equal(torch.as_tensor(u.P), torch.as_tensor(ref.updates(s)[k].P)), (s, k)
        assert traj.grad_scale(s) == ref.grad_scale(s)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_trajectory(tmp_path):
    store = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(HERE), store=str(store)))
    seen = kill_after(script, 12)

    reference = resumable_reference()
    crashed = Trajectory.load(store, model=mlp(seed=1))
    n = crashed.n_steps
    # with background writes a crash loses at most the steps still queued (max_queue=4) plus the one in flight
    assert seen - 5 <= n < RESUME_STEPS and n >= 8
    assert not crashed.manifest.complete
    crashed.verify()
    _assert_prefix_equal(reference, crashed, n)

    model, opt, X, y = resumable_setup()
    with pytest.raises(TrajectoryError, match=r"already stored .*resume=True to continue it"):
        explaind.TrajectoryRecorder(model, opt, loss="mse", store=store)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, resume=True)
    with pytest.raises(TrajectoryError, match=rf"Resuming .* at step {n}.*Call rec\.restore\(\) before `with rec:`"):
        with rec:
            pass
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, resume=True)
    assert rec.restore() == n
    with rec:
        for s in range(n, RESUME_STEPS):
            resumable_step(model, opt, X, y, s, rec)
    traj = Trajectory.load(store, model=mlp(seed=1))
    assert traj.n_steps == RESUME_STEPS and traj.manifest.complete
    _assert_prefix_equal(reference, traj, RESUME_STEPS)
    assert traj.audit().max() < 1e-12  # the audit's momentum was restored too
    traj.verify()


def test_resume_after_a_clean_end_appends(tmp_path):
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=tmp_path / "run")
    with rec:
        for s in range(5):
            resumable_step(model, opt, X, y, s, rec)
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=tmp_path / "run", resume=True)
    assert rec.restore() == 5
    with rec:
        for s in range(5, 8):
            resumable_step(model, opt, X, y, s, rec)
    ref = resumable_reference()
    traj = rec.trajectory
    assert traj.n_steps == 8
    _assert_prefix_equal(ref, traj, 8)


def test_resume_refuses_a_different_setup(tmp_path):
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=tmp_path / "run")
    with rec:
        resumable_step(model, opt, X, y, 0, rec)
    model, _, X, y = resumable_setup()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrajectoryError, match=r"recorded with adapter 'adam', this recorder uses 'sgd'"):
        explaind.TrajectoryRecorder(model, sgd, loss="mse", store=tmp_path / "run", resume=True)
    other = mlp(hidden=4)
    with pytest.raises(TrajectoryError, match=r"0\.weight: recorded shape \(5, 3\), model has \(4, 3\)"):
        explaind.TrajectoryRecorder(other, torch.optim.Adam(other.parameters()), loss="mse", store=tmp_path / "run",
                                    resume=True)
    with pytest.raises(TrajectoryError, match="resume=True but no trajectory is stored"):
        explaind.TrajectoryRecorder(model, sgd, loss="mse", store=tmp_path / "new", resume=True)


def test_torn_journal_line_is_ignored_and_a_corrupt_middle_line_is_reported(tmp_path):
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=tmp_path / "run")
    with rec:
        for s in range(3):
            resumable_step(model, opt, X, y, s, rec)
        assert rec.trajectory.n_steps == 3  # flushes the writer
        # simulate a crash: the manifest still lists no steps, the journal has three
        manifest = tmp_path / "run" / "manifest.json"
        journal = tmp_path / "run" / "journal.jsonl"
        snapshot = manifest.read_text()
    manifest.write_text(snapshot)
    lines = journal.read_bytes()
    journal.write_bytes(lines + b'{"step": 3, "n_sam')
    traj = Trajectory.load(tmp_path / "run", model=mlp(seed=1))
    assert traj.n_steps == 3 and not traj.manifest.complete
    traj.verify()
    broken = lines.split(b"\n")
    broken[1] = broken[1][:20]
    journal.write_bytes(b"\n".join(broken))
    with pytest.raises(TrajectoryError, match=r"journal\.jsonl' is corrupted at line 2"):
        Trajectory.load(tmp_path / "run", model=mlp(seed=1))


def test_state_every_k_steps_resumes_from_the_last_stored_state(tmp_path):
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=tmp_path / "run",
                                      save_optimizer_state=3)
    with rec:
        for s in range(7):
            resumable_step(model, opt, X, y, s, rec)
    stored = Trajectory.load(tmp_path / "run", model=mlp(seed=1)).manifest.steps
    # states are due after steps 2 and 5; a group commit keeps only the newest of a group
    with_state = [s for s, r in enumerate(stored) if r.optimizer_state is not None]
    assert with_state in ([2, 5], [5])
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=tmp_path / "run", resume=True,
                                      save_optimizer_state=3)
    assert rec.restore() == 6  # step 6 had no stored state: recorded again
    with rec:
        for s in range(6, 9):
            resumable_step(model, opt, X, y, s, rec)
    traj = Trajectory.load(tmp_path / "run", model=mlp(seed=1))
    assert traj.n_steps == 9
    _assert_prefix_equal(resumable_reference(), traj, 9)
    with pytest.raises(Exception, match=r"save_optimizer_state=0 is not allowed"):
        explaind.TrajectoryRecorder(model, torch.optim.Adam(model.parameters()), loss="mse", store=tmp_path / "x",
                                    save_optimizer_state=0)
