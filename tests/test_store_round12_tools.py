"""Stores that travel, round 12 (part 2: other tools' hands on the files): git's autocrlf on the journal, the manifest
and a tensor file, a manifest reformatted by an editor or ``jq .``, JSON re-serialised with numbers printed otherwise
or rounded, safetensors files re-saved by ``safetensors.torch.save_file`` (another header order, no metadata,
another dtype), modification times reset, a store extracted from a zip or tar archive with its modes lost, and file
names whose case changed.

docs/recording.md, "Stores that travel, round 12", lists each case with what explaind did before. A store read as
the same run equals the uninterrupted run recorded in memory bit for bit (``_round12_kit.same_run``), and resumed,
the uninterrupted longer run.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from _round12_kit import STEPS, finished_and_live, load, manifest, reference, resumes_to_the_end, same_run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from explaind.exceptions import TrajectoryError


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A finished store of ``STEPS`` steps and a copy of it taken after step 3 while it was recorded (its manifest
    lists no step: the journal holds them)."""
    return finished_and_live(tmp_path_factory.mktemp("stores"))


@pytest.fixture
def store(stores, tmp_path):
    return Path(shutil.copytree(stores / "finished", tmp_path / "run"))


@pytest.fixture
def live(stores, tmp_path):
    return Path(shutil.copytree(stores / "live", tmp_path / "live"))


# --------------------------------------------------------------------------- line ends
@pytest.mark.parametrize("which", ["finished", "copied while recording"])
def test_autocrlf_on_the_journal_and_the_manifest_reads_and_resumes(store, live, ref, which):
    """git's ``core.autocrlf`` turned ``\\n`` into ``\\r\\n`` in ``journal.jsonl`` and ``manifest.json`` (of a
    finished store, and of one whose steps only the journal lists): read as the same run, resumed bit for bit. Before:
    the same."""
    run = store if which == "finished" else live
    for name in ("journal.jsonl", "manifest.json"):
        (run / name).write_bytes((run / name).read_bytes().replace(b"\n", b"\r\n"))
    assert same_run(run, ref) == (STEPS if which == "finished" else 4)
    assert resumes_to_the_end(run, ref) == (STEPS if which == "finished" else 4)


def test_line_ends_converted_in_a_tensor_file_are_named(store):
    """A ``* text`` attribute made git convert step 2's file too: refused naming the conversion and the fix (mark
    ``*.safetensors`` binary). Before: "has 2853 bytes, more than the 2848 the store allows for it; it was modified.
    Re-record the run." (no cause)."""
    path = store / "steps" / "000002.safetensors"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    with pytest.raises(TrajectoryError, match=r"000002\.safetensors.* Cause: its line ends were converted from LF to "
                                              r"CRLF .*'\*\.safetensors binary' in \.gitattributes"):
        load(store).verify()


# --------------------------------------------------------------------------- JSON re-written by other tools
def _escaped(text: str) -> str:
    """Every letter of the string values escaped as ``\\uXXXX`` (what some serialisers write)."""
    return "".join(f"\\u{ord(c):04x}" if c.isalpha() else c for c in text)


EDITS = {
    "jq . (indent 2, trailing newline)": lambda m: json.dumps(m, indent=2) + "\n",
    "an editor (indent 4, keys sorted, BOM)": lambda m: "\ufeff" + json.dumps(m, indent=4, sort_keys=True),
    "\\u escapes": lambda m: json.dumps(m).replace('"mse"', f'"{_escaped("mse")}"').replace(
        '"float64"', f'"{_escaped("float64")}"'),
    "numbers spelled otherwise (1e-8, 1 for 1.0, 0.01 with 20 digits)": lambda m: json.dumps(m).replace(
        "1e-08", "1e-8").replace(": 1.0,", ": 1,").replace('"lr": 0.01,', '"lr": 0.010000000000000000208,'),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_manifest_rewritten_by_another_tool_reads_the_same_run(store, ref, edit):
    """``manifest.json`` re-serialised: indentation, key order, ``\\u`` escapes, a trailing newline, a byte-order
    mark, numbers spelled otherwise (each one the same float64): read as the same run and resumed bit for bit.
    Before: the same."""
    text = EDITS[edit](manifest(store))
    assert text.encode() != (store / "manifest.json").read_bytes()
    (store / "manifest.json").write_text(text, encoding="utf-8")
    assert same_run(store, ref) == STEPS
    assert resumes_to_the_end(store, ref) == STEPS


def test_a_journal_rewritten_with_numbers_spelled_otherwise_reads_the_same_run(live, ref):
    """``journal.jsonl`` of a copy taken mid-run re-serialised by a tool that writes ``1.0`` as ``1`` and sorts keys
    (a JavaScript ``JSON.stringify`` round trip): the same run, resumed bit for bit. Before: the same."""
    lines = [json.loads(line) for line in (live / "journal.jsonl").read_text().splitlines()]
    text = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")).replace(":1.0,", ":1,") + "\n" for r in lines)
    assert ":1," in text
    (live / "journal.jsonl").write_text(text)
    assert same_run(live, ref) == 4
    assert resumes_to_the_end(live, ref) == 4


def test_numbers_rounded_by_a_tool_are_refused_naming_the_field(store):
    """A tool printed the manifest's numbers with 6 significant digits (each step's ``audit`` changed): refused at
    the first step read, naming the field with both values and the fix. Before: "differs from the one checksummed ...
    the store was modified. Re-record the run." (no field)."""
    m = manifest(store)
    for step in m["steps"]:
        step["audit"] = float(f"{step['audit']:.6g}")
    (store / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(TrajectoryError, match=r"differs from the one checksummed .*\(audit: .* in the step file, .* in "
                                              r"the index; a tool that re-wrote the JSON printing numbers with fewer "
                                              r"digits.*Fix: restore manifest\.json and journal\.jsonl"):
        load(store).params(1)


# --------------------------------------------------------------------------- safetensors files re-saved
def _resave(path: Path, convert=lambda t: t, keep_metadata: bool = False) -> None:
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    save_file({k: convert(v) for k, v in reversed(list(tensors.items()))}, path,
              metadata=metadata if keep_metadata else None)


RESAVES = {
    "the same tensors, another order, no metadata": (lambda p: _resave(p), r"a valid safetensors file \(F64, I64\) "
                                                     r"with other bytes than recorded: re-saved by another tool"),
    "as float32, no metadata": (lambda p: _resave(p, lambda t: t.float() if t.is_floating_point() else t),
                                r"a valid safetensors file \(F32, I64\) with other bytes than recorded"),
    "the same tensors and metadata, another order": (lambda p: _resave(p, keep_metadata=True),
                                                     r"a safetensors file of step 2 with other bytes .* or one "
                                                     r"re-saved by another tool"),
}


@pytest.mark.parametrize("how", list(RESAVES))
def test_a_step_file_resaved_by_safetensors_is_refused_naming_the_tool(store, how):
    """Step 2's file re-saved by ``safetensors.torch.save_file``: its values are never taken (a float32 copy would
    change them); the error names the file, the re-save and the fix. Before: "is truncated or was modified: it has
    1656 bytes, the manifest recorded 2848." (no cause)."""
    make, cause = RESAVES[how]
    make(store / "steps" / "000002.safetensors")
    with pytest.raises(TrajectoryError, match=r"000002\.safetensors' \(step 2\) is (truncated|corrupted).*" + cause):
        load(store).params(3)


def test_a_resaved_start_file_with_the_same_bytes_is_the_same_run(store, ref):
    """``initial.safetensors`` (no metadata) re-saved by ``save_file`` in the same order: the same bytes, so the
    same run. Before: the same."""
    path = store / "initial.safetensors"
    data = path.read_bytes()
    save_file(load_file(path), path)
    assert path.read_bytes() == data
    assert same_run(store, ref) == STEPS


# --------------------------------------------------------------------------- times, modes, archives, names
def _zip_round_trip(store: Path, out: Path) -> Path:
    shutil.make_archive(str(out.with_suffix("")), "zip", store)
    with zipfile.ZipFile(out.with_suffix(".zip")) as z:
        z.extractall(out)  # Python's zipfile sets neither modes nor times
    return out


def _tar_round_trip(store: Path, out: Path) -> Path:
    with tarfile.open(out.with_suffix(".tar"), "w") as t:
        t.add(store, arcname=".")
    with tarfile.open(out.with_suffix(".tar")) as t:
        t.extractall(out, filter="data")  # the 'data' filter drops modes beyond rw for the owner
    return out


def _touched(store: Path, out: Path) -> Path:
    shutil.copytree(store, out)
    for p in out.rglob("*"):
        os.utime(p, (0, 0))  # 1970, as an unzip of a zip without times gives
    return out


@pytest.mark.parametrize("how", [_zip_round_trip, _tar_round_trip, _touched], ids=["zip", "tar", "touch"])
@pytest.mark.parametrize("which", ["finished", "copied while recording"])
def test_archives_and_reset_times_and_modes_read_and_resume(store, live, tmp_path, ref, how, which):
    """A store through a zip or tar archive (modes lost, times reset), or with every time set to 1970, its files then
    made read-only (0444): read as the same run and resumed bit for bit (the tests run as root, for whom 0444 does not
    stop a write; the writer replaces files by renames, which need only the directory's permission). Before: the
    same."""
    out = how(store if which == "finished" else live, tmp_path / "out")
    for p in out.rglob("*"):
        if p.is_file():
            p.chmod(0o444)
    n = STEPS if which == "finished" else 4
    assert same_run(out, ref) == n
    assert resumes_to_the_end(out, ref) == n


def test_file_names_whose_case_changed_are_named(store, ref):
    """Every name upper-cased (a copy through a case-insensitive file system or an archive tool that folds case):
    refused naming ``MANIFEST.JSON`` and the fix (rename them back); renamed back, the same run. Before: "is not an
    explaind trajectory store: it has no manifest.json. Record one with TrajectoryRecorder(...)"."""
    paths = sorted(store.rglob("*"), key=lambda p: -len(p.parts))
    for p in paths:
        p.rename(p.with_name(p.name.upper()))
    with pytest.raises(TrajectoryError, match=r"has no manifest\.json but 'MANIFEST\.JSON': the names of its files "
                                              r"changed case .* Fix: rename its files back"):
        load(store)
    for p in sorted(store.rglob("*"), key=lambda p: -len(p.parts)):
        p.rename(p.with_name(p.name.lower()))
    assert same_run(store, ref) == STEPS


def test_no_two_names_of_a_store_differ_only_in_case(store, live):
    """A case-insensitive file system (macOS, Windows) holds a store as it is: no two of its paths differ only in
    case, and every name is lower case. Before: the same."""
    for run in (store, live):
        paths = [str(p.relative_to(run)) for p in run.rglob("*")]
        assert len({p.lower() for p in paths}) == len(paths)
        assert all(p == p.lower() for p in paths)
