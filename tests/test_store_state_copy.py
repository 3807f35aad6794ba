"""A dense store's optimizer state is copied on the state copier's thread: the stored state is exactly the state
after its step, also when the copy is slow (the next ``optimizer.step()`` waits for it), and a failed copy is
the step's write error.
"""

from __future__ import annotations

import time

import pytest
import torch
from _recording_helpers import resumable_setup, resumable_step

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import _background
from explaind.trajectory._io import read_tensors
from explaind.trajectory.store import read_manifest

STEPS = 8


def _states_by_hand(steps: int) -> list[dict[str, torch.Tensor]]:
    """The Adam state after each step of the resumable run, trained without a recorder (deep copies)."""
    model, opt, X, y = resumable_setup()
    out = []
    for s in range(steps):
        idx = torch.randperm(32, generator=torch.Generator().manual_seed(1000 + s))[:8]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X[idx]), y[idx]).backward()
        opt.step()
        out.append({f"state.{i}.{k}": v.clone() for i, entry in opt.state_dict()["state"].items()
                    for k, v in entry.items()})
    return out


class _Destination:
    """Stands for the last destination tensor of a state copy: ``copy_`` runs ``how(dst, src)`` instead."""

    def __init__(self, dst, how):
        self.dst, self.how = dst, how

    def copy_(self, src):
        self.how(self.dst, src)


def _wrap_last_copy(monkeypatch, how) -> None:
    """Every state copy ends with ``how(dst, src)`` for its last tensor (the real copier runs the rest)."""
    submit = _background.StateCopier.submit

    def wrapped(self, pairs):
        *first, (dst, src) = pairs
        return submit(self, [*first, (_Destination(dst, how), src)])

    monkeypatch.setattr(_background.StateCopier, "submit", wrapped)


def _slow_copies(monkeypatch, delay: float) -> list[float]:
    """Make every state copy finish ``delay`` seconds late; returns the times the copies finished."""
    finished: list[float] = []

    def late(dst, src):
        time.sleep(delay)
        dst.copy_(src)
        finished.append(time.perf_counter())

    _wrap_last_copy(monkeypatch, late)
    return finished


@pytest.mark.parametrize("background", [True, False])
def test_the_stored_states_are_those_after_their_steps_even_when_the_copy_is_slow(tmp_path, monkeypatch, background):
    finished = _slow_copies(monkeypatch, 0.03)
    store = tmp_path / "run"
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store,
                                      background_writes=background)
    stepped: list[float] = []
    with rec:
        for s in range(STEPS):
            resumable_step(model, opt, X, y, s, rec)
            stepped.append(time.perf_counter())
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks  # all hooks removed
    assert len(finished) == STEPS
    for s in range(1, STEPS):  # step s began only after the copy of step s-1's state had finished
        assert finished[s - 1] < stepped[s]
    reference = _states_by_hand(STEPS)
    m = read_manifest(store)
    latest = {r.path: (s, r) for s, r in enumerate(step.optimizer_state for step in m.steps) if r is not None}
    assert len(latest) == 2  # the two slots, holding the states of two different steps
    for s, record in latest.values():  # each slot's file as last written
        tensors, meta = read_tensors(store, record)
        assert meta["n_steps"] == str(s + 1)
        own = {k: v for k, v in tensors.items() if not k.startswith("audit.")}
        assert own.keys() == reference[s].keys()
        for k, v in reference[s].items():
            assert torch.equal(own[k], v), (s, k)


def test_a_failed_copy_is_the_write_error_of_its_step(tmp_path, monkeypatch):
    def fail(dst, src):
        raise RuntimeError("copy failed on purpose")

    _wrap_last_copy(monkeypatch, fail)
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=tmp_path / "run",
                                      background_writes=False)
    with pytest.raises(TrajectoryError, match=r"Writing step 0 of the trajectory store .* RuntimeError: copy failed "
                                              r"on purpose"):
        with rec:
            resumable_step(model, opt, X, y, 0, rec)
