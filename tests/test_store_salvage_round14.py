"""Salvaging a store written before schema 3, round 14: steps whose journal lines were lost are proven by replaying
their recorded updates (``Trajectory.salvage(..., replay=True)``, docs/recording.md, "Salvaging a damaged store").

The stores are written in the previous format by round 7's own old-format writer (``_as_schema_2``: step files
without the ``run`` and ``state`` entries, no ``run_id``). Each replayed residual is compared with an independent
float64 loop (:func:`_loop_residuals`: torch's autograd on the model and ``F.mse_loss`` as the loop called it, SGD's
momentum written out); a salvaged store is compared bit for bit with the uninterrupted run (round 5's reader, after
``verify()``) and resumed to the end, bit for bit with the uninterrupted longer run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _round12_kit import momentum_residuals
from test_store_round5 import _read_all as _values  # everything a reader gets, after verify()
from test_store_round5 import _same
from test_store_round7 import ORDER, STEPS, X, Y, _as_schema_2, _manifest, _record, _write_manifest
from test_store_strangers import _model

import explaind
from explaind.cli import main
from explaind.exceptions import ConfigError, TrajectoryError
from explaind.trajectory._index import read_manifest

LR, MOMENTUM = 0.05, 0.9  # round 7's SGD


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Round 7's runs, written step by step (each step's optimizer state in its slot whatever the timing)."""
    root = tmp_path_factory.mktemp("salvage14")
    _record(root / "dense", STEPS, background_writes=False)
    _record(root / "other", STEPS, shift=0.01, background_writes=False)
    _record(root / "long", 2 * STEPS)
    return root


def old_format_copy(source: Path, where: Path, lines: int = 2) -> Path:
    """A copy of ``source`` at ``where`` in the previous format (schema 2), its manifest listing no step and its
    journal cut after ``lines`` lines (as a crash, or a lost journal, leaves it). Shared with round 15's salvage."""
    store = Path(shutil.copytree(source, where))
    _as_schema_2(store)
    manifest = _manifest(store)
    manifest.update(steps=[], complete=False)
    _write_manifest(store, manifest)
    kept = (store / "journal.jsonl").read_bytes().splitlines(keepends=True)[:lines]
    (store / "journal.jsonl").write_bytes(b"".join(kept))
    assert read_manifest(store).schema_version == 2
    return store


def _old_store(templates: Path, tmp_path: Path, lines: int = 2) -> Path:
    """The dense run as :func:`old_format_copy` leaves it."""
    return old_format_copy(templates / "dense", tmp_path / "old", lines)


def _snapshot(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _salvage(store: Path, out: Path, **kwargs):
    before = _snapshot(store)
    report = explaind.Trajectory.salvage(store, out=out, **kwargs)
    assert _snapshot(store) == before  # the damaged store is only read
    return report


def _loop_residuals(store: Path, steps: int) -> list[float]:
    """The independent reference: ``||theta_{s+1} - (theta_s - lr m_s)|| / ||theta_{s+1} - theta_s||`` with
    ``m_s = momentum m_{s-1} + g_s`` and ``g_s`` the gradient of ``F.mse_loss`` on the step's batch, computed by
    torch's autograd on the model loaded with theta_s (float64, one parameter at a time)."""
    traj = explaind.Trajectory.load(store, model=_model())
    return momentum_residuals(traj, _model(), lambda model, s: F.mse_loss(model(X[ORDER[s]]), Y[ORDER[s]]), steps, LR,
                              MOMENTUM)


def _step_file_of(store: Path, s: int) -> Path:
    return store / "steps" / f"{s:06d}.safetensors"


# --------------------------------------------------------------------------- proven by replay
def test_steps_of_a_schema_2_store_without_journal_lines_are_proven_by_replay(templates, tmp_path):
    """Steps 2 and 3 of a schema-2 store lost their journal lines. Before: dropped ("written before schema 3 ... does
    not bind the run"): half the run lost. Now ``replay=True`` keeps them, their replayed residuals equal the
    independent loop's (both at float64 rounding), the salvaged store is the run bit for bit, and it resumes to the
    longer run bit for bit."""
    store = _old_store(templates, tmp_path)
    report = _salvage(store, tmp_path / "out", replay=True, model=_model())
    assert report.kept == [(0, "checksum"), (1, "checksum"), (2, "replayed"), (3, "replayed")]
    assert report.dropped == [] and report.replay_tolerance == 1e-7
    reference = _loop_residuals(templates / "dense", STEPS)
    assert [s for s, _ in report.replayed] == [2, 3]
    for s, residual in report.replayed:
        assert residual <= 1e-7 and reference[s] <= 1e-7
        assert abs(residual - reference[s]) <= 1e-12, (s, residual, reference[s])
    text = str(report)
    assert "kept, proven by replaying their recorded updates" in text and ": 2, 3" in text
    assert _same(_values(tmp_path / "out"), _values(templates / "dense"))
    _record(tmp_path / "out", 2 * STEPS, resume=True, accept_unbound=True)
    assert _same(_values(tmp_path / "out"), _values(templates / "long"))


def test_without_replay_the_report_names_the_fix(templates, tmp_path):
    """The default (no replay): steps 2 and 3 dropped as before, the reason now naming ``replay=True``. Before: the
    reason did not say that anything could be done."""
    store = _old_store(templates, tmp_path)
    report = _salvage(store, tmp_path / "out")
    assert [s for s, _ in report.kept] == [0, 1] and [s for s, _ in report.dropped] == [2, 3]
    assert "it was not replayed (Trajectory.salvage(..., replay=True)" in report.dropped[0][1]


# --------------------------------------------------------------------------- what replay refuses
def test_a_step_file_of_another_run_is_dropped_by_the_replay(templates, tmp_path):
    """Step 2's file is the other run's step 2 (same shapes, schema 2: nothing binds a run), its journal line lost:
    its replay from step 1 misses by a residual of order 1, so step 2 is dropped naming it, step 3 as following it,
    and the salvaged store holds steps 0-1 only (the run on them, bit for bit; no file of steps 2 or 3 left)."""
    store = _old_store(templates, tmp_path)
    other = Path(shutil.copytree(templates / "other", tmp_path / "other_old"))
    _as_schema_2(other)
    shutil.copy(_step_file_of(other, 2), _step_file_of(store, 2))
    report = _salvage(store, tmp_path / "out", replay=True, model=_model())
    assert [s for s, _ in report.kept] == [0, 1] and [s for s, _ in report.dropped] == [2, 3]
    assert "does not continue the run" in report.dropped[0][1] and "above the tolerance 1e-07" in report.dropped[0][1]
    assert report.replayed == []
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["000000.safetensors", "000001.safetensors"]
    assert not (out / ".explaind-setup").exists() and not (out / "attributes.json").exists()
    assert _same(_first(out, 2), _first(templates / "dense", 2))


def _first(store: Path, n: int) -> list[torch.Tensor]:
    """What a reader gets of the first ``n`` steps of ``store`` (after ``verify()``): theta_0..theta_n, each step's
    batch, gradient scale and coefficients."""
    traj = explaind.Trajectory.load(store, model=_model())
    traj.verify()
    out = [t for s in range(n + 1) for t in traj.params(s).values()]
    for s in range(n):
        out += [*traj.batch(s), torch.tensor(traj.grad_scale(s))]
        out += [c for u in traj.updates(s).values() for c in (u.a, u.b, u.P, u.q, u.n) if isinstance(c, torch.Tensor)]
    return out


def _flip(path: Path, bit: int) -> None:
    """Flip ``bit`` of the first float64 of the first parameter in the step file ``path`` (metadata untouched)."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    begin = min(v["data_offsets"][0] for k, v in header.items() if k.startswith("param."))
    data[8 + size + begin + bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def test_a_flipped_high_bit_is_found_and_a_lowest_bit_is_not(templates, tmp_path):
    """What replay proves, and what not: a flipped exponent bit in step 2's theta (its journal line lost) is found
    (step 2 dropped); a flipped lowest mantissa bit moves the residual by far less than the tolerance and is kept,
    as the report and docs say (not bit for bit)."""
    store = _old_store(templates, tmp_path)
    _flip(_step_file_of(store, 2), 62)  # an exponent bit
    report = _salvage(store, tmp_path / "high", replay=True, model=_model())
    assert [s for s, _ in report.kept] == [0, 1] and "does not continue the run" in report.dropped[0][1]
    store = _old_store(templates, tmp_path / "again")
    _flip(_step_file_of(store, 2), 0)  # the lowest mantissa bit
    report = _salvage(store, tmp_path / "low", replay=True, model=_model())
    assert [s for s, _ in report.kept] == [0, 1, 2, 3]
    theirs = explaind.Trajectory.load(tmp_path / "low", model=_model()).params(3)
    ours = explaind.Trajectory.load(templates / "dense", model=_model()).params(3)
    assert not all(torch.equal(theirs[k], ours[k]) for k in ours)  # kept although one bit differs


def test_a_replay_that_cannot_run_keeps_the_steps_proven_otherwise_and_names_why(templates, tmp_path):
    """``replay=True`` without the model (round 7's model is not in the registry, so the store cannot rebuild it):
    steps 0-1 kept by their checksums, step 2 dropped naming why the replay cannot run and the fix (pass
    ``model=``)."""
    store = _old_store(templates, tmp_path)
    report = _salvage(store, tmp_path / "out", replay=True)
    assert [s for s, _ in report.kept] == [0, 1] and [s for s, _ in report.dropped] == [2, 3]
    assert "the run cannot be replayed: " in report.dropped[0][1] and "model=" in report.dropped[0][1]
    assert explaind.Trajectory.load(tmp_path / "out", model=_model()).n_steps == 2
    assert _same(_first(tmp_path / "out", 2), _first(templates / "dense", 2))


@pytest.mark.parametrize("kwargs", [{"replay": "yes"}, {"replay": 1}, {"model": "m"}, {"loss": "mse"}])
def test_salvage_refuses_replay_arguments_that_are_not_allowed(templates, tmp_path, kwargs):
    """``replay`` takes a bool; ``model=``, ``train_data=`` and ``loss=`` only with ``replay=True``: a ``ConfigError``
    naming the value and the fix, nothing written."""
    store = _old_store(templates, tmp_path)
    with pytest.raises(ConfigError, match=r"Trajectory\.salvage: .* Fix: "):
        explaind.Trajectory.salvage(store, out=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_schema_3_store_salvages_the_same_with_replay(templates, tmp_path):
    """A store of the current schema: replay changes nothing (its steps without a record are proven by their
    binding, as before)."""
    store = Path(shutil.copytree(templates / "dense", tmp_path / "new"))
    manifest = _manifest(store)
    manifest.update(steps=[], complete=False)
    _write_manifest(store, manifest)
    lines = (store / "journal.jsonl").read_bytes().splitlines(keepends=True)
    (store / "journal.jsonl").write_bytes(b"".join(lines[:2]))
    report = _salvage(store, tmp_path / "out", replay=True, model=_model())
    assert report.kept == [(0, "checksum"), (1, "checksum"), (2, "bound"), (3, "bound")] and report.replayed == []
    assert _same(_values(tmp_path / "out"), _values(templates / "dense"))


# --------------------------------------------------------------------------- the command line
def test_explaind_salvage_replay_proves_the_steps_of_a_registry_model_store(tmp_path, capsys):
    """``explaind salvage RUN --out NEW --replay --json`` on a schema-2 store of a registry model (rebuilt from its
    spec, its data stored) whose journal lost the lines of steps 2 and 3: both kept as replayed, each residual at
    most 1e-7, the new store's values those of the store before the damage, bit for bit. Before: no ``--replay``
    (exit code 2, the option unknown)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(3, (16,))
    model = explaind.build_model("mlp", {"in_features": 4, "hidden_sizes": [5], "out_features": 3}, seed=0,
                                 dtype="float64")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    store = tmp_path / "run"
    recorder = explaind.TrajectoryRecorder(model, optimizer, loss="cross_entropy", train_data=(x, y), store=store)
    with recorder:
        for idx in torch.arange(16).reshape(4, 4):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            recorder.log_batch(idx)
            optimizer.step()
    _as_schema_2(store)
    whole = explaind.Trajectory.load(store)
    expected = [t for s in range(STEPS + 1) for t in whole.params(s).values()]
    manifest = _manifest(store)
    manifest.update(steps=[], complete=False)
    _write_manifest(store, manifest)
    lines = (store / "journal.jsonl").read_bytes().splitlines(keepends=True)
    (store / "journal.jsonl").write_bytes(b"".join(lines[:2]))
    assert main(["salvage", str(store), "--out", str(tmp_path / "out"), "--replay", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kept"] == [[0, "checksum"], [1, "checksum"], [2, "replayed"], [3, "replayed"]]
    assert [s for s, _ in result["replayed"]] == [2, 3] and all(r <= 1e-7 for _, r in result["replayed"])
    salvaged = explaind.Trajectory.load(tmp_path / "out")
    salvaged.verify()
    assert _same([t for s in range(STEPS + 1) for t in salvaged.params(s).values()], expected)


def test_a_schema_2_store_without_its_journal_is_proven_by_replay_from_step_0(templates, tmp_path):
    """A schema-2 store whose journal is empty (0 bytes) beside a manifest without steps. Before: refused, "not even
    step 0 can be proven" (its file binds no run): the whole run lost. Now every step is proven by replay from the
    start files' theta_0, residuals as the independent loop's, the run bit for bit."""
    store = _old_store(templates, tmp_path, lines=0)
    assert (store / "journal.jsonl").read_bytes() == b""
    report = _salvage(store, tmp_path / "out", replay=True, model=_model())
    assert report.kept == [(s, "replayed") for s in range(STEPS)] and report.dropped == []
    reference = _loop_residuals(templates / "dense", STEPS)
    assert all(abs(r - reference[s]) <= 1e-12 for s, r in report.replayed)
    assert report.resume_at == 0  # no optimizer state is proven: a resume records the run again
    assert _same(_values(tmp_path / "out"), _values(templates / "dense"))


def test_a_step_0_that_fails_its_replay_writes_nothing(templates, tmp_path):
    """The same store with step 0's file the other run's: nothing can be proven; salvage refuses naming step 0's
    replay and removes what it wrote, leaving ``out`` an empty directory (a later salvage may use it)."""
    store = _old_store(templates, tmp_path, lines=0)
    other = Path(shutil.copytree(templates / "other", tmp_path / "other_old"))
    _as_schema_2(other)
    shutil.copy(_step_file_of(other, 0), _step_file_of(store, 0))
    with pytest.raises(TrajectoryError, match=r"not even step 0 can be proven intact \(replayed from theta_0 .*does "
                                              r"not continue the run.*Nothing was written"):
        _salvage(store, tmp_path / "out", replay=True, model=_model())
    assert list((tmp_path / "out").iterdir()) == []
