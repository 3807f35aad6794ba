"""Stores edited by strangers, round 2: every hand-edited manifest and forged file found by a fault campaign is a
clear TrajectoryError naming the file, the value and what is allowed, never a raw parser error, an
assertion or a silently different result; a refused resume changes no byte of the store.

The forged files carry valid checksums (the manifest's records are rewritten to match), as a
stranger's own files would: only the checks of what a file holds can refuse them.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import batches, mlp, regression_data

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory._checksum import checksum
from explaind.trajectory.manifest import SCHEMA_VERSION

STEPS = 4


def _model():
    model = mlp()
    model.register_buffer("offset", torch.tensor([0.5, -0.25], dtype=torch.float64))  # a constant and a buffer
    return model


def _record(store: Path, steps: int, **kwargs):
    X, y = regression_data(n=12)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, **kwargs)
    start = rec.restore() if kwargs.get("resume") else 0
    with rec:
        for idx in (batches(12, 4) * 3)[start : start + steps]:
            opt.zero_grad()
            F.mse_loss(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    _record(root / "dense", STEPS)
    _record(root / "sparse", 7, checkpoint_every=3)
    return root


@pytest.fixture
def dense(templates, tmp_path):
    return Path(shutil.copytree(templates / "dense", tmp_path / "dense"))


@pytest.fixture
def sparse(templates, tmp_path):
    return Path(shutil.copytree(templates / "sparse", tmp_path / "sparse"))


def _manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def _edit(store: Path, edit) -> None:
    manifest = _manifest(store)
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


def _load_everything(store: Path) -> None:
    traj = explaind.Trajectory.load(store, model=_model())
    for s in range(traj.n_steps + 1):
        traj.params(s)
        traj.buffers(s)
    for s in range(traj.n_steps):
        traj.updates(s)
    traj.train_samples(torch.arange(12))


def _forge(store: Path, record: dict, edit, extra: bytes = b"") -> None:
    """Rewrite the safetensors header of the file ``record`` names with ``edit(header, payload_bytes)``, append
    ``extra`` to its tensor data, and fix its record's size and checksum."""
    path = store / record["path"]
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header, len(data) - 8 - n)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    data = struct.pack("<Q", len(head)) + head + data[8 + n :] + extra
    path.write_bytes(data)
    record.update(nbytes=len(data), checksum=checksum(data, "xxh3-128"))


def _retype(name: str, dtype: str, shape) -> callable:
    def edit(header, _payload):
        header[name] = {**header[name], "dtype": dtype, "shape": shape}
    return edit


# --------------------------------------------------------------------------- manifest fields
MANIFEST_EDITS = {
    "schema_version as a string": (lambda m: m.update(schema_version="3"), r"schema_version '3'; allowed: an integer"),
    "schema_version true": (lambda m: m.update(schema_version=True), r"schema_version True; allowed: an integer"),
    "schema_version 2.5": (lambda m: m.update(schema_version=2.5), r"schema_version 2.5; allowed: an integer from 1"),
    "schema_version 0": (lambda m: m.update(schema_version=0),
                         rf"schema_version 0; allowed: an integer from 1 to {SCHEMA_VERSION}"),
    "schema_version missing": (lambda m: m.pop("schema_version"), r"schema_version None; allowed"),
    "an unknown dtype": (lambda m: m.update(dtype="float128"), r"dtype = 'float128': .*not a dtype of this torch"
                                                               r".*upgrade torch"),
    "an unknown parameter dtype": (lambda m: m["params"][0].update(dtype="__class__"), r"params\.0\.dtype = "
                                   r"'__class__': .*not a torch dtype"),
    "param_stride 0": (lambda m: m.update(param_stride=0), r"param_stride = 0: Input should be greater than or equal"),
    "a negative step": (lambda m: m["steps"][0].update(step=-1), r"steps\.0\.step = -1"),
    "a negative file size": (lambda m: m["steps"][0]["file"].update(nbytes=-1), r"steps\.0\.file\.nbytes = -1"),
    "a parameter listed twice": (lambda m: m["params"].append(m["params"][0]), r"'0\.weight' is listed twice"),
    "a constant listed twice": (lambda m: m["constants"].append(m["constants"][0]), r"'offset' is listed twice"),
    "a parameter listed as a constant": (lambda m: m["constants"].append(m["params"][1]), r"'0\.bias' is listed twice"),
    "the constants list emptied": (lambda m: m.update(constants=[]), r"buffer_names \['offset'\] are not among its "
                                   r"constants \[\]"),
    "an unknown buffer name": (lambda m: m["buffer_names"].append("nope"), r"buffer_names \['nope'\]"),
    "no constants file": (lambda m: m.update(constants_file=None), r"lists constants \['offset'\] but no "
                          r"constants_file"),
    "a dense step without theta": (lambda m: m["steps"][1].update(has_params=False), r"steps \[1\] have "
                                   r"has_params=false in a dense store"),
    "a path with a NUL byte": (lambda m: m["steps"][0]["file"].update(path="steps/a\x00b"), r"names 'steps/a\\x00b', "
                               r"which is not a relative path inside the store"),
    # since schema 3 the step files bind n_train (tests/test_store_round7.py); before, the data file's check refused it
    "n_train above the stored data": (lambda m: m.update(n_train=10**18), r"was recorded with another description "
                                      r"of the run than the manifest's"),
}


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_a_hand_edited_manifest_is_refused_naming_the_file_the_value_and_the_fix(dense, case):
    edit, message = MANIFEST_EDITS[case]
    _edit(dense, edit)
    with pytest.raises(TrajectoryError, match=message) as err:
        _load_everything(dense)
    assert str(dense) in str(err.value)  # the store (and the file, checked by the match)
    assert "re-record" in str(err.value) or "pass trajectory.load" in str(err.value).lower()


def test_a_manifest_nested_deeper_than_the_json_parser_goes_is_refused(dense):
    (dense / "manifest.json").write_text('{"extras": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(TrajectoryError, match=r"manifest\.json' is not valid JSON: maximum recursion depth"):
        explaind.Trajectory.load(dense, model=_model())


def test_a_manifest_that_is_a_symlink_out_of_the_store_is_named_as_such(dense, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text((dense / "manifest.json").read_text())
    (dense / "manifest.json").unlink()
    (dense / "manifest.json").symlink_to(outside)
    with pytest.raises(TrajectoryError, match=r"'manifest\.json' of the store .* leads outside the store") as err:
        explaind.Trajectory.load(dense, model=_model())
    assert "valid JSON" not in str(err.value)


@pytest.mark.parametrize("store_kind", ["dense", "sparse"])
@pytest.mark.parametrize(("dtype", "shape", "held"), [("F64", [7, 4], r"float64 of shape \[7, 4\]"),
                                                       ("F32", [4, 14], r"float32 of shape \[4, 14\]"),
                                                       ("I64", [4, 7], r"int64 of shape \[4, 7\]")])
def test_a_forged_coefficient_table_is_refused_not_read_as_other_coefficients(request, store_kind, dtype, shape,
                                                                             held):
    store = request.getfixturevalue(store_kind)
    _edit(store, lambda m: _forge(store, m["steps"][0]["file"], _retype("update.scalars", dtype, shape)))
    with pytest.raises(TrajectoryError, match=rf"000000\.safetensors' \(step 0\): 'update.scalars' holds {held}, "
                                              r"allowed: float64 of shape \[4, 7\]"):
        _load_everything(store)


def test_a_forged_tensor_coefficient_of_another_shape_is_refused(dense):
    def add_tensor_coefficient(header, payload):  # the cell a of '0.bias' as a tensor of 3 elements, the bias has 5
        header["update.0.bias.a"] = {"dtype": "F64", "shape": [3], "data_offsets": [payload, payload + 24]}
    _edit(dense, lambda m: _forge(dense, m["steps"][0]["file"], add_tensor_coefficient, bytes(24)))
    with pytest.raises(TrajectoryError, match=r"'update\.0\.bias\.a' is float64 of shape \[3\], allowed: a floating "
                                              r"tensor broadcasting to the shape \[5\]"):
        _load_everything(dense)


@pytest.mark.parametrize("edit", ["not data", "rows"])
def test_a_data_file_that_holds_no_training_data_is_refused(dense, edit):
    if edit == "not data":
        _edit(dense, lambda m: m.update(data_file=m["initial_file"]))
        message = r"initial\.safetensors' does not hold training data as explaind stores it"
    else:
        _edit(dense, lambda m: m.update(n_train=13))  # the batches index 0..11: only the data disagrees
        message = r"data\.safetensors' holds 12 samples, but the run was recorded with n_train=13"
    with pytest.raises(TrajectoryError, match=message):
        explaind.Trajectory.load(dense, model=_model()).train_samples(torch.arange(3))


# --------------------------------------------------------------------------- forged optimizer states (resume)
def _state_record(manifest: dict) -> dict:
    return next(r for r in reversed(manifest["steps"]) if r.get("optimizer_state"))["optimizer_state"]


def _set_meta(value):
    def edit(header, _payload):
        if value is None:
            header["__metadata__"].pop("optimizer")
        else:
            header["__metadata__"]["optimizer"] = value
    return edit


def _rename(new):
    def edit(header, _payload):
        old = next(k for k in header if k.startswith("state."))
        header[new] = header.pop(old)
    return edit


STATE_FORGERIES = {
    "no description": (_set_meta(None), r"its metadata has no 'optimizer' entry"),
    "a description that is not JSON": (_set_meta("{bad"), r"its 'optimizer' metadata is not valid JSON"),
    "a description that is a list": (_set_meta("[]"), r"is not \{'state': \{index: \{...\}\}, 'param_groups'"),
    "state of a non-integer index": (_set_meta('{"state": {"x": {}}, "param_groups": [{}]}'),
                                     r"state for parameter indices \['x'\], allowed: 0\.\.3"),
    "a tensor name of another layout": (_rename("bogus"), r"the tensor 'bogus', allowed: 'state\.<i>\.<name>'"),
    "state of a parameter the optimizer lacks": (_rename("state.99.momentum_buffer"),
                                                 r"the tensor 'state\.99\.momentum_buffer', allowed: 'state\.<i>\."
                                                 r"<name>' with i in 0\.\.3"),
}


@pytest.mark.parametrize("store_kind", ["dense", "sparse"])
@pytest.mark.parametrize("case", list(STATE_FORGERIES))
def test_a_forged_optimizer_state_is_refused_on_resume_and_nothing_changes(request, store_kind, case):
    store = request.getfixturevalue(store_kind)
    forgery, message = STATE_FORGERIES[case]
    _edit(store, lambda m: _forge(store, _state_record(m), forgery))
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    with pytest.raises(TrajectoryError, match=rf"optimizer/(state|checkpoint)-\d+\.safetensors': .*{message}"):
        _record(store, 2, resume=True, checkpoint_every=3 if store_kind == "sparse" else 1)
    after = {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and not p.name.startswith(".explaind-lock")}
    assert after == {p: b for p, b in before.items() if not p.name.startswith(".explaind-lock")}


def test_a_forged_checkpoint_state_of_a_sparse_store_is_refused_on_load(sparse):
    def first_checkpoint(m):
        return next(r for r in m["steps"] if r.get("optimizer_state") and "checkpoint" in r["optimizer_state"]["path"])
    _edit(sparse, lambda m: _forge(sparse, first_checkpoint(m)["optimizer_state"], _rename("state.99.momentum_buffer")))
    with pytest.raises(TrajectoryError, match=r"checkpoint-\d+\.safetensors': it holds the tensor 'state\.99\."):
        _load_everything(sparse)


# --------------------------------------------------------------------------- overwrite
def test_overwrite_keeps_a_foreign_file_that_a_hand_edited_manifest_names(dense):
    (dense / "notes.txt").write_text("mine")
    _edit(dense, lambda m: m["steps"][0].update(optimizer_state={"path": "notes.txt", "nbytes": 4,
                                                                  "checksum": checksum(b"mine", "xxh3-128")}))
    _record(dense, 1, overwrite=True)
    assert (dense / "notes.txt").read_text() == "mine"
    assert explaind.Trajectory.load(dense, model=_model()).n_steps == 1
