"""The on-disk store: equality with the in-memory trajectory, checksums, overwrite rules, loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xxhash
from _recording_helpers import batches, classification_data, mlp, regression_data

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import DiskTrajectory, Trajectory
from explaind.trajectory.manifest import SCHEMA_VERSION


def _record(store=None, make_opt=None, **kwargs):
    X, y = regression_data(n=20)
    model = mlp()
    model[0].bias.requires_grad_(False)
    opt = (make_opt or (lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01)))(
        [p for p in model.parameters() if p.requires_grad]
    )
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, **kwargs)
    with rec:
        for idx in batches(20, 6):
            opt.zero_grad()
            F.mse_loss(model(X[idx]), y[idx]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            rec.log_batch(idx)
            opt.step()
    return rec, model, (X, y)


def _assert_same(a: Trajectory, b: Trajectory):
    assert a.n_steps == b.n_steps and a.param_names == b.param_names
    for s in range(a.n_steps + 1):
        for k in a.param_names:
            assert torch.equal(a.params(s)[k], b.params(s)[k])
    for s in range(a.n_steps):
        ua, ub = a.updates(s), b.updates(s)
        for k in a.param_names:
            for f in ("a", "b", "P", "q", "n", "lambda_c", "lambda_d"):
                va, vb = getattr(ua[k], f), getattr(ub[k], f)
                assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), (s, k, f)
        assert torch.equal(a.batch(s)[0], b.batch(s)[0]) and torch.equal(a.batch(s)[1], b.batch(s)[1])
        assert a.grad_scale(s) == b.grad_scale(s)
    np.testing.assert_array_equal(a.audit(), b.audit())
    assert a.constants().keys() == b.constants().keys()
    for k in a.constants():
        assert torch.equal(a.constants()[k], b.constants()[k])
    idx = torch.tensor([3, 0, 19])
    for ta, tb in zip(a.train_samples(idx), b.train_samples(idx)):
        assert torch.equal(ta, tb)


@pytest.mark.parametrize("background", [True, False])
def test_disk_and_memory_trajectories_are_equal(tmp_path, background):
    mem, _, _ = _record()
    disk, model, data = _record(tmp_path / "run", background_writes=background)
    traj = disk.trajectory
    assert isinstance(traj, DiskTrajectory)
    _assert_same(mem.trajectory, traj)
    loaded = Trajectory.load(tmp_path / "run", model=mlp())
    _assert_same(mem.trajectory, loaded)
    m = loaded.manifest
    assert m.schema_version == SCHEMA_VERSION and m.complete and m.n_steps == 4 and m.param_stride == 1
    assert m.adapter == "adam" and m.adapter_hyperparameters and m.loss == "mse"
    assert [p.name for p in m.params] == ["0.weight", "2.weight", "2.bias"] and m.params[0].shape == [5, 3]
    assert [c.name for c in m.constants] == ["0.bias"] and m.dtype == "float64"
    for r in m.steps:  # each step file's checksum: XXH3-128 of its bytes, computed here with xxhash itself
        assert r.file.sha256 is None
        data = (tmp_path / "run" / r.file.path).read_bytes()
        assert r.file.checksum == "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()
    on_disk = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert on_disk["n_steps"] == 4 and len(on_disk["steps"]) == 4
    assert sorted(p.name for p in (tmp_path / "run" / "steps").iterdir()) == [f"{s:06d}.safetensors" for s in range(4)]
    assert loaded.audit().max() < 1e-12
    assert loaded.n_train == 20
    loaded.verify()


def test_streaming_reads_only_the_requested_step(tmp_path, monkeypatch):
    rec, _, _ = _record(tmp_path / "run")
    traj = Trajectory.load(tmp_path / "run", model=mlp(), cache_steps=2)
    from explaind.trajectory import disk as disk_module

    opened = []
    real = disk_module.read_tensors
    monkeypatch.setattr(disk_module, "read_tensors", lambda root, rec, step=None: opened.append(rec.path)
                        or real(root, rec, step))
    traj.updates(2)
    traj.params(3)  # theta_3 lives in the file of step 2: cached
    traj.batch(1)
    assert opened == ["steps/000002.safetensors", "steps/000001.safetensors"]


def test_flipped_byte_names_file_and_step(tmp_path):
    _record(tmp_path / "run")
    path = tmp_path / "run" / "steps" / "000001.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    traj = Trajectory.load(tmp_path / "run", model=mlp())
    traj.params(1)  # other steps are fine
    with pytest.raises(TrajectoryError, match=r"000001\.safetensors' \(step 1\) is corrupted: its xxh3-128 checksum"):
        traj.updates(1)
    with pytest.raises(TrajectoryError, match=r"000001\.safetensors' \(step 1\) is corrupted"):
        traj.params(2)
    with pytest.raises(TrajectoryError, match=r"\(step 1\) is corrupted"):
        traj.verify()


def test_truncated_and_missing_files(tmp_path):
    _record(tmp_path / "run")
    path = tmp_path / "run" / "steps" / "000002.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    traj = Trajectory.load(tmp_path / "run", model=mlp())
    with pytest.raises(TrajectoryError, match=r"000002\.safetensors' \(step 2\) is truncated or was modified: it has "
                                              r"100 bytes"):
        traj.batch(2)
    (tmp_path / "run" / "steps" / "000003.safetensors").unlink()
    with pytest.raises(TrajectoryError, match=r"000003\.safetensors' \(step 3\) is missing"):
        traj.params(4)
    (tmp_path / "run" / "initial.safetensors").write_bytes(b"garbage")
    with pytest.raises(TrajectoryError, match=r"initial\.safetensors' is truncated"):
        traj.params(0)


def test_existing_run_is_not_overwritten_without_consent(tmp_path):
    first, _, _ = _record(tmp_path / "run")
    with pytest.raises(TrajectoryError, match=r"already stored at .*run'. Pass overwrite=True to replace it, "
                                              r"resume=True to continue it"):
        _record(tmp_path / "run")
    assert Trajectory.load(tmp_path / "run", model=mlp()).n_steps == 4  # untouched
    _record(tmp_path / "run", overwrite=True, make_opt=lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert Trajectory.load(tmp_path / "run", model=mlp()).manifest.adapter == "sgd"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(TrajectoryError, match="non-empty directory that is not an explaind trajectory store"):
        _record(other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_load_errors(tmp_path):
    with pytest.raises(TrajectoryError, match=r"is not an explaind trajectory store: it does not exist"):
        Trajectory.load(tmp_path / "nothing")
    _record(tmp_path / "run")
    with pytest.raises(TrajectoryError, match=r"not built by explaind\.models\.build_model.*Pass model="):
        Trajectory.load(tmp_path / "run")
    with pytest.raises(TrajectoryError) as info:
        Trajectory.load(tmp_path / "run", model=mlp(hidden=4))
    msg = str(info.value)
    assert "0.weight: recorded shape (5, 3), model has (4, 3)" in msg
    assert "2.weight: recorded shape (2, 5), model has (2, 4)" in msg
    assert "0.bias: recorded shape (5,), model has (4,)" in msg
    extra = mlp()
    extra.register_parameter("extra", torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(TrajectoryError, match=r"extra: model shape \(2,\), not in the recorded trajectory"):
        Trajectory.load(tmp_path / "run", model=extra)
    manifest = tmp_path / "run" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["schema_version"] = SCHEMA_VERSION + 1
    manifest.write_text(json.dumps(raw))
    with pytest.raises(TrajectoryError, match=rf"schema_version {SCHEMA_VERSION + 1}.*Upgrade explaind"):
        Trajectory.load(tmp_path / "run", model=mlp())


def test_train_data_attached_at_load_time(tmp_path):
    rec, _, (X, y) = _record(tmp_path / "run", store_data=False)
    assert not (tmp_path / "run" / "data.safetensors").exists()
    traj = Trajectory.load(tmp_path / "run", model=mlp())
    with pytest.raises(TrajectoryError, match=r"no training data attached.*train_data=\(X, y\)"):
        traj.train_samples(torch.tensor([0]))
    assert traj.n_train == 20  # known from the manifest
    traj = Trajectory.load(tmp_path / "run", model=mlp(), train_data=(X, y))
    assert torch.equal(traj.train_samples(torch.tensor([4]))[0], X[[4]])


def test_registry_model_is_rebuilt_with_trained_weights(tmp_path):
    X, y = classification_data(n=16, d=6, classes=3)
    from explaind.models import build_model

    model = build_model("mlp", {"in_features": 6, "out_features": 3, "hidden_sizes": [5]}, seed=3, dtype="float64")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "run")
    with rec:
        for idx in batches(16, 4):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    traj = Trajectory.load(tmp_path / "run")
    assert traj.manifest.architecture.name == "mlp" and traj.manifest.architecture.seed == 3
    rebuilt = dict(traj.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(rebuilt[name].detach(), p.detach())
    assert torch.equal(traj.model(X), model(X))


def test_background_write_failure_surfaces_and_keeps_earlier_steps(tmp_path, monkeypatch):
    from explaind.trajectory import store as store_module

    real = store_module.TensorFileWriter.write

    def flaky(self, root, relpath, tensors, metadata=None, **kwargs):
        if relpath == "steps/000002.safetensors":
            raise OSError("disk full")
        return real(self, root, relpath, tensors, metadata, **kwargs)

    monkeypatch.setattr(store_module.TensorFileWriter, "write", flaky)
    with pytest.raises(TrajectoryError, match=r"Writing step 2 of the trajectory store .* failed: OSError: disk full"):
        _record(tmp_path / "run")
    traj = Trajectory.load(tmp_path / "run", model=mlp())
    assert traj.n_steps == 2 and not traj.manifest.complete
    traj.verify()
