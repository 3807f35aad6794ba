"""The store's writer queue bounded by bytes as well as by steps, without losing a step handed over.

The disk is stalled at step 0's file (``TensorFileWriter.write`` waits on an event); the loop runs in a
thread and counts the ``optimizer.step()`` calls that returned. The steps handed over are then
compared with the parameters the loop itself cloned after every step.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.trajectory import Trajectory, store
from explaind.trajectory._background import QueueBudget
from explaind.trajectory._recorder_store import RecorderStoreMixin

STEPS = 7


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _record(path, returned: list[int], seen: list[dict[str, torch.Tensor]], **kwargs) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(32, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=path, fsync=False,
                                      check_gradients=False, **kwargs)
    seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
    with rec:
        for s in range(STEPS):
            idx = torch.arange(4 * s, 4 * s + 4) % 32
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
            returned[0] += 1


def _step_bytes(tmp_path, monkeypatch) -> int:
    """The bytes one step of this run counts against the budget (measured on an unstalled run)."""
    sizes, real = [], QueueBudget.acquire

    def spy(self, nbytes):
        sizes.append(nbytes)
        return real(self, nbytes)

    monkeypatch.setattr(QueueBudget, "acquire", spy)
    _record(tmp_path / "measure", [0], [])
    monkeypatch.setattr(QueueBudget, "acquire", real)
    assert len(sizes) == STEPS and len(set(sizes)) == 1
    return sizes[0]


def _stalled_run(tmp_path, monkeypatch, budget):
    """Steps returned and parameter copies made while step 0's file is stuck; then the stored trajectory."""
    monkeypatch.setattr(store, "MAX_QUEUE_BYTES", budget)
    real_write, gate = store.TensorFileWriter.write, threading.Event()
    copies, real_copy = [0], RecorderStoreMixin._copy_params

    def stuck(self, root, relpath, *args, **kwargs):
        if relpath == "steps/000000.safetensors":
            gate.wait(60)
        return real_write(self, root, relpath, *args, **kwargs)

    def counted(self):
        copies[0] += 1
        return real_copy(self)

    monkeypatch.setattr(store.TensorFileWriter, "write", stuck)
    monkeypatch.setattr(RecorderStoreMixin, "_copy_params", counted)
    returned, seen = [0], []
    loop = threading.Thread(target=_record, args=(tmp_path / "run", returned, seen))
    loop.start()
    deadline = time.monotonic() + 30
    last = -1
    while time.monotonic() < deadline:  # until the loop stops moving
        time.sleep(0.3)
        if returned[0] == last:
            break
        last = returned[0]
    during = (returned[0], copies[0])
    gate.set()
    loop.join(60)
    assert not loop.is_alive()
    return during, Trajectory.load(tmp_path / "run", model=_model()), seen


@pytest.mark.parametrize(("budget_steps", "queued"), [(None, 4), (0.5, 1), (1.0, 1), (2.5, 2)])
def test_the_queue_holds_at_most_the_bytes_allowed_and_keeps_every_step_handed_over(tmp_path, monkeypatch,
                                                                                   budget_steps, queued):
    nbytes = _step_bytes(tmp_path, monkeypatch)
    budget = None if budget_steps is None else int(budget_steps * nbytes)
    (returned, copies), traj, seen = _stalled_run(tmp_path, monkeypatch, budget)
    # steps 0..queued-1 handed over; the next waits for room *before* its copies are made
    assert returned == queued
    assert copies == queued
    # nothing handed over is lost: once the writer moves on, every step is stored, value for value
    assert traj.n_steps == STEPS and traj.manifest.complete
    for s in range(STEPS + 1):
        stored = traj.params(s)
        for name, want in seen[s].items():
            assert torch.equal(stored[name], want)


def test_budget_admits_by_count_and_bytes_and_a_large_step_alone():
    budget = QueueBudget(max_steps=3, max_bytes=100)
    budget.acquire(60)
    later = threading.Thread(target=budget.acquire, args=(60,))  # 120 > 100: waits
    later.start()
    time.sleep(0.2)
    assert later.is_alive() and budget.steps == 1
    budget.release(60)
    later.join(5)
    assert not later.is_alive() and (budget.steps, budget.bytes) == (1, 60)
    budget.release(60)
    budget.acquire(500)  # larger than the budget: admitted when nothing is queued
    assert (budget.steps, budget.bytes) == (1, 500)
    budget.release(500)
    for _ in range(3):
        budget.acquire(10)
    blocked = threading.Thread(target=budget.acquire, args=(10,))  # 40 <= 100 but 3 steps queued
    blocked.start()
    time.sleep(0.2)
    assert blocked.is_alive()
    budget.release(10)
    blocked.join(5)
    assert not blocked.is_alive() and budget.peak_steps == 3 and budget.peak_bytes == 500


def test_no_byte_bound_is_the_step_bound_alone():
    budget = QueueBudget(max_steps=2, max_bytes=None)
    budget.acquire(10**12)
    budget.acquire(10**12)
    assert budget.steps == 2 and budget.bytes == 2 * 10**12
