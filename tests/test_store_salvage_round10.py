"""Salvaging a damaged store, round 10 (docs/recording.md, "Salvaging a damaged store"): the steps of a sparse
store whose journal lines were lost, and a salvage killed while it writes the new store.

A sparse step (``checkpoint_every > 1``) whose journal line was lost is proven by its step file's own record and
binding, like a dense one, and keeps the checkpoint state and audit momentum its step file binds. Before round 10
such a step ended the salvage (a sparse step was proven by its record only), so a sparse store whose journal was
lost could not be salvaged at all. Each salvaged store is compared bit for bit with the uninterrupted run (round
5's reader, after ``verify()``) and resumed to the end, bit for bit with the uninterrupted longer run; the damaged
store is compared byte for byte with its state before the salvage.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _fault_injection import Injector, Killed
from test_store_round5 import _read_all as _values  # everything a reader gets, after verify()
from test_store_round5 import _same
from test_store_round7 import STEPS, _record, _rewrite
from test_store_salvage import _flip_theta, _how, _journal_only, _salvage, _snapshot
from test_store_strangers import _model

import explaind
from explaind.exceptions import TrajectoryError

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    root = tmp_path_factory.mktemp("salvage10")
    _record(root / "dense", STEPS, background_writes=False)
    _record(root / "long", 2 * STEPS)
    _record(root / "sparse", 7, checkpoint_every=3)  # theta and the checkpoint state after steps 5 and 6 (the end)
    _record(root / "sparse_long", 9, checkpoint_every=3)
    return root


@pytest.fixture
def sparse(templates, tmp_path):
    return Path(shutil.copytree(templates / "sparse", tmp_path / "sparse"))


def _lose_journal(store: Path) -> None:
    """Every journal line lost (a 0-byte journal) and the manifest without steps, as a crash leaves it."""
    _journal_only(store)
    (store / "journal.jsonl").write_bytes(b"")


def _flip_first_tensor(path: Path) -> None:
    """Flip one bit inside the first tensor of the safetensors file ``path`` (its metadata untouched)."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    begin = min(v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    data[8 + size + begin + 6] ^= 0x10
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- sparse steps without journal lines
def test_a_sparse_store_whose_journal_was_lost_is_salvaged_whole(sparse, templates, tmp_path, caplog):
    """Before: refused ("not even step 0 can be proven": a sparse step was proven by its record only). Now all 7
    steps are proven by their binding, with the checkpoint state after step 5 and 6; the salvaged store is the run,
    and resumed to 9 steps it is the longer run bit for bit."""
    _lose_journal(sparse)
    with caplog.at_level(logging.WARNING):
        report = _salvage(sparse, tmp_path / "out")
    assert _how(report, "bound") == list(range(7)) and report.dropped == [] and report.resume_at == 7
    assert "this sparse store's steps 0, 1, 2, 3, 4, 5, 6 are checked once more when read" in caplog.text
    assert _same(_values(tmp_path / "out"), _values(templates / "sparse"))
    _record(tmp_path / "out", 9, checkpoint_every=3, resume=True)
    assert _same(_values(tmp_path / "out"), _values(templates / "sparse_long"))


def test_a_sparse_step_without_its_journal_line_is_proven_by_its_binding(sparse, templates, tmp_path):
    """Step 3's journal line corrupted beside a manifest without steps. Before: steps 0 to 2, the others dropped.
    Now step 3 by its binding, the others by their checksums: the whole run."""
    lines = _journal_only(sparse)
    lines[3] = b"#" + lines[3][1:]
    (sparse / "journal.jsonl").write_bytes(b"".join(lines))
    report = _salvage(sparse, tmp_path / "out")
    assert _how(report, "checksum") == [0, 1, 2, 4, 5, 6] and _how(report, "bound") == [3]
    assert report.dropped == [] and report.resume_at == 7
    assert _same(_values(tmp_path / "out"), _values(templates / "sparse"))


def test_a_missing_checkpoint_state_of_a_bound_sparse_step_ends_the_salvage_after_it(sparse, templates, tmp_path):
    """The journal lost and the checkpoint state after step 5 deleted: step 5 is kept (its file holds theta_6), step
    6, replayed from that state, is dropped naming the file; a resume starts from step 0 and equals the longer run."""
    _lose_journal(sparse)
    (sparse / "optimizer/checkpoint-000005.safetensors").unlink()
    report = _salvage(sparse, tmp_path / "out")
    assert _how(report, "bound") == [0, 1, 2, 3, 4, 5] and [s for s, _ in report.dropped] == [6]
    assert "optimizer/checkpoint-000005.safetensors, cannot be read" in report.dropped[0][1]
    assert report.resume_at == 0
    _record(tmp_path / "out", 9, checkpoint_every=3, resume=True)
    assert _same(_values(tmp_path / "out"), _values(templates / "sparse_long"))


def test_a_checkpoint_state_its_step_file_does_not_bind_ends_the_salvage_after_it(sparse, tmp_path):
    """The checkpoint state after step 5 with a hyperparameter of its description edited (the journal lost, so no
    checksum guards it): its step file's binding refuses it, naming the file; step 6 is dropped."""
    _lose_journal(sparse)

    def edit(_tensors, meta):
        meta["optimizer"] = meta["optimizer"].replace('"lr": 0.05', '"lr": 0.5')
        assert '"lr": 0.5' in meta["optimizer"]
    _rewrite(sparse, {"path": "optimizer/checkpoint-000005.safetensors"}, edit)
    report = _salvage(sparse, tmp_path / "out")
    assert _how(report, "bound") == [0, 1, 2, 3, 4, 5] and [s for s, _ in report.dropped] == [6]
    assert "checkpoint-000005.safetensors is not the optimizer state recorded with" in report.dropped[0][1]


def test_a_flipped_bit_in_a_bound_checkpoint_state_is_loud_when_the_step_is_read(sparse, tmp_path):
    """The bytes of a bound checkpoint state are vouched for by nothing at salvage time; the replay that reads the
    segment after it compares the result with the theta stored at its end and warns, naming the steps."""
    _lose_journal(sparse)
    _flip_first_tensor(sparse / "optimizer/checkpoint-000005.safetensors")
    report = _salvage(sparse, tmp_path / "out")
    assert _how(report, "bound") == list(range(7))
    with pytest.warns(UserWarning, match=r"Replaying steps 6\.\.6 of the sparse store .* away from the stored "
                                         r"checkpoint theta_7"):
        explaind.Trajectory.load(tmp_path / "out", model=_model()).updates(6)


def test_a_flipped_bit_in_a_bound_sparse_step_file_is_loud_when_it_is_read(sparse, tmp_path):
    """Step 3's batch indices with a flipped bit (the journal lost): kept by salvage, refused by the read, naming
    the file."""
    _lose_journal(sparse)
    _flip_first_tensor(sparse / "steps/000003.safetensors")
    _salvage(sparse, tmp_path / "out")
    traj = explaind.Trajectory.load(tmp_path / "out", model=_model())
    with pytest.raises(TrajectoryError, match=r"'steps/000003.safetensors' \(step 3\) has an invalid batch"):
        traj.params(5)


def test_a_dense_step_of_a_store_before_schema_3_is_still_refused_naming_why(templates, tmp_path):
    """Not closed: a step file written before schema 3 binds no run, so another run's file of the same shapes would
    pass; the report names that (a flipped bit stands in for any damage of the lost line)."""
    from test_store_round7 import _as_schema_2
    store = Path(shutil.copytree(templates / "dense", tmp_path / "dense"))
    _as_schema_2(store)
    lines = _journal_only(store)
    (store / "journal.jsonl").write_bytes(b"".join(lines[:2]))
    report = _salvage(store, tmp_path / "out")
    assert _how(report, "checksum") == [0, 1] and [s for s, _ in report.dropped] == [2, 3]
    assert "written before schema 3, so steps/000002.safetensors does not bind the run" in report.dropped[0][1]


# --------------------------------------------------------------------------- a salvage killed while it writes
@pytest.fixture
def damaged(templates, tmp_path):
    """The dense run with its third journal line corrupted beside a manifest without steps."""
    store = Path(shutil.copytree(templates / "dense", tmp_path / "dense"))
    lines = _journal_only(store)
    lines[2] = b"#" + lines[2][1:]
    (store / "journal.jsonl").write_bytes(b"".join(lines))
    return store


def test_a_salvage_killed_at_every_write_operation_is_salvaged_again(damaged, templates, tmp_path, monkeypatch):
    """Killed (in process) at every write operation of the new store: the damaged store is unchanged, the new path
    holds the set-up marker and no manifest (a load says so), or the complete new store; a second salvage into the
    same path then gives the whole run. Before: the second salvage was refused ("exists and is not an empty
    directory") and the directory had to be deleted by hand."""
    before = _snapshot(damaged)
    out = tmp_path / "out"
    inj = Injector(monkeypatch, out)
    inj.start()
    explaind.Trajectory.salvage(damaged, out=out)
    inj.stop()
    n = len(inj.events)
    assert n > 30
    shutil.rmtree(out)
    for k in range(n):
        inj.start(kill_at=k)
        with pytest.raises(Killed):
            explaind.Trajectory.salvage(damaged, out=out)
        inj.stop()
        assert _snapshot(damaged) == before
        if not (out / "manifest.json").exists():
            if (out / ".explaind-setup").exists():
                with pytest.raises(TrajectoryError, match="a recording is setting it up .* or was interrupted"):
                    explaind.Trajectory.load(out, model=_model())
            report = explaind.Trajectory.salvage(damaged, out=out)
            assert _how(report, "bound") == [2], k
        assert _same(_values(out), _values(templates / "dense")), k
        shutil.rmtree(out)


_CHILD = """
import os, signal, sys
from pathlib import Path
import explaind
from explaind.trajectory import _salvage
real, calls = _salvage.write_bytes, []
def write_bytes(root, relpath, data, *args, **kwargs):
    calls.append(relpath)
    if len(calls) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(root, relpath, data, *args, **kwargs)
_salvage.write_bytes = write_bytes
explaind.Trajectory.salvage(sys.argv[1], out=sys.argv[2])
"""


@pytest.mark.parametrize("k", [1, 6, 9])
def test_a_salvage_killed_by_sigkill_is_salvaged_again(damaged, templates, tmp_path, k):
    """A real SIGKILL of the salvaging process before its first start file, a step file and the journal of the new
    store: the damaged store is unchanged and a second salvage into the same path gives the whole run."""
    before = _snapshot(damaged)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE.parent / "plugins")]))
    child = subprocess.run([sys.executable, "-c", _CHILD, str(damaged), str(tmp_path / "out"), str(k)], env=env,
                           capture_output=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert _snapshot(damaged) == before and (tmp_path / "out/.explaind-setup").exists()
    report = explaind.Trajectory.salvage(damaged, out=tmp_path / "out")
    assert _how(report, "bound") == [2] and _same(_values(tmp_path / "out"), _values(templates / "dense"))


def test_a_directory_with_the_marker_and_another_file_is_still_refused(damaged, tmp_path):
    """An interrupted salvage's directory is taken again only when it holds nothing but explaind's files."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".explaind-setup").write_bytes(b"")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrajectoryError, match="exists and is not an empty directory"):
        explaind.Trajectory.salvage(damaged, out=out)
    assert sorted(os.listdir(out)) == [".explaind-setup", "notes.txt"]


def test_a_flipped_bit_in_a_dense_bound_step_is_still_not_found(templates, tmp_path):
    """Unchanged (stated in the docs): a dense step proven by its binding alone has no checksum."""
    store = Path(shutil.copytree(templates / "dense", tmp_path / "dense"))
    _lose_journal(store)
    _flip_theta(store / "steps/000001.safetensors")
    report = _salvage(store, tmp_path / "out")
    assert _how(report, "bound") == [0, 1, 2, 3]


def test_a_store_of_a_newer_explaind_is_refused_with_the_upgrade_fix(templates, tmp_path):
    """Its manifest written by explaind 99.0 (same schema), a journal line with a field this explaind does not
    know. Now: refused naming the fix (upgrade), nothing written. Before: salvaged, the line taken as unreadable and
    step 2 kept on its binding alone, without its checksum and the field (the step file of a real newer explaind
    holds the field too: that step and every later one would have been dropped)."""
    from test_store_round7 import _manifest, _write_manifest
    store = Path(shutil.copytree(templates / "dense", tmp_path / "dense"))
    manifest = _manifest(store)
    manifest.update(steps=[], complete=False, explaind_version="99.0")
    _write_manifest(store, manifest)
    lines = (store / "journal.jsonl").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"{", b'{"future_field": 1, ', 1)
    (store / "journal.jsonl").write_bytes(b"".join(lines))
    before = _snapshot(store)
    with pytest.raises(TrajectoryError, match=r"Cannot salvage .* explaind 99\.0, newer than this one .*upgrade "
                                              r"explaind.*Nothing was written"):
        explaind.Trajectory.salvage(store, out=tmp_path / "out")
    assert _snapshot(store) == before and not (tmp_path / "out").exists()
