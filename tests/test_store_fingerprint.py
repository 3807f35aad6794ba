"""The training-data fingerprint: recorded with a store, checked when the store is loaded or resumed.

A stored run refers to its samples by position; loading it with other data of the same length
(shuffled, other values, another dtype) must fail loudly, never decompose over the wrong samples.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import batches, regression_data
from torch import nn

import explaind
from explaind.exceptions import ConfigError, TrajectoryError
from explaind.trajectory import fingerprint as fp
from explaind.trajectory._common import TrainData

N = 12


class TwoInputs(nn.Module):
    """``model(a=..., b=...)``: a model of mapping inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 2).double(), nn.Linear(1, 2).double()

    def forward(self, a, b):
        return self.a(a) + self.b(b)


class ItemData(torch.utils.data.Dataset):
    """A map-style dataset of ``(x, y)`` items over tensors."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


def _record(store, train_data, model=None, **kwargs):
    X, y = train_data
    model = model if model is not None else nn.Sequential(nn.Linear(3, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=train_data, store=store, store_data=False,
                                      check_gradients=False, **kwargs)
    with rec:
        for idx in batches(N, 4):
            opt.zero_grad()
            out = model(**{k: v[idx] for k, v in X.items()}) if isinstance(X, dict) else model(X[idx])
            F.mse_loss(out, y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model, opt


@pytest.fixture()
def stored(tmp_path):
    X, y = regression_data(n=N)
    model, _ = _record(tmp_path / "run", (X, y))
    return tmp_path / "run", model, X, y


def test_the_recorded_data_loads_as_tensors_and_as_a_dataset(stored):
    store, model, X, y = stored
    fingerprint = explaind.Trajectory.load(store, model=model, train_data=(X, y)).manifest.train_fingerprint
    assert fingerprint is not None and fingerprint.n == N and fingerprint.rows == N
    explaind.Trajectory.load(store, model=model, train_data=(X.clone(), y.clone()))
    explaind.Trajectory.load(store, model=model, train_data=ItemData(X, y))


@pytest.mark.parametrize("change", ["shuffled", "one_value", "targets", "dtype"])
def test_other_data_of_the_same_length_is_refused(stored, change):
    store, model, X, y = stored
    X2, y2 = X.clone(), y.clone()
    if change == "shuffled":
        perm = torch.arange(N).roll(1)
        X2, y2 = X[perm], y[perm]
    elif change == "one_value":
        X2[7, 1] += 1e-12
    elif change == "targets":
        y2[0, 0] = -y2[0, 0]
    else:
        y2 = y2.float()
    with pytest.raises(TrajectoryError, match="not the data the run") as err:
        explaind.Trajectory.load(store, model=model, train_data=(X2, y2))
    message = str(err.value)
    assert "Pass the training data the run was recorded with" in message and "verify_train_data=False" in message
    assert ("'y'" if change in ("targets", "dtype") else "'X'") in message


def test_a_shuffled_dataset_object_is_refused(stored):
    store, model, X, y = stored
    perm = torch.arange(N).flip(0)
    with pytest.raises(TrajectoryError, match="in another order"):
        explaind.Trajectory.load(store, model=model, train_data=ItemData(X[perm], y[perm]))


def test_mapping_inputs_are_fingerprinted_tensor_by_tensor(tmp_path):
    X, y = regression_data(n=N)
    inputs = {"a": X, "b": X[:, :1] * 2}
    model, _ = _record(tmp_path / "run", (inputs, y), model=TwoInputs())
    explaind.Trajectory.load(tmp_path / "run", model=model, train_data=({"a": X, "b": X[:, :1] * 2}, y))
    other = {"a": X, "b": X[:, :1].flip(0) * 2}
    with pytest.raises(TrajectoryError, match="'X.b'"):
        explaind.Trajectory.load(tmp_path / "run", model=model, train_data=(other, y))


def test_skipping_the_check_is_explicit_and_logged(stored, caplog):
    store, model, X, y = stored
    with caplog.at_level(logging.WARNING, logger="explaind.trajectory"):
        explaind.Trajectory.load(store, model=model, train_data=(X.flip(0), y.flip(0)), verify_train_data=False)
    assert "verify_train_data=False" in caplog.text
    with pytest.raises(ConfigError, match="verify_train_data='no'"):
        explaind.Trajectory.load(store, model=model, train_data=(X, y), verify_train_data="no")
    with pytest.raises(TrajectoryError, match="recorded with 12"):  # the length is checked regardless
        explaind.Trajectory.load(store, model=model, train_data=(X[:6], y[:6]), verify_train_data=False)


def test_a_store_without_a_fingerprint_stays_readable_with_a_note(stored, caplog):
    store, model, X, y = stored
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["train_fingerprint"]
    path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="explaind.trajectory"):
        traj = explaind.Trajectory.load(store, model=model, train_data=(X, y))
    assert traj.n_steps == 3 and "records no fingerprint" in caplog.text


def test_resuming_with_other_data_is_refused(stored):
    store, model, X, y = stored
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(TrajectoryError, match="not the data the run"):
        explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X.flip(0), y.flip(0)), store=store,
                                    resume=True, store_data=False)
    explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, resume=True,
                                store_data=False)


def _reference_digest(array: np.ndarray) -> str:
    """SHA-256 of the rows' bytes in C order, written independently of the module under test."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_large_data_is_hashed_on_evenly_spaced_rows(monkeypatch):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(1000, 6, generator=g), torch.randint(0, 5, (1000,), generator=g)
    monkeypatch.setattr(fp, "FULL_HASH_BYTES", 1000)  # the data is "large": sample rows
    monkeypatch.setattr(fp, "SAMPLED_BYTES", 24 * 50)
    monkeypatch.setattr(fp, "MIN_SAMPLED_ROWS", 10)
    monkeypatch.setattr(fp, "CHUNK_BYTES", 7 * 24)  # several chunks per tensor
    result = fp.data_fingerprint(TrainData((X, y)))
    rows = [i * 999 // (result.rows - 1) for i in range(result.rows)]
    assert result.rows == 1200 // (6 * 4 + 8) and rows[0] == 0 and rows[-1] == 999
    assert result.tensors["X"].sha256 == _reference_digest(X.numpy()[rows])
    assert result.tensors["y"].sha256 == _reference_digest(y.numpy()[rows])
    full = fp.data_fingerprint(TrainData((X, y)), rows=1000)
    assert full.tensors["X"].sha256 == _reference_digest(X.numpy())
    moved = torch.cat([X[1:2], X[:1], X[2:]])  # rows 0 and 1 swapped: row 0 is sampled
    with pytest.raises(TrajectoryError, match="'X'"):
        fp.check_train_data(TrainData((moved, y)), result, "'run'")
    fp.check_train_data(TrainData((X.clone(), y.clone())), result, "'run'")


def test_a_dataset_object_is_hashed_on_at_most_dataset_rows_items(monkeypatch):
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(50, 3, generator=g), torch.randn(50, 2, generator=g)
    monkeypatch.setattr(fp, "DATASET_ROWS", 8)
    calls = []

    class Counting(ItemData):
        def __getitem__(self, i):
            calls.append(i)
            return super().__getitem__(i)

    result = fp.data_fingerprint(TrainData(Counting(X, y)))
    rows = [i * 49 // 7 for i in range(8)]
    assert result.rows == 8 and sorted(calls) == rows
    assert result.tensors["X"].sha256 == _reference_digest(X.numpy()[rows])
    fp.check_train_data(TrainData((X, y)), result, "'run'")  # the same values as tensors: the same fingerprint
