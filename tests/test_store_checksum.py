"""The store's checksums: XXH3-128 by default (schema 2), SHA-256 stores of schema 1 still read and resumed.

A bit of every fifth byte (and of the last) of every file of a store written with the default is
flipped, one at a time, and each flip must be a ``TrajectoryError``; a schema-1 store (SHA-256,
``FileRecord.sha256``) is made the way the previous explaind wrote it and must read, verify,
detect corruption and resume bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pytest
import torch
import xxhash
from _recording_helpers import resumable_reference, resumable_setup, resumable_step

import explaind
from explaind.exceptions import ConfigError, TrajectoryError
from explaind.trajectory import Trajectory, _checksum, _recorder_store
from explaind.trajectory._io import read_verified_bytes
from explaind.trajectory.manifest import SCHEMA_VERSION, FileRecord, TrajectoryManifest
from explaind.trajectory.store import StoreWriter, read_manifest

STEPS = 6


def _record(store: Path, steps: int = STEPS, *, resume: bool = False) -> None:
    """The resume tests' Adam run, steps ``0 .. steps-1`` (from the stored end when ``resume``)."""
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, resume=resume)
    start = rec.restore() if resume else 0
    with rec:
        for s in range(start, steps):
            resumable_step(model, opt, X, y, s, rec)


def _records(store: Path) -> list[FileRecord]:
    """The records of the files the store holds: start files, step files, the newest optimizer state.

    A dense store writes the optimizer state into two alternating slots, so the records of older
    steps name files that were written again since.
    """
    m = read_manifest(store)
    out = [r for r in (m.initial_file, m.constants_file, m.data_file) if r is not None]
    out += [step.file for step in m.steps]
    return out + [m.steps[-1].optimizer_state]


def _same_as_reference(traj, ref, n: int) -> None:
    for s in range(n + 1):
        for k, v in ref.params(s).items():
            assert torch.equal(traj.params(s)[k], v), (s, k)
    for s in range(n):
        assert torch.equal(traj.batch(s)[0], ref.batch(s)[0]) and traj.grad_scale(s) == ref.grad_scale(s)
        for k, u in ref.updates(s).items():
            assert torch.equal(torch.as_tensor(traj.updates(s)[k].P), torch.as_tensor(u.P)), (s, k)


def test_the_default_checksum_is_xxh3_128_of_every_file(tmp_path):
    store = tmp_path / "run"
    _record(store)
    records = _records(store)
    assert read_manifest(store).schema_version == SCHEMA_VERSION == 3
    assert {"initial.safetensors", "data.safetensors", "steps/000005.safetensors"} <= {r.path for r in records}
    for r in records:  # the digest recomputed here with the xxhash package, not the store's code
        data = (store / r.path).read_bytes()
        assert r.sha256 is None and r.nbytes == len(data)
        assert r.checksum == "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()
    raw = json.loads((store / "manifest.json").read_text())
    assert set(raw["initial_file"]) == {"path", "nbytes", "checksum"}  # the unset sha256 is not written


def test_flipped_bits_all_over_every_stored_file_are_detected(tmp_path):
    store = tmp_path / "run"
    _record(store, steps=2)
    records = _records(store)
    kinds = {r.path.split("/")[0] for r in records}
    assert kinds >= {"initial.safetensors", "data.safetensors", "steps", "optimizer"}
    flips = 0
    for r in records:
        path = store / r.path
        original = path.read_bytes()
        read_verified_bytes(store, r)  # intact: reads
        for i in [*range(0, len(original), 5), len(original) - 1]:  # header, tensors, padding, last byte
            bad = bytearray(original)
            bad[i] ^= 1 << (i % 8)
            path.write_bytes(bytes(bad))
            with pytest.raises(TrajectoryError, match=r"is corrupted: its xxh3-128 checksum"):
                read_verified_bytes(store, r)
            flips += 1
        for wrong in (original[:-1], original + b"\0"):
            path.write_bytes(wrong)
            with pytest.raises(TrajectoryError, match=r"truncated or was modified|more than the"):
                read_verified_bytes(store, r)
        path.write_bytes(original)
    assert flips == sum(len(range(0, r.nbytes, 5)) + 1 for r in records)
    Trajectory.load(store, model=resumable_setup()[0]).verify()  # every file restored: the store verifies


def _as_schema_1(store: Path) -> None:
    """Rewrite a store written with SHA-256 checksums in the previous explaind's format (schema 1).

    Schema 1 recorded a file as ``{"path", "sha256": <hex>, "nbytes"}`` and had no ``checksum``.
    """
    def old(value):
        if isinstance(value, dict):
            value = {k: old(v) for k, v in value.items()}
            if "checksum" in value:
                algorithm, digest = value.pop("checksum").split(":")
                assert algorithm == "sha256"
                value["sha256"] = digest
            return value
        return [old(v) for v in value] if isinstance(value, list) else value

    manifest = old(json.loads((store / "manifest.json").read_text()))
    manifest["schema_version"] = 1
    (store / "manifest.json").write_text(json.dumps(manifest, indent=1))
    lines = (store / "journal.jsonl").read_text().splitlines()
    (store / "journal.jsonl").write_text("".join(json.dumps(old(json.loads(line))) + "\n" for line in lines))


@pytest.fixture
def schema_1_store(tmp_path, monkeypatch):
    """A store of STEPS steps written with SHA-256 and rewritten as schema 1 (the store of an older explaind)."""
    store = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(_recorder_store, "StoreWriter", functools.partial(StoreWriter, checksum="sha256"))
        _record(store)
    _as_schema_1(store)
    raw = json.loads((store / "manifest.json").read_text())
    assert raw["schema_version"] == 1 and set(raw["steps"][0]["file"]) == {"path", "sha256", "nbytes"}
    for r in _records(store):
        assert r.checksum is None and r.sha256 == hashlib.sha256((store / r.path).read_bytes()).hexdigest()
    return store


def test_a_schema_1_store_reads_verifies_and_detects_corruption(schema_1_store):
    store = schema_1_store
    traj = Trajectory.load(store, model=resumable_setup()[0])
    assert traj.manifest.schema_version == 1 and traj.n_steps == STEPS
    traj.verify()
    _same_as_reference(traj, resumable_reference(STEPS), STEPS)
    path = store / "steps" / "000003.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(TrajectoryError, match=r"000003\.safetensors' \(step 3\) is corrupted: its sha256 checksum"):
        Trajectory.load(store, model=resumable_setup()[0]).verify()


def test_a_schema_1_store_resumes_to_the_uninterrupted_run(schema_1_store):
    store, total = schema_1_store, STEPS + 4
    _record(store, steps=total, resume=True)
    m = read_manifest(store)
    assert m.schema_version == SCHEMA_VERSION and m.complete and m.n_steps == total
    old = [s.file for s in m.steps[:STEPS]]
    new = [s.file for s in m.steps[STEPS:]]
    assert all(r.sha256 is not None and r.checksum is None for r in old)  # kept as they were written
    assert all(r.checksum.startswith("xxh3-128:") and r.sha256 is None for r in new)
    traj = Trajectory.load(store, model=resumable_setup()[0])
    traj.verify()
    _same_as_reference(traj, resumable_reference(total), total)


@pytest.mark.parametrize("record, problem", [
    ({"path": "a", "nbytes": 1}, "exactly one of 'checksum' and 'sha256'"),
    ({"path": "a", "nbytes": 1, "checksum": "xxh3-128:" + "0" * 32, "sha256": "0" * 64}, "exactly one"),
    ({"path": "a", "nbytes": 1, "checksum": "md5:" + "0" * 32}, "does not start with one of"),
    ({"path": "a", "nbytes": 1, "checksum": "xxh3-128:" + "0" * 31}, "32 lowercase hex digits"),
    ({"path": "a", "nbytes": 1, "checksum": "xxh3-128:" + "G" * 32}, "32 lowercase hex digits"),
])
def test_a_manifest_with_a_bad_file_record_is_refused(tmp_path, record, problem):
    store = tmp_path / "run"
    _record(store, steps=1)
    raw = json.loads((store / "manifest.json").read_text())
    raw["initial_file"] = record
    (store / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(TrajectoryError, match=rf"manifest .* is invalid:[\s\S]*{problem}"):
        read_manifest(store)


def test_an_unknown_algorithm_is_a_config_error_naming_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"checksum='crc32' is not allowed\. Choose one of \['sha256', 'xxh3-128'\]"):
        StoreWriter(tmp_path, TrajectoryManifest(), checksum="crc32")  # refused before anything is opened
    assert not any(tmp_path.iterdir())
    assert _checksum.checksum(b"abc", "sha256") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
