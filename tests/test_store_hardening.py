"""Stores from strangers and concurrent writers: reads stay inside the store, never block or over-read,
overwrite deletes only a store's own files, and one writer at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import batches, mlp, regression_data

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory.lock import LOCK


def _recorder(store, **kwargs):
    X, y = regression_data(n=12)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, **kwargs)
    return rec, model, opt, X, y


def _steps(rec, model, opt, X, y, n=3):
    for idx in batches(12, 4)[:n]:
        opt.zero_grad()
        F.mse_loss(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        opt.step()


def _record(store, **kwargs):
    rec, model, opt, X, y = _recorder(store, **kwargs)
    with rec:
        _steps(rec, model, opt, X, y)
    return rec


def _edit_manifest(store, edit):
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _load_all(store):
    traj = explaind.Trajectory.load(store, model=mlp())
    traj.verify()
    return traj


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_manifest_cannot_name_a_file_outside_the_store(tmp_path, where):
    store = tmp_path / "run"
    _record(store)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x" * 1234)
    name = "../secret.bin" if where == "parent" else str(secret)
    _edit_manifest(store, lambda m: m["initial_file"].update(path=name))
    with pytest.raises(TrajectoryError, match="not a relative path inside the store") as err:
        _load_all(store).params(0)
    assert "1234" not in str(err.value)  # nothing about the foreign file leaks


def test_a_symlink_out_of_the_store_is_refused(tmp_path):
    store = tmp_path / "run"
    _record(store)
    outside = tmp_path / "outside.safetensors"
    target = store / "initial.safetensors"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(TrajectoryError, match="leads outside the store"):
        _load_all(store)
    target.unlink()
    target.symlink_to("/dev/zero")
    with pytest.raises(TrajectoryError, match="leads outside the store"):
        _load_all(store)


def test_a_fifo_or_an_oversized_file_does_not_hang_or_get_read(tmp_path):
    store = tmp_path / "run"
    _record(store)
    step = store / "steps" / "000001.safetensors"
    size = step.stat().st_size
    step.write_bytes(b"\0" * (size + 10))
    with pytest.raises(TrajectoryError, match="more than the .* the store allows"):
        _load_all(store)
    step.unlink()
    os.mkfifo(step)
    outcome = {}

    def load():
        try:
            _load_all(store)
        except TrajectoryError as exc:
            outcome["error"] = str(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "reading a FIFO in the store blocked"
    assert "not a regular file" in outcome["error"]


def test_overwrite_deletes_only_a_valid_store_and_only_its_files(tmp_path):
    folder = tmp_path / "not_a_store"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"name": "my web app"}')
    (folder / "thesis.tex").write_text("precious")
    refusal = r"(?s)deletes only a valid explaind trajectory store.*Nothing was deleted"
    with pytest.raises(TrajectoryError, match=refusal):
        _record(folder, overwrite=True)
    assert (folder / "thesis.tex").read_text() == "precious" and (folder / "manifest.json").exists()

    store = tmp_path / "run"
    _record(store)
    (store / "notes.txt").write_text("mine")
    (store / "steps" / "plot.png").write_bytes(b"png")
    (store / "steps" / "000001.safetensors.tmp-999999-1").write_bytes(b"torn")
    rec = _record(store, overwrite=True)
    assert (store / "notes.txt").read_text() == "mine" and (store / "steps" / "plot.png").exists()
    assert not (store / "steps" / "000001.safetensors.tmp-999999-1").exists()
    assert _load_all(store).n_steps == rec.trajectory.n_steps == 3


def test_a_second_writer_is_refused_and_the_first_run_survives(tmp_path):
    store = tmp_path / "run"
    first, model, opt, X, y = _recorder(store)
    with first:
        _steps(first, model, opt, X, y, n=1)
        for kwargs in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(TrajectoryError, match="being written by process .* a second writer would corrupt"):
                _recorder(store, **kwargs)
        _steps(first, model, opt, X, y, n=3)
    assert _load_all(store).n_steps == 1 + 3
    assert not (store / LOCK).exists()


def test_two_recorders_started_together_cannot_both_write(tmp_path):
    store = tmp_path / "run"
    a, ma, oa, Xa, ya = _recorder(store)
    b, mb, ob, Xb, yb = _recorder(store)  # both prepared before either wrote
    with a:
        _steps(a, ma, oa, Xa, ya)
        with pytest.raises(TrajectoryError, match="being written by process"):
            with b:
                pass
    assert _load_all(store).n_steps == 3


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    store = tmp_path / "run"
    store.mkdir()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (store / LOCK).write_text(json.dumps({"pid": int(done.stdout), "host": socket.gethostname(), "since": "then"}))
    _record(store)
    assert _load_all(store).n_steps == 3 and not (store / LOCK).exists()


# ---------------------------------------------------------------------------------------------- checked content
def _rewrite(store, relpath, edit_tensors=None, edit_meta=None):
    """Rewrite a step or start file with edited content and a manifest that checksums it again (a forgery)."""
    import xxhash
    from safetensors.torch import load_file, safe_open, save

    with safe_open(str(store / relpath), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    tensors = load_file(str(store / relpath))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    data = save(tensors, metadata=meta)
    (store / relpath).write_bytes(data)

    def fix(m):
        records = [m.get("initial_file"), m.get("constants_file"), m.get("data_file")] + [s["file"] for s in m["steps"]]
        for rec in records:
            if rec and rec["path"] == relpath:
                rec.update(checksum="xxh3-128:" + xxhash.xxh3_128(data).hexdigest(), nbytes=len(data))

    _edit_manifest(store, fix)


def test_step_metadata_is_bound_to_its_checksummed_file(tmp_path):
    store = tmp_path / "run"
    _record(store)
    _edit_manifest(store, lambda m: m["steps"][1].update(grad_scale=m["steps"][1]["grad_scale"] * 1000))
    with pytest.raises(TrajectoryError, match="record of step 1 .* differs from the one checksummed"):
        _load_all(store).params(2)

    other = tmp_path / "run2"
    _record(other)
    _edit_manifest(other, lambda m: m["steps"][2].update(file=m["steps"][0]["file"]))
    with pytest.raises(TrajectoryError, match="holds step '0', not step 2"):
        _load_all(other).params(3)


@pytest.mark.parametrize("forgery, message", [
    (lambda t: t.update({"param.0.bias": t["param.0.bias"][:1]}), "has shape .* the manifest records"),
    (lambda t: t.pop("param.0.weight"), "lacks 'param.0.weight'"),
    (lambda t: t["param.0.weight"].view(-1).__setitem__(0, float("nan")), "NaN or infinite"),
    (lambda t: t.update({"batch.indices": t["batch.indices"].double()}), "invalid batch"),
    (lambda t: t["batch.indices"].__setitem__(0, 10_000), "invalid batch"),
])
def test_forged_step_files_are_refused(tmp_path, forgery, message):
    store = tmp_path / "run"
    _record(store)
    _rewrite(store, "steps/000000.safetensors", edit_tensors=forgery)
    traj = explaind.Trajectory.load(store, model=mlp())
    with pytest.raises(TrajectoryError, match=message):
        traj.params(1), traj.batch(0)


def test_train_data_of_another_length_is_refused(tmp_path):
    store = tmp_path / "run"
    _record(store)
    X, y = regression_data(n=10)
    with pytest.raises(TrajectoryError, match="train_data has 10 samples but the run .* was recorded with 12"):
        explaind.Trajectory.load(store, model=mlp(), train_data=(X, y))
