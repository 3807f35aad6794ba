"""What tools do to a store, round 14 (part 2: the index files): a byte-order mark and CRLF line ends together, the
journal and the manifest saved as UTF-16 or UTF-32 by an editor, ``NaN`` and infinities written into a float field,
and the journal's lines reordered by a sort or a merge. Stores are compared as in ``test_store_round14.py``.
"""

from __future__ import annotations

import codecs
import json
import re
import shutil
from pathlib import Path

import pytest
from _round12_kit import (
    STEPS,
    finished_and_live,
    manifest,
    reference,
    resumes_to_the_end,
    salvaged,
    same_run,
    snapshot,
)

from explaind.exceptions import TrajectoryError


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A finished store of ``STEPS`` steps and a copy of it taken after step 3 while it was recorded (its manifest
    lists no step: the journal holds them)."""
    return finished_and_live(tmp_path_factory.mktemp("round14_index"))


@pytest.fixture(params=["finished", "copied while recording"])
def run(request, stores, tmp_path):
    name = "finished" if request.param == "finished" else "live"
    return Path(shutil.copytree(stores / name, tmp_path / name))


def _steps(run: Path) -> int:
    return STEPS if run.name == "finished" else 4


# --------------------------------------------------------------------------- encodings and line ends
def test_a_byte_order_mark_and_crlf_line_ends_together_read_and_resume(run, ref):
    """A Windows editor saved ``manifest.json`` and ``journal.jsonl`` with a UTF-8 byte-order mark and CRLF line ends
    (each alone was tried in round 12): read as the same run, resumed bit for bit. Before: the same."""
    for name in ("manifest.json", "journal.jsonl"):
        (run / name).write_bytes(codecs.BOM_UTF8 + (run / name).read_bytes().replace(b"\n", b"\r\n"))
    assert same_run(run, ref) == _steps(run)
    assert resumes_to_the_end(run, ref) == _steps(run)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_a_journal_saved_as_utf16_or_utf32_is_read_as_the_same_run(run, ref, tmp_path, encoding):
    """An editor's "Unicode" save of ``journal.jsonl`` (UTF-16 with and without a byte-order mark, UTF-32): the same
    text, read as the same run (as the manifest already was), salvaged whole, resumed bit for bit (the resume writes
    the journal anew, in UTF-8). Before: "is corrupted at line 1: ... Invalid JSON ... The store was modified"."""
    journal = run / "journal.jsonl"
    journal.write_bytes(journal.read_bytes().decode().encode(encoding))
    assert same_run(run, ref) == _steps(run)
    assert salvaged(run, tmp_path / "out", ref) == _steps(run)
    assert resumes_to_the_end(run, ref) == _steps(run)
    assert journal.read_bytes().startswith(b'{"step":0,')


def test_a_manifest_saved_as_utf16_is_read_as_the_same_run(stores, tmp_path, ref):
    """The same save of ``manifest.json``: read as the same run and resumed bit for bit. Before: the same."""
    store = Path(shutil.copytree(stores / "finished", tmp_path / "run"))
    (store / "manifest.json").write_bytes((store / "manifest.json").read_bytes().decode().encode("utf-16"))
    assert same_run(store, ref) == STEPS
    assert resumes_to_the_end(store, ref) == STEPS


def test_a_journal_that_only_starts_like_utf16_is_named(stores, tmp_path):
    """A journal with a UTF-16 byte-order mark and an odd number of bytes after it: not UTF-16 text. Refused naming
    the encoding and the fix; salvage proves the steps by their own files. Before: "is corrupted at line 1"."""
    store = Path(shutil.copytree(stores / "live", tmp_path / "run"))
    (store / "journal.jsonl").write_bytes(codecs.BOM_UTF16_LE + b"{\x00}")
    with pytest.raises(TrajectoryError, match=r"journal\.jsonl' starts as UTF-16 text .* but is not: .* Fix: save "
                                              r"journal\.jsonl as UTF-8"):
        same_run(store, None)


# --------------------------------------------------------------------------- non-finite numbers
@pytest.mark.parametrize(("where", "value"), [
    (("steps", 1, "audit"), "NaN"),
    (("steps", 2, "grad_scale"), "Infinity"),
    (("adapter_hyperparameters", "param_groups", 0, "lr"), "-Infinity"),
])
def test_a_non_finite_number_written_into_the_manifest_is_named_with_its_field(stores, tmp_path, where, value):
    """A script wrote ``NaN`` or an infinity into a float field of ``manifest.json`` (Python's ``json.dump`` writes
    them): refused naming the file, the literal, the field and the fix; nothing changed. Before: the same refusal
    without the field."""
    store = Path(shutil.copytree(stores / "finished", tmp_path / "run"))
    data = manifest(store)
    target = data
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = float(value)
    named = where[0] + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in where[1:])
    (store / "manifest.json").write_text(json.dumps(data))
    before = snapshot(store)
    with pytest.raises(TrajectoryError, match=rf"manifest\.json' is not valid JSON: {value} is not a JSON number .*"
                                              rf"\(at {re.escape(named)}\).* restore manifest\.json from a copy"):
        same_run(store, None)
    assert snapshot(store) == before


def test_a_non_finite_number_in_a_journal_line_is_named_with_its_field(stores, tmp_path, ref):
    """The same in a journal line of a copy whose steps only the journal lists: refused naming the line, the field
    and the fix (salvage); salvage keeps every step (that one by its own file). Before: the same without the field."""
    store = Path(shutil.copytree(stores / "live", tmp_path / "run"))
    lines = (store / "journal.jsonl").read_text().splitlines()
    line = json.loads(lines[1])
    line["grad_scale"] = float("-inf")
    lines[1] = json.dumps(line)
    (store / "journal.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TrajectoryError, match=r"corrupted at line 2: -Infinity is not a JSON number .*\(at "
                                              r"grad_scale\)\. .*Trajectory\.salvage\("):
        same_run(store, ref)
    assert salvaged(store, tmp_path / "out", ref) == 4


# --------------------------------------------------------------------------- lines reordered
def test_journal_lines_reordered_are_named_and_salvage_keeps_every_step(stores, tmp_path, ref):
    """``sort`` or a merge of two copies put step 2's journal line before step 1's (a copy whose steps only the
    journal lists): a load names the reordering (step 1 listed later, at line 3) and salvage, which keeps all 4 steps
    by their checksums; the salvaged store resumes bit for bit. Before: "jumps from step 0 to step 2 ... The store was
    modified: restore journal.jsonl from a copy, or re-record the run" (no word of the lines being all there)."""
    store = Path(shutil.copytree(stores / "live", tmp_path / "run"))
    lines = (store / "journal.jsonl").read_bytes().splitlines(keepends=True)
    (store / "journal.jsonl").write_bytes(b"".join(lines[i] for i in (0, 2, 1, 3)))
    with pytest.raises(TrajectoryError, match=r"jumps from step 0 to step 2; allowed: the next step, 1\. It lists step "
                                              r"1 later, at line 3: its lines were reordered .* Trajectory\.salvage\("):
        same_run(store, ref)
    assert salvaged(store, tmp_path / "out", ref) == 4
    assert resumes_to_the_end(tmp_path / "out", ref) == 4


def test_a_journal_whose_first_bytes_were_zeroed_is_not_taken_for_utf16(stores, tmp_path, ref):
    """A file system that zeroed the journal's first 64 bytes (a lost first page; NUL bytes are what a wide encoding
    starts with): named as damaged at line 1 with salvage as the fix, not as an editor's UTF-16 or UTF-32 save;
    salvage keeps every step (step 0 by its own file). Before: the same."""
    store = Path(shutil.copytree(stores / "live", tmp_path / "run"))
    data = (store / "journal.jsonl").read_bytes()
    (store / "journal.jsonl").write_bytes(bytes(64) + data[64:])
    with pytest.raises(TrajectoryError, match=r"journal\.jsonl' is corrupted at line 1: .*salvage\(") as exc:
        same_run(store, ref)
    assert "UTF" not in str(exc.value)
    assert salvaged(store, tmp_path / "out", ref) == 4
