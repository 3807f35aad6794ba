"""A long store's index opens lean (docs/recording.md, "The store"): its steps held in columns, read a block at a time.

Every record a read returns is compared with an independent parse of the files (``json.loads`` of the manifest
and of each journal line); stores a tool changed (CRLF lines, a journal that differs from the manifest, a torn
line, a hand-edited manifest) are read as before, through the careful reader; a store of 20,000 steps is opened
within a bound on Python's allocations that the per-step pydantic objects exceeded fivefold.
"""

from __future__ import annotations

import json
import logging
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory._lean_index import BLOCK, lean_index
from explaind.trajectory._steps import StepIndex
from explaind.trajectory.manifest import FileRecord, StepRecord, TrajectoryManifest
from explaind.trajectory.store import read_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_store_index import _long_store, _model, _recorded  # noqa: E402  (the benchmark's stores)

STEPS = 7


def _record(tmp: Path) -> tuple[Path, torch.nn.Module]:
    """A recorded run of STEPS steps (the benchmark's SGD run of a 4-8-2 tanh MLP) and its trained model."""
    return tmp / "run", _recorded(tmp / "run", STEPS)


def _reference(root: Path) -> list[dict]:
    """The step records as plain JSON, parsed independently: the manifest's list, then the journal's later lines."""
    steps = json.loads((root / "manifest.json").read_bytes())["steps"]
    journal = root / "journal.jsonl"
    for line in journal.read_bytes().splitlines() if journal.exists() else []:
        if line.strip():
            record = json.loads(line)
            if record["step"] == len(steps):
                steps.append(record)
    return steps


def _as_json(records) -> list[dict]:
    return [json.loads(r.model_dump_json()) for r in records]


def test_a_recorded_store_is_read_lean_and_equals_an_independent_parse(tmp_path):
    root, model = _record(tmp_path)
    manifest = read_manifest(root)
    assert isinstance(manifest.steps, StepIndex)
    assert lean_index(root, (root / "manifest.json").read_bytes()) is not None  # no fallback for explaind's own files
    assert manifest.n_steps == STEPS == len(manifest.steps)
    assert _as_json(manifest.steps) == _reference(root)
    assert manifest.to_json() == (root / "manifest.json").read_bytes()  # written back: the same bytes
    traj = explaind.Trajectory.load(root, model=_model())
    assert traj.n_steps == STEPS
    trained = dict(model.named_parameters())
    assert all(torch.equal(theta, trained[name]) for name, theta in traj.params(STEPS).items())
    assert traj.grad_scale(3) == json.loads((root / "journal.jsonl").read_bytes().splitlines()[3])["grad_scale"]
    traj.verify()


def test_a_crashed_store_reads_its_steps_from_the_journal(tmp_path):
    root, _ = _record(tmp_path)
    manifest = json.loads((root / "manifest.json").read_bytes())
    manifest["steps"], manifest["n_steps"], manifest["complete"] = [], 0, False
    data = TrajectoryManifest.model_validate(manifest).to_json()
    (root / "manifest.json").write_bytes(data)  # as at a crash: the manifest of the set-up, the journal of all steps
    assert lean_index(root, data) is not None
    assert _as_json(read_manifest(root).steps) == _reference(root)


@pytest.mark.parametrize("edit", ["crlf", "other_record", "short_journal", "torn_line", "spaced_manifest"])
def test_a_store_other_tools_changed_is_read_as_before(tmp_path, edit, caplog):
    """Each change makes the lean read give way to the careful one (a shorter journal excepted: its lines are compared
    with the manifest's records as they are), which reads the manifest's records."""
    root, _ = _record(tmp_path)
    journal = (root / "journal.jsonl").read_bytes()
    lines = journal.splitlines(keepends=True)
    if edit == "crlf":
        (root / "journal.jsonl").write_bytes(journal.replace(b"\n", b"\r\n"))
    elif edit == "other_record":  # a valid record of step 2 that differs from the manifest's (which is read)
        (root / "journal.jsonl").write_bytes(b"".join(lines[:2] + [lines[2].replace(b'"n_samples":4', b'"n_samples":3')]
                                                      + lines[3:]))
    elif edit == "short_journal":
        (root / "journal.jsonl").write_bytes(b"".join(lines[:3]))
    elif edit == "torn_line":
        (root / "journal.jsonl").write_bytes(journal + lines[0][:30])
    else:  # indented by 2, as an editor reformats it
        (root / "manifest.json").write_bytes(json.dumps(json.loads((root / "manifest.json").read_bytes()),
                                                        indent=2).encode())
    data = (root / "manifest.json").read_bytes()
    assert (lean_index(root, data) is None) == (edit != "short_journal")  # a journal's first lines: compared, read lean
    with caplog.at_level(logging.WARNING):
        manifest = read_manifest(root)
    assert isinstance(manifest.steps, StepIndex)
    assert _as_json(manifest.steps) == json.loads(json.dumps(json.loads(data)["steps"]))
    assert ("incomplete last line" in caplog.text) == (edit == "torn_line")


@pytest.mark.parametrize("where", ["manifest", "journal"])
def test_a_repeated_key_in_a_long_index_is_refused_as_before(tmp_path, where):
    """A key given twice in one record of block 2 (past the first BLOCK records): the careful reader's error."""
    root = _long_store(tmp_path / "long", BLOCK + 10)
    name = "manifest.json" if where == "manifest" else "journal.jsonl"
    data = (root / name).read_bytes()
    at = data.find(b'"n_samples"', data.find(f'"step": {BLOCK + 3},'.encode() if where == "manifest"
                                             else f'"step":{BLOCK + 3},'.encode()))
    spaced = b'"n_samples": 4, ' if where == "manifest" else b'"n_samples":4,'
    (root / name).write_bytes(data[:at] + spaced + data[at:])
    with pytest.raises(TrajectoryError, match="appears twice"):
        read_manifest(root)


def test_an_invalid_record_in_a_long_manifest_is_named_as_before(tmp_path):
    """A negative count at step BLOCK + 3: the careful reader's message names the field of that step."""
    root = _long_store(tmp_path / "long", BLOCK + 10)
    data = (root / "manifest.json").read_bytes()
    at = data.find(b'"n_samples": 4', data.find(f'"step": {BLOCK + 3},'.encode()))
    (root / "manifest.json").write_bytes(data[:at] + b'"n_samples": -4' + data[at + len(b'"n_samples": 4'):])
    with pytest.raises(TrajectoryError, match=f"is invalid: steps.{BLOCK + 3}.n_samples = -4"):
        read_manifest(root)


def _big_file(path: str, nbytes: int, **checksum: str) -> FileRecord:
    return FileRecord(path=path, nbytes=nbytes, **checksum)


def test_step_index_columns_give_back_every_field():
    """Records of all field kinds (None and set, sha256 files, counts past 2**63) built back equal, field sets too."""
    records = [
        StepRecord(step=0, file=_big_file("steps/000000.safetensors", 10, checksum="xxh3-128:" + "0" * 32),
                   n_samples=3, grad_scale=0.5, audit=None, loss_scale=2.0, gradient_check=None, amp_scale=65536.0,
                   autocast="bfloat16", has_params=True, optimizer_state=None, buffers=True, audit_state=None),
        StepRecord(step=1, file=_big_file("elsewhere/x.safetensors", 2**64 + 5, sha256="a" * 64),
                   n_samples=2**70, grad_scale=-1e-300, audit=1e300, loss_scale=None, gradient_check=0.0,
                   amp_scale=None, autocast=None, has_params=False,
                   optimizer_state=_big_file("optimizer/state-0.safetensors", 7, checksum="sha256:" + "b" * 64),
                   buffers=False, audit_state=_big_file("optimizer/state-1.safetensors", 0, sha256="c" * 64)),
        StepRecord(step=2, n_samples=0, grad_scale=1.0),
    ]
    records = [StepRecord.model_validate_json(r.model_dump_json()) for r in records]  # as a store's JSON holds them
    index = StepIndex(records)
    assert len(index) == 3 and list(index) == records and index == records
    for built, given in zip(index, records, strict=True):
        assert built.model_dump_json() == given.model_dump_json()
        assert built.model_fields_set == given.model_fields_set
        for name in ("file", "optimizer_state", "audit_state"):
            a, b = getattr(built, name), getattr(given, name)
            assert (a is None and b is None) or a.model_fields_set == b.model_fields_set
    assert index[-1] == records[2] and index[:2] == records[:2] and isinstance(index[:2], StepIndex)
    assert index[1:] == records[1:] and index.has_params() == [True, False, True]
    with pytest.raises(IndexError, match="steps 0 to 2"):
        index[3]
    with pytest.raises(ValueError, match="step 5 given where step 3 comes next"):
        index.append(StepRecord(step=5, n_samples=0, grad_scale=1.0))
    unheld = StepRecord.model_construct(step=3, n_samples=1, grad_scale=1.0, buffers="yes")  # no column holds "yes"
    with pytest.raises(KeyError):
        index.extend([StepRecord(step=3, n_samples=5, grad_scale=2.0), unheld.model_copy(update={"step": 4})])
    assert len(index) == 3 and list(index) == records  # nothing half added
    index.append(StepRecord.model_validate_json(StepRecord(step=3, n_samples=5, grad_scale=2.0).model_dump_json()))
    assert index[3].n_samples == 5 and len(index) == 4
    index = index[:3]
    manifest = TrajectoryManifest(steps=records)
    written = manifest.to_json()
    manifest.steps = index
    assert manifest.to_json() == written  # a StepIndex is written as the list it stands for


def test_a_long_store_opens_within_a_memory_bound(tmp_path):
    """20,000 steps: Python's peak allocation of reading the index stays under 2.5 times the bytes of its two files
    (a pydantic record per step and per file record took 7.3 times: docs/recording.md, "The store")."""
    root = _long_store(tmp_path / "long", 20_000)
    size = (root / "manifest.json").stat().st_size + (root / "journal.jsonl").stat().st_size
    tracemalloc.start()
    try:
        manifest = read_manifest(root)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert manifest.n_steps == 20_000
    assert _as_json(manifest.steps[19_990:]) == _reference(root)[19_990:]
    assert peak < 2.5 * size, f"peak {peak / 1e6:.1f} MB for {size / 1e6:.1f} MB of index"
