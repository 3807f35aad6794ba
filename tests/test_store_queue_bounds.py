"""The store writer's queue bounds: refused when they are no count, and the room a step waits for is what it hands over.

``StoreWriter(max_queue_bytes=...)`` and ``max_queue`` are checked before anything is locked or written.
The recorder waits for room in the writer's queue *before* copying a step (``_make_room``); it must ask for
exactly the bytes ``write_step`` then counts against the budget — theta, the batch record, the tensor-valued
coefficients (Adam's ``P``), changed buffers, the optimizer state and the audit's gradient copies — or a step let
through would wait again, holding its copies. Checked by the byte accounting itself (no timing).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.exceptions import ConfigError
from explaind.trajectory import store
from explaind.trajectory._background import QueueBudget
from explaind.trajectory.manifest import TrajectoryManifest
from explaind.trajectory.store import StoreWriter


def _manifest() -> TrajectoryManifest:
    return TrajectoryManifest(explaind_version="0", dtype="float64", params=[], constants=[], adapter="sgd",
                              adapter_hyperparameters={}, optimizer_class="torch.optim.SGD", loss="mse")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_queue_bytes": -1}, r"max_queue_bytes=-1 is not allowed.*Allowed: an int >= 0.*None.*'default'"),
    ({"max_queue_bytes": 1.5}, r"max_queue_bytes=1\.5 is not allowed"),
    ({"max_queue_bytes": True}, r"max_queue_bytes=True is not allowed"),
    ({"max_queue_bytes": "big"}, r"max_queue_bytes='big' is not allowed"),
    ({"max_queue": 0}, r"max_queue=0 is not allowed.*Allowed: an int >= 1.*Fix: pass max_queue=1"),
    ({"max_queue": -2}, r"max_queue=-2 is not allowed"),
], ids=["bytes-negative", "bytes-float", "bytes-bool", "bytes-string", "steps-zero", "steps-negative"])
def test_a_queue_bound_that_is_no_count_is_refused_before_anything_is_written(tmp_path, kwargs, message):
    root = tmp_path / "run"
    root.mkdir()
    with pytest.raises(ConfigError, match=message):
        StoreWriter(root, _manifest(), new=True, **kwargs)
    assert list(root.iterdir()) == []  # no lock, no journal, no set-up marker


@pytest.mark.parametrize("max_queue_bytes", [0, np.int64(7), None, "default"], ids=["zero", "numpy", "none",
                                                                                     "default"])
def test_the_allowed_queue_bounds_are_taken(tmp_path, max_queue_bytes):
    writer = StoreWriter(tmp_path, _manifest(), new=True, max_queue=1, max_queue_bytes=max_queue_bytes)
    try:
        want = {"default": store.MAX_QUEUE_BYTES, None: None}.get(max_queue_bytes, max_queue_bytes)
        assert writer._budget.max_bytes == (None if want is None else int(want))
        assert writer._budget.max_steps == 1
    finally:
        writer.close(complete=False)


def _record(path, make_opt, model, **kwargs) -> None:
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=path, fsync=False,
                                      check_gradients=False, **kwargs)
    with rec:
        for s in range(4):
            idx = torch.arange(4 * s, 4 * s + 4)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batchnorm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize("make_opt, make_model, kwargs", [
    (lambda ps: torch.optim.Adam(ps, lr=0.01), _mlp, {}),
    (lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1), _batchnorm, {"save_optimizer_state": 2}),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), _mlp, {"audit": False}),
], ids=["adam-P-tensors", "adamw-batchnorm-buffers-state-every-2", "sgd-no-audit"])
def test_the_room_waited_for_before_copying_is_what_the_step_hands_over(tmp_path, monkeypatch, make_opt, make_model,
                                                                          kwargs):
    waited, acquired = [], []
    real_wait, real_acquire = QueueBudget.wait_for_room, QueueBudget.acquire

    def wait(self, nbytes):
        waited.append(nbytes)
        return real_wait(self, nbytes)

    def acquire(self, nbytes):
        acquired.append(nbytes)
        return real_acquire(self, nbytes)

    monkeypatch.setattr(QueueBudget, "wait_for_room", wait)
    monkeypatch.setattr(QueueBudget, "acquire", acquire)
    model = make_model()
    _record(tmp_path / "run", make_opt, model, **kwargs)
    assert len(acquired) == 4 and waited == acquired
    if isinstance(make_opt(model.parameters()), torch.optim.Adam):  # its P is a tensor as large as theta
        theta = sum(p.numel() * p.element_size() for p in model.parameters())
        assert min(acquired) >= 2 * theta
