"""Every kind of store file, truncated, with a flipped byte or replaced by another file of the store:
loading, ``verify()`` or resuming raises a ``TrajectoryError`` naming the file (and the step, for
step and optimizer-state files)."""

from __future__ import annotations

import re

import pytest
import torch
from _recording_helpers import mlp, resumable_setup, resumable_step

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import Trajectory


def _model():
    model = mlp(seed=1)
    model.register_buffer("offset", torch.tensor([0.5, -0.25], dtype=torch.float64))
    return model


def _record(store, steps=3):
    model, opt, X, y = resumable_setup()
    model.register_buffer("offset", torch.tensor([0.5, -0.25], dtype=torch.float64))
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store,
                                      background_writes=False)  # one optimizer state per step: state-1 after step 2
    with rec:
        for s in range(steps):
            resumable_step(model, opt, X, y, s, rec)


def _open_everything(store):
    """What a user does with a store: load, verify, and resume it (which reads the optimizer state)."""
    Trajectory.load(store, model=_model()).verify()
    model, opt, X, y = resumable_setup()
    model.register_buffer("offset", torch.tensor([0.5, -0.25], dtype=torch.float64))
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, resume=True)
    rec.restore()


#: file, the file that replaces it, the step named in the error (None: no step)
FILES = [
    ("initial.safetensors", "steps/000000.safetensors", None),
    ("constants.safetensors", "initial.safetensors", None),
    ("data.safetensors", "initial.safetensors", None),
    ("steps/000001.safetensors", "steps/000000.safetensors", 1),
    ("steps/000002.safetensors", "steps/000001.safetensors", 2),
    ("optimizer/state-1.safetensors", "optimizer/state-0.safetensors", 2),
]


def _corrupt(path, how, other):
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        i = len(data) - 5  # a tensor byte near the end (the header stays parseable)
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
    else:
        path.write_bytes(other.read_bytes())


@pytest.mark.parametrize("how", ["truncate", "flip", "replace"])
@pytest.mark.parametrize("relpath, other, step", FILES)
def test_a_corrupted_tensor_file_is_named_with_its_step(tmp_path, relpath, other, step, how):
    store = tmp_path / "run"
    _record(store)
    if relpath.startswith("optimizer/"):
        assert Trajectory.load(store, model=_model()).manifest.steps[2].optimizer_state.path == relpath
    _corrupt(store / relpath, how, store / other)
    with pytest.raises(TrajectoryError, match=r"truncated|corrupted|modified") as err:
        _open_everything(store)
    message = str(err.value)
    assert relpath in message and message.startswith("Trajectory file")
    assert (step is None and "(step" not in message) or f"(step {step})" in message


@pytest.mark.parametrize("how", ["truncate", "flip", "replace"])
def test_a_corrupted_manifest_is_named(tmp_path, how):
    store = tmp_path / "run"
    _record(store)
    path = store / "manifest.json"
    if how == "flip":
        data = path.read_bytes()
        path.write_bytes(b"[" + data[1:])  # the opening brace
    else:
        _corrupt(path, how, store / "journal.jsonl")
    named = re.escape(str(path))
    with pytest.raises(TrajectoryError, match=rf"Trajectory manifest '{named}' is (not valid JSON|invalid)"):
        _open_everything(store)


@pytest.mark.parametrize("how", ["flip", "replace"])
def test_a_corrupted_journal_line_is_named(tmp_path, how):
    store = tmp_path / "run"
    _record(store)
    path = store / "journal.jsonl"
    lines = path.read_bytes().split(b"\n")
    if how == "flip":
        lines[1] = b"[" + lines[1][1:]
    else:
        lines[1] = (store / "manifest.json").read_bytes().replace(b"\n", b"")[:80]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(TrajectoryError, match=rf"Trajectory journal '{re.escape(str(path))}' is corrupted at line 2"):
        _open_everything(store)


def test_a_truncated_journal_loses_only_its_torn_last_step(tmp_path):
    """Truncation is what a crash does to the journal: the torn last line is ignored, nothing else."""
    store = tmp_path / "run"
    _record(store)
    manifest = (store / "manifest.json").read_text()
    import json

    m = json.loads(manifest)
    m["steps"], m["n_steps"], m["complete"] = [], 0, False  # as written at set-up: the journal lists the steps
    (store / "manifest.json").write_text(json.dumps(m))
    path = store / "journal.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 30])
    traj = Trajectory.load(store, model=_model())
    assert traj.n_steps == 2
    traj.verify()
