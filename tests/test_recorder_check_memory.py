"""The gradient check's memory with a dense store: what the recorder holds while the check runs.

Before a checked step's forward and backward the recorder lets the writer finish, drops its idle
copy buffers and lets go of its copy of theta_s (the live parameters hold the same values), and
copies theta_s again after the check. These tests watch what is alive inside the check (and that
nothing else, the writer's thread included, still refers to theta_s), and compare the stored
trajectory of a run checked at every step with the loop's own clones (taken here, in the loop)
and with the same run unchecked, bit for bit.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import _checks

LR, MU, STEPS, N = 0.1, 0.9, 6, 48


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MU)
    X = torch.randn(N, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    return model, opt, X, y


def _batch(s):
    return torch.arange(6 * s, 6 * s + 6) % N


def _record(path, check, *, audit=True, logged=None):
    """Record ``STEPS`` steps into a dense store; returns the recorder, ``theta_0 .. theta_N`` cloned in the loop.

    ``logged(s, idx)`` gives the indices logged at step ``s`` (default ``idx``); a step whose check
    raises is run again with the right indices, as a loop that catches the error would.
    """
    model, opt, X, y = _setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=path, fsync=False,
                                      check_gradients=check, audit=audit)
    thetas, errors = [], []
    with rec:
        for s in range(STEPS):
            thetas.append({n: p.detach().clone() for n, p in model.named_parameters()})
            idx = _batch(s)
            for attempt in (logged, None):
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                rec.log_batch(idx if attempt is None else attempt(s, idx))
                try:
                    opt.step()
                    break
                except TrajectoryError as exc:
                    errors.append((s, exc, {n: t.clone() for n, t in (rec._theta or {}).items()}))
        thetas.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return rec, thetas, errors


def _watch(monkeypatch, rec_box):
    """Record, at the start of each gradient check, what the recorder in ``rec_box[0]`` holds.

    ``alive``: how many of the tensors of the recorder's copy of theta_s, as it was when the step
    began, still exist anywhere (the writer's thread and the recorder's own frames included).
    """
    seen, real, before = [], _checks.streamed_products, []
    real_prepare = explaind.TrajectoryRecorder._prepare_step

    def prepare(self, optimizer, s):
        before[:] = [weakref.ref(t) for t in (self._theta or {}).values()]
        return real_prepare(self, optimizer, s)

    def watched(*args, **kwargs):
        rec = rec_box[0]
        gc.collect()
        seen.append({"theta": rec._theta, "alive": sum(r() is not None for r in before),
                     "queued": rec._writer._budget.steps, "idle": sum(len(b) for b in rec._pool._free.values()),
                     "snapshots": len(rec._tap._raw)})
        return real(*args, **kwargs)

    monkeypatch.setattr(explaind.TrajectoryRecorder, "_prepare_step", prepare)
    monkeypatch.setattr(_checks, "streamed_products", watched)
    return seen


@pytest.mark.parametrize("audit", [True, False])
def test_inside_the_check_the_recorder_holds_no_theta_copy_no_queued_step_and_no_idle_buffer(tmp_path, monkeypatch,
                                                                                             audit):
    box = [None]
    real_init = explaind.TrajectoryRecorder.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        box[0] = self

    monkeypatch.setattr(explaind.TrajectoryRecorder, "__init__", init)
    seen = _watch(monkeypatch, box)
    _record(tmp_path / "run", True, audit=audit)
    assert len(seen) == STEPS
    for s, held in enumerate(seen):
        assert held == {"theta": None, "alive": 0, "queued": 0, "idle": 0, "snapshots": 0}, s


@pytest.mark.parametrize("audit", [True, False])
def test_a_run_checked_at_every_step_stores_the_loops_theta_and_the_unchecked_runs_audit(tmp_path, audit):
    checked, thetas, _ = _record(tmp_path / "checked", True, audit=audit)
    plain, plain_thetas, _ = _record(tmp_path / "plain", False, audit=audit)
    a, b = checked.trajectory, plain.trajectory
    for s in range(STEPS + 1):  # the copy made again after each check holds theta_s exactly
        assert all(torch.equal(t, thetas[s][n]) and torch.equal(t, plain_thetas[s][n]) for n, t in a.params(s).items())
    assert torch.isfinite(torch.as_tensor(a.gradient_check())).all() and a.gradient_check().max() < 1e-12
    if audit:  # the audit of each step read the new copy of theta_s: the same values, bit for bit
        assert a.audit().tolist() == b.audit().tolist() and a.audit().max() < 1e-13


def test_a_check_that_fails_leaves_a_copy_of_theta_and_the_run_goes_on(tmp_path):
    def wrong_at_two(s, idx):  # step 2 logs other samples than the loop trained on
        return (idx + 1) % N if s == 2 else idx

    rec, thetas, errors = _record(tmp_path / "run", True, logged=wrong_at_two)
    assert [s for s, _, _ in errors] == [2]
    _, exc, theta = errors[0]
    assert "Step 2: the gradient from backward() does not match" in str(exc)
    # after the failed check the recorder again holds theta_2, a copy (not the live parameters' memory)
    assert theta.keys() == thetas[2].keys() and all(torch.equal(t, thetas[2][n]) for n, t in theta.items())
    traj = rec.trajectory
    assert traj.n_steps == STEPS
    for s in range(STEPS + 1):
        assert all(torch.equal(t, thetas[s][n]) for n, t in traj.params(s).items()), s
    assert traj.audit().max() < 1e-13 and traj.gradient_check().max() < 1e-12

