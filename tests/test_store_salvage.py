"""Salvaging a damaged store (docs/recording.md, "Salvaging a damaged store"): every step that can be proven intact
is copied into a new store, the damaged one is never written, and the report says what was kept, how it was
proven, what was dropped and why.

Each salvaged store is compared bit for bit with the uninterrupted run (round 5's reader, after ``verify()``), and
resumed to the end, bit for bit with the uninterrupted longer run. The damaged store is compared byte for byte with
its state before the salvage.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from test_store_round5 import _read_all as _values  # everything a reader gets, after verify()
from test_store_round5 import _same
from test_store_round7 import STEPS, _as_schema_2, _manifest, _record, _write_manifest
from test_store_strangers import _model

import explaind
from explaind.cli import main
from explaind.exceptions import TrajectoryError
from explaind.trajectory.lock import WriterLock


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Round 7's runs; ``dense`` and ``other`` written step by step, so that the two optimizer state slots hold the
    states after steps 2 and 3 whatever the timing (a background writer writes only the newest state of a group)."""
    root = tmp_path_factory.mktemp("salvage")
    _record(root / "dense", STEPS, background_writes=False)
    _record(root / "other", STEPS, shift=0.01, background_writes=False)
    _record(root / "long", 2 * STEPS)
    _record(root / "sparse", 7, checkpoint_every=3)  # checkpoints after steps 5 and 6 (the end)
    _record(root / "sparse_long", 9, checkpoint_every=3)
    return root


def _flip_theta(path: Path) -> None:
    """Flip one bit inside the first parameter of the step file ``path`` (its metadata untouched)."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    begin = min(v["data_offsets"][0] for k, v in header.items() if k.startswith("param."))
    data[8 + size + begin + 3] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def dense(templates, tmp_path):
    return Path(shutil.copytree(templates / "dense", tmp_path / "dense"))


def _snapshot(store: Path) -> dict[str, bytes]:
    """Every file below ``store`` (relative path -> bytes)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _journal_only(store: Path) -> list[bytes]:
    """Leave the steps to the journal (as a crash before the final manifest does); its lines."""
    manifest = _manifest(store)
    manifest.update(steps=[], complete=False)
    _write_manifest(store, manifest)
    return (store / "journal.jsonl").read_bytes().splitlines(keepends=True)


def _salvage(store: Path, out: Path):
    """``Trajectory.salvage``, checking that the damaged store is unchanged byte for byte."""
    before = _snapshot(store)
    report = explaind.Trajectory.salvage(store, out=out)
    assert _snapshot(store) == before
    return report


def _how(report, how: str) -> list[int]:
    return [s for s, h in report.kept if h == how]


def _resumes_to_the_long_run(out: Path, templates: Path) -> None:
    _record(out, 2 * STEPS, resume=True)
    assert _same(_values(out), _values(templates / "long"))


# --------------------------------------------------------------------------- (a) a corrupted line in the middle
def test_a_journal_line_corrupted_in_the_middle_loses_no_step(dense, templates, tmp_path):
    """Before: the whole store was refused ("corrupted at line 2"), its 4 intact steps unreadable. Now step 1 is
    proven by its own file, steps 0, 2, 3 by their checksums; the salvaged store is the run and resumes bit for bit."""
    lines = _journal_only(dense)
    lines[1] = b"#" + lines[1][1:]  # a flipped bit in its first byte
    (dense / "journal.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(TrajectoryError, match=r"corrupted at line 2: .*copy the steps that can be proven intact "
                                              r"into a new store: Trajectory\.salvage\("):
        explaind.Trajectory.load(dense, model=_model())
    report = _salvage(dense, tmp_path / "out")
    assert _how(report, "checksum") == [0, 2, 3] and _how(report, "bound") == [1]
    assert [n for n, _ in report.unreadable_lines] == [2] and report.dropped == []
    assert report.resume_at == STEPS and report.states[-1] == (STEPS - 1, "checksum")
    assert (tmp_path / "out/attributes.json").read_bytes() == (dense / "attributes.json").read_bytes()
    text = str(report)
    assert "kept, proven by their checksums: 0, 2, 3" in text and "no checksum): 1" in text
    assert "unreadable journal line 2" in text
    assert _same(_values(tmp_path / "out"), _values(templates / "dense"))
    _resumes_to_the_long_run(tmp_path / "out", templates)


def test_a_corrupted_line_beside_a_complete_manifest_keeps_every_step_by_its_checksum(dense, templates, tmp_path):
    """Before: refused although the complete manifest lists every step. Now every step is proven by its checksum."""
    lines = (dense / "journal.jsonl").read_bytes().splitlines(keepends=True)
    lines[1] = b"{not json}\n"
    (dense / "journal.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(TrajectoryError, match="corrupted at line 2"):
        explaind.Trajectory.load(dense, model=_model())
    report = _salvage(dense, tmp_path / "out")
    assert _how(report, "checksum") == [0, 1, 2, 3] and _how(report, "bound") == []
    assert _same(_values(tmp_path / "out"), _values(templates / "dense"))


# --------------------------------------------------------------------------- (b) journal lines lost
@pytest.mark.parametrize("keep", [0, 2])
def test_steps_whose_journal_lines_were_lost_are_recovered_from_their_files(dense, templates, tmp_path, keep,
                                                                           caplog):
    """A 0-byte journal (``keep=0``) or one cut in the middle of its third line, beside intact step files. Before:
    a load read ``keep`` steps and warned; the files of the others were neither read nor kept by a resume. Now
    each is proven by its own record and binding, with the optimizer state written after the last one."""
    lines = _journal_only(dense)
    (dense / "journal.jsonl").write_bytes(b"".join(lines[:keep]) + (lines[keep][:40] if keep else b""))
    assert explaind.Trajectory.load(dense, model=_model()).n_steps == keep
    with caplog.at_level(logging.WARNING):
        report = _salvage(dense, tmp_path / "out")
    assert f"steps {', '.join(str(s) for s in range(keep, STEPS))} are proven by their own files only" in caplog.text
    assert f"re-record from step {keep}" in caplog.text
    assert _how(report, "checksum") == list(range(keep)) and _how(report, "bound") == list(range(keep, STEPS))
    assert report.dropped == [] and report.resume_at == STEPS and report.states[-1] == (STEPS - 1, "bound")
    assert _same(_values(tmp_path / "out"), _values(templates / "dense"))
    _resumes_to_the_long_run(tmp_path / "out", templates)


def test_a_journal_that_is_a_directory_leaves_the_steps_to_their_files(dense, templates, tmp_path):
    """``journal.jsonl`` a directory (round 9: a load refuses, naming it): every step is proven by its own file."""
    _journal_only(dense)
    (dense / "journal.jsonl").unlink()
    (dense / "journal.jsonl").mkdir()
    with pytest.raises(TrajectoryError, match="journal"):
        explaind.Trajectory.load(dense, model=_model())
    report = _salvage(dense, tmp_path / "out")
    assert _how(report, "bound") == [0, 1, 2, 3] and report.unreadable_lines[0][0] == 0
    assert "not a regular file" in report.unreadable_lines[0][1]
    assert _same(_values(tmp_path / "out"), _values(templates / "dense"))


# --------------------------------------------------------------------------- damaged and foreign step files
@pytest.mark.parametrize("journal", ["intact", "lost"])
@pytest.mark.parametrize("cut", [2, 3])
def test_a_truncated_step_file_ends_the_salvage_before_it(dense, templates, tmp_path, journal, cut):
    """Step ``cut``'s file cut to half: the steps before it are kept; it is dropped naming its file, and the steps
    after it because they follow it. The slots hold the states after steps 2 and 3: cut at 2, the states after
    steps 0 and 1 were replaced and a resume starts from step 0; cut at 3, it continues after step 2."""
    if journal == "lost":
        _journal_only(dense)
        (dense / "journal.jsonl").write_bytes(b"")
    path = dense / f"steps/{cut:06d}.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    report = _salvage(dense, tmp_path / "out")
    assert [s for s, _ in report.kept] == list(range(cut))
    assert [s for s, _ in report.dropped] == list(range(cut, STEPS))
    assert f"{cut:06d}.safetensors" in report.dropped[0][1]
    assert all(f"follows step {cut}" in why for _, why in report.dropped[1:])
    assert report.resume_at == (0 if cut == 2 else 3)
    assert not (tmp_path / "out/attributes.json").exists()  # it describes step 3, which the new store lacks
    kept = explaind.Trajectory.load(tmp_path / "out", model=_model())
    assert kept.n_steps == cut
    reference = explaind.Trajectory.load(templates / "dense", model=_model())
    assert _same([t for s in range(cut + 1) for t in kept.params(s).values()],
                 [t for s in range(cut + 1) for t in reference.params(s).values()])
    _resumes_to_the_long_run(tmp_path / "out", templates)


@pytest.mark.parametrize("journal", ["intact", "lost"])
def test_a_step_file_of_another_run_is_dropped_naming_both_runs(dense, templates, tmp_path, journal):
    """Step 2's file replaced by the same step of another run with the same shapes: with its journal line the
    checksum fails; without it the file's run binding names the other run. Steps 0 and 1 are kept."""
    if journal == "lost":
        _journal_only(dense)
        (dense / "journal.jsonl").write_bytes(b"")
    shutil.copyfile(templates / "other/steps/000002.safetensors", dense / "steps/000002.safetensors")
    report = _salvage(dense, tmp_path / "out")
    assert [s for s, _ in report.kept] == [0, 1] and [s for s, _ in report.dropped] == [2, 3]
    reason = report.dropped[0][1]
    if journal == "lost":
        assert _manifest(templates / "other")["run_id"] in reason and _manifest(dense)["run_id"] in reason
    else:
        assert "checksum" in reason
    _resumes_to_the_long_run(tmp_path / "out", templates)


def test_a_step_file_with_a_flipped_bit_is_not_taken_on_its_binding_when_its_record_parses(dense, tmp_path):
    """A flipped bit in step 1's theta: its journal line parses and its checksum fails, so its file is not taken on
    its own binding (which the flip does not touch); steps 1 to 3 are dropped."""
    _flip_theta(dense / "steps/000001.safetensors")
    report = _salvage(dense, tmp_path / "out")
    assert [s for s, _ in report.kept] == [0] and [s for s, _ in report.dropped] == [1, 2, 3]
    assert "checksum" in report.dropped[0][1]


def test_a_flipped_bit_in_a_step_file_without_its_journal_line_is_not_found(dense, templates, tmp_path):
    """The limit of a step proven by its binding alone (docs/recording.md): its own checksum was only in the lost
    line, so a flipped bit in its theta is kept, and the report says the step has no checksum."""
    _journal_only(dense)
    (dense / "journal.jsonl").write_bytes(b"")
    _flip_theta(dense / "steps/000003.safetensors")
    report = _salvage(dense, tmp_path / "out")
    assert _how(report, "bound") == [0, 1, 2, 3]
    assert not _same(_values(tmp_path / "out"), _values(templates / "dense"))


def test_a_journal_record_that_contradicts_its_intact_file_ends_the_salvage(dense, tmp_path):
    """Step 1's journal line edited (its gradient scale), still valid JSON: its file matches its checksum but holds
    another record, so which of them is the run cannot be told; step 1 is not taken on its binding either."""
    lines = _journal_only(dense)
    record = json.loads(lines[1])
    record["grad_scale"] = 2 * record["grad_scale"]
    lines[1] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    (dense / "journal.jsonl").write_bytes(b"".join(lines))
    report = _salvage(dense, tmp_path / "out")
    assert [s for s, _ in report.kept] == [0] and [s for s, _ in report.dropped] == [1, 2, 3]
    assert "differs from the one checksummed in" in report.dropped[0][1]


def test_a_store_of_schema_2_keeps_only_the_steps_before_a_corrupted_line(dense, templates, tmp_path):
    """Its step files bind no run, so a step whose journal line is corrupted cannot be proven by its file: step 0 is
    kept by its checksum, step 1 dropped naming schema 3, steps 2 and 3 as following it."""
    _as_schema_2(dense)
    lines = _journal_only(dense)
    lines[1] = b"#" + lines[1][1:]
    (dense / "journal.jsonl").write_bytes(b"".join(lines))
    report = _salvage(dense, tmp_path / "out")
    assert _how(report, "checksum") == [0] and [s for s, _ in report.dropped] == [1, 2, 3]
    assert "written before schema 3" in report.dropped[0][1]
    kept = explaind.Trajectory.load(tmp_path / "out", model=_model())
    reference = explaind.Trajectory.load(templates / "dense", model=_model())
    assert kept.n_steps == 1 and _same(list(kept.params(1).values()), list(reference.params(1).values()))


# --------------------------------------------------------------------------- sparse stores
@pytest.fixture
def sparse(templates, tmp_path):
    return Path(shutil.copytree(templates / "sparse", tmp_path / "sparse"))


def test_a_sparse_store_with_a_corrupted_line_beside_its_complete_manifest_keeps_every_step(sparse, templates,
                                                                                           tmp_path):
    lines = (sparse / "journal.jsonl").read_bytes().splitlines(keepends=True)
    lines[3] = b"#" + lines[3][1:]
    (sparse / "journal.jsonl").write_bytes(b"".join(lines))
    report = _salvage(sparse, tmp_path / "out")
    assert _how(report, "checksum") == list(range(7)) and report.resume_at == 7
    assert _same(_values(tmp_path / "out"), _values(templates / "sparse"))


def test_a_damaged_checkpoint_state_ends_the_salvage_after_its_step(sparse, templates, tmp_path):
    """The checkpoint state after step 5 with a flipped bit: step 5 is kept (its file holds theta_6), step 6, which
    is replayed from that state, dropped naming the file; a resume starts from step 0 and equals the longer run."""
    path = sparse / "optimizer/checkpoint-000005.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    report = _salvage(sparse, tmp_path / "out")
    assert _how(report, "checksum") == [0, 1, 2, 3, 4, 5] and [s for s, _ in report.dropped] == [6]
    assert "checkpoint-000005.safetensors" in report.dropped[0][1] and report.resume_at == 0
    _record(tmp_path / "out", 9, checkpoint_every=3, resume=True)
    assert _same(_values(tmp_path / "out"), _values(templates / "sparse_long"))


# --------------------------------------------------------------------------- refusals
def test_nothing_to_prove_is_refused_naming_the_file_and_nothing_is_written(dense, tmp_path):
    """A schema-2 store (its step files bind no run) with a 0-byte journal: no step can be proven."""
    _as_schema_2(dense)
    _journal_only(dense)
    (dense / "journal.jsonl").write_bytes(b"")
    before = _snapshot(dense)
    with pytest.raises(TrajectoryError, match=r"not even step 0 .*schema 3.*000000\.safetensors"):
        explaind.Trajectory.salvage(dense, out=tmp_path / "out")
    assert _snapshot(dense) == before and not (tmp_path / "out").exists()


def test_a_damaged_start_file_or_no_manifest_is_refused_naming_it(dense, tmp_path):
    (dense / "initial.safetensors").write_bytes(b"")
    with pytest.raises(TrajectoryError, match=r"start file 'initial.safetensors' \(initial_file\)"):
        _salvage(dense, tmp_path / "out")
    (dense / "manifest.json").unlink()
    with pytest.raises(TrajectoryError, match="it has no manifest.json"):
        _salvage(dense, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_output_inside_the_store_or_not_empty_is_refused(dense, tmp_path):
    with pytest.raises(TrajectoryError, match="inside the damaged one"):
        _salvage(dense, dense / "salvaged")
    (tmp_path / "link").symlink_to(dense / "steps")
    with pytest.raises(TrajectoryError, match="inside the damaged one"):
        _salvage(dense, tmp_path / "link" / "salvaged")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(TrajectoryError, match="exists and is not an empty directory"):
        _salvage(dense, tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["x"]


def test_a_store_a_recorder_is_writing_is_refused_naming_the_process(dense, tmp_path):
    lock = WriterLock(dense).acquire()
    try:
        with pytest.raises(TrajectoryError, match=rf"being written by process {os.getpid()} "):
            explaind.Trajectory.salvage(dense, out=tmp_path / "out")
    finally:
        lock.release()
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the command line
def test_the_command_line_salvages_and_reports(dense, templates, tmp_path, capsys, caplog):
    _journal_only(dense)
    (dense / "journal.jsonl").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        code = main(["salvage", str(dense), "--out", str(tmp_path / "out"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and [s for s, _ in data["kept"]] == [0, 1, 2, 3] and data["resume_at"] == STEPS
    assert _same(_values(tmp_path / "out"), _values(templates / "dense"))
    code = main(["salvage", str(dense), "--out", str(tmp_path / "out")])
    assert code == 2 and "exists and is not an empty directory" in capsys.readouterr().err
