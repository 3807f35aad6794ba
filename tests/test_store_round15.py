"""What tools, versions and file systems do to a store, round 15
(docs/recording.md, "What tools do to a store, round 15").

A store read as the same run equals the uninterrupted run recorded in memory bit for bit after ``verify()``
(``same_run`` of tests/_round12_kit.py, against round 5's in-memory reference); resumed, the uninterrupted longer run.
Crashes of sparse and dropout stores and the processes beside a resume are in tests/test_store_round15_crashes.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from _round12_kit import LONG, STEPS, load, manifest, record, reference, resumes_to_the_end, same_run, snapshot
from safetensors.torch import load_file, save_file

import explaind
from explaind.exceptions import ConfigError, TrajectoryError
from explaind.trajectory._checksum import checksum


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("round15")
    record(root / "run")
    return root / "run"


@pytest.fixture
def store(template, tmp_path):
    return Path(shutil.copytree(template, tmp_path / "run"))


def _edit(store: Path, edit) -> None:
    data = manifest(store)
    edit(data)
    (store / "manifest.json").write_text(json.dumps(data, indent=1))


# --------------------------------------------------------------------------- versions
def test_a_field_added_by_a_tool_is_refused_naming_it_and_the_fix_and_kept(store):
    """A manifest with a field explaind does not write, at this explaind's version (a tool's or a person's note).
    Before (18b3503): "Extra inputs are not permitted. The store is corrupted or was not written by explaind: restore
    manifest.json from a copy, or re-record the run". Now the field, the versions and the fix (remove it) are named;
    the field is kept (nothing rewritten) and, removed, the store is the same run and resumes."""
    _edit(store, lambda m: m.update(notes={"who": "me"}))
    before = snapshot(store)
    for action in (lambda: load(store), lambda: record(store, LONG, resume=True)):
        with pytest.raises(TrajectoryError, match=r"The field\(s\) \['notes'\] are not ones that explaind writes.*"
                                                  r"Fix: remove that field from manifest.json") as err:
            action()
        assert "re-record" not in str(err.value)
    assert snapshot(store) == before
    _edit(store, lambda m: m.pop("notes"))
    assert same_run(store, reference()) == STEPS


def test_a_newer_versions_field_names_the_version_and_upgrade(store):
    """The same field in a manifest that explaind 0.2.0 wrote (same schema): the fix is to upgrade (as since round 10
    for a journal line); a newer schema is refused naming its number and the fix."""
    _edit(store, lambda m: m.update(notes=1, explaind_version="0.2.0"))
    with pytest.raises(TrajectoryError, match=r"written by explaind 0\.2\.0, newer than this one .* upgrade explaind"):
        load(store)
    _edit(store, lambda m: (m.pop("notes"), m.update(schema_version=4)))
    with pytest.raises(TrajectoryError, match=r"has schema_version 4; this explaind reads up to 3\. Upgrade explaind"):
        load(store)


OPTIONAL = ("extras", "generators", "buffer_names", "coupled", "random_capture", "constants_file",
            "initial_state_file", "architecture", "created", "explaind_version")


@pytest.mark.parametrize("field", OPTIONAL)
def test_an_older_manifest_without_an_optional_field_reads_and_resumes(store, ref, field):
    """A manifest of an older explaind without one of its optional fields: defaulted, the same run, resumed bit for
    bit (the field is written anew by the resume)."""
    _edit(store, lambda m: m.pop(field))
    assert same_run(store, ref) == STEPS
    assert resumes_to_the_end(store, ref) == STEPS
    assert field in manifest(store)


def test_a_manifest_without_its_training_fingerprint_is_refused_by_the_binding(store):
    """``train_fingerprint`` is optional for stores older than the fingerprint, but this store's step files bind it:
    removed by hand, every step is refused as recorded with another description of the run."""
    _edit(store, lambda m: m.pop("train_fingerprint"))
    with pytest.raises(TrajectoryError, match=r"another description of the run than the manifest's.*"
                                              r"manifest.json was edited"):
        same_run(store, reference())


# --------------------------------------------------------------------------- hand edits
def test_a_hand_edited_learning_rate_changes_no_result(store, template, ref):
    """``adapter_hyperparameters.param_groups[0].lr`` edited from 0.01 to 0.02: every update comes from the recorded
    coefficients (docs/maths.md §3), so the store is the same run bit for bit and the counterfactual (the one reader
    of the hyperparameters) gives the same values and replay residual; an edit that would change its pure update
    (Adam's eps) is refused naming the field."""
    _edit(store, lambda m: m["adapter_hyperparameters"]["param_groups"][0].update(lr=0.02))
    assert same_run(store, ref) == STEPS
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    runs = [explaind.CounterfactualEstimator(device="cpu").fit(load(s)) for s in (template, store)]
    values = [r.transform(x).values for r in runs]
    assert torch.equal(values[0], values[1]) and runs[0].replay_residual_ == runs[1].replay_residual_ < 1e-12
    _edit(store, lambda m: m["adapter_hyperparameters"]["param_groups"][0].update(eps=1e-3))
    with pytest.raises(Exception, match=r"eps=0\.001 from the manifest"):
        explaind.CounterfactualEstimator(device="cpu").fit(load(store)).transform(x)


def test_a_hand_edited_optimizer_is_refused_by_load_and_resume(store):
    """``adapter``/``optimizer_class`` edited to SGD: the step files bind the run's description, so a load refuses
    naming the edit; a resume refuses naming the recorded and the used adapter; nothing is changed."""
    _edit(store, lambda m: m.update(adapter="sgd", optimizer_class="torch.optim.sgd.SGD"))
    before = snapshot(store)
    with pytest.raises(TrajectoryError, match=r"another description of the run than the manifest's.*edited"):
        same_run(store, reference())
    with pytest.raises(TrajectoryError, match=r"recorded with adapter 'sgd', this recorder uses 'adam'"):
        record(store, LONG, resume=True)
    assert snapshot(store) == before


@pytest.mark.parametrize("name", ["steps/000002.safetensors", "initial.safetensors"])
def test_a_tensor_file_re_saved_in_float32_is_refused_naming_the_cause(store, name):
    """A stranger's script loads a tensor file and saves it again in float32 under the same names
    (``safetensors.torch.save_file``): refused naming the file, the new dtypes and the cause; with its checksum
    rewritten too, still refused (the dtype against the manifest's, or the binding)."""
    path = store / name
    tensors = load_file(str(path))
    save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, str(path))
    with pytest.raises(TrajectoryError, match=r"is truncated or was modified.*valid safetensors file \(F32.*"
                                              r"a conversion to another dtype"):
        load(store).verify()
    data = path.read_bytes()
    if name == "initial.safetensors":  # its checksum rewritten in the manifest as well
        _edit(store, lambda m: m["initial_file"].update(nbytes=len(data), checksum=checksum(data)))
    else:
        _edit(store, lambda m: m["steps"][2]["file"].update(nbytes=len(data), checksum=checksum(data)))
        (store / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest(store)["steps"]))
    named = r"holds step None, not step 2" if name.startswith("steps") else r"other than those the manifest names"
    with pytest.raises(TrajectoryError, match=named):  # its metadata (step, record, run) was not saved again
        load(store).verify()


# --------------------------------------------------------------------------- paths, archives, other tools' folders
@pytest.mark.parametrize("name", ["rün ☃ 日本", "with  spaces ", "x" * 240, os.path.join(*["d" * 200] * 12)])
def test_unicode_spaces_and_long_paths(tmp_path, ref, name):
    """A store under a non-ASCII name, one with spaces (a trailing one too), a 240-character name and a path of over
    2,400 characters: recorded, the same run, resumed bit for bit."""
    target = tmp_path / name / "run"
    target.parent.mkdir(parents=True)
    record(target, 3)
    assert same_run(target, ref) == 3
    assert resumes_to_the_end(target, ref) == 3


def test_a_store_inside_a_zip_is_refused_naming_the_archive_and_the_fix(template, tmp_path, ref):
    """``Trajectory.load("run.zip")``. Before: "it is a file, not a directory". Now: "it is a zip archive", with the
    command that unpacks it; unpacked that way, the same run."""
    archive = tmp_path / "run.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(template.rglob("*")):
            z.write(f, f.relative_to(template.parent))
    with pytest.raises(TrajectoryError, match=r"it is a zip archive; explaind reads a store from a directory.*"
                                              r"python -m zipfile -e ARCHIVE DIR"):
        load(archive)
    subprocess.run([os.sys.executable, "-m", "zipfile", "-e", str(archive), str(tmp_path / "x")], check=True)
    assert same_run(tmp_path / "x" / "run", ref) == STEPS


def _hf_checkpoint(root: Path) -> Path:
    path = root / "output" / "checkpoint-500"
    path.mkdir(parents=True)
    for name in ("config.json", "trainer_state.json", "model.safetensors", "optimizer.pt", "rng_state.pth"):
        (path / name).write_bytes(b"{}")
    return path


def _lightning(root: Path) -> Path:
    path = root / "lightning_logs" / "version_0" / "checkpoints"
    path.mkdir(parents=True)
    (path / "epoch=0-step=10.ckpt").write_bytes(b"PK\x03\x04")
    (path.parent / "hparams.yaml").write_text("lr: 0.01\n")
    return path


FOREIGN = {
    "a Hugging Face Trainer checkpoint": (_hf_checkpoint, r"looks like a Hugging Face Trainer checkpoint "
                                                          r"\(trainer_state.json\).*explaind.integrations.hf"),
    "a saved Hugging Face model": (lambda r: _hf_checkpoint(r).joinpath("trainer_state.json").unlink() or
                                   r / "output" / "checkpoint-500", r"a saved Hugging Face model \(config.json, "
                                                                    r"model.safetensors\)"),
    "a Lightning checkpoints folder": (_lightning, r"a PyTorch Lightning checkpoints folder \(epoch=0-step=10.ckpt\)"
                                                   r".*explaind.integrations.lightning"),
    "a Lightning log folder": (lambda r: _lightning(r).parent, r"a PyTorch Lightning log folder \(hparams.yaml, "
                                                                r"checkpoints/\)"),
    "a Lightning checkpoint file": (lambda r: _lightning(r) / "epoch=0-step=10.ckpt",
                                    r"looks like a checkpoint file \(.ckpt\)"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_another_tools_checkpoint_is_named(tmp_path, case):
    """``Trajectory.load`` of another tool's checkpoint. Before: "it has no manifest.json. Record one with
    TrajectoryRecorder(..., store=...)" (or, for a file, "it is a file, not a directory"). Now the message names what
    it looks like, why no trajectory comes from it, and the integration that records one."""
    make, expected = FOREIGN[case]
    path = make(tmp_path)
    with pytest.raises(TrajectoryError, match=r"is not an explaind trajectory store: .*" + expected) as err:
        load(path)
    assert "no trajectory can be rebuilt from it" in str(err.value)


# --------------------------------------------------------------------------- read-only file systems
@pytest.fixture
def read_only(template, tmp_path):
    """A copy of the store on a read-only bind mount (as root), else one whose files and folders lost their write
    permission."""
    source, view = tmp_path / "source", tmp_path / "view"
    shutil.copytree(template, source / "run")
    if os.geteuid() == 0:
        view.mkdir()
        subprocess.run(["mount", "--bind", str(source), str(view)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        try:
            yield view / "run"
        finally:
            subprocess.run(["umount", str(view)], check=True)
        return
    for p in [source, *source.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        yield source / "run"
    finally:
        for p in [source, *source.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def test_a_read_only_store_loads_verifies_explains_and_salvages_and_a_resume_names_the_fix(read_only, tmp_path, ref):
    """On a read-only mount: load, ``verify()``, an explanation and a salvage into a writable place work (the same
    run); a resume is refused naming the read-only file system and the fix; a salvage into the read-only mount is
    refused naming out= and the fix. Before: the last raised a bare ``OSError: [Errno 30] Read-only file system``."""
    assert same_run(read_only, ref) == STEPS
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    att = explaind.InfluenceEstimator().fit(load(read_only)).transform(x)
    assert att.values.shape == (2, 32, 2) and bool(torch.isfinite(torch.as_tensor(att.values)).all())
    with pytest.raises(TrajectoryError, match=r"resume=True needs to write into the trajectory store .*(read-only|"
                                              r"permission).*Fix: make the store writable"):
        record(read_only, LONG, resume=True)
    report = explaind.Trajectory.salvage(read_only, out=tmp_path / "salvaged")
    assert len(report.kept) == STEPS and same_run(tmp_path / "salvaged", ref) == STEPS
    with pytest.raises(TrajectoryError, match=r"salvage\(out=.*\) could not write the new store: .*was only read: "
                                              r"nothing there changed\. Fix: pass an out= on a writable"):
        explaind.Trajectory.salvage(read_only, out=read_only.parent / "out")


# --------------------------------------------------------------------------- a million steps
def test_an_index_above_the_limit_names_the_run_length_and_the_variable_that_raises_it(store, ref, monkeypatch):
    """The manifest of a complete store of 1,000,000 steps holds about 556 MB, above the 256 MiB read limit: before
    (18b3503) such a store, as explaind wrote it, was refused as "it was modified. Re-record the run." and nothing
    raised the limit. Now the message names a run longer than the limit and ``EXPLAIND_MAX_INDEX_BYTES``, which reads
    it (here the limit is lowered below this store's manifest to show both); a bad value is refused naming it."""
    size = (store / "manifest.json").stat().st_size
    monkeypatch.setenv("EXPLAIND_MAX_INDEX_BYTES", str(size - 1))
    with pytest.raises(TrajectoryError, match=r"indexes a run of more steps than that limit holds.*"
                                              r"EXPLAIND_MAX_INDEX_BYTES=<bytes>") as err:
        load(store)
    assert "Re-record the run" not in str(err.value)
    monkeypatch.setenv("EXPLAIND_MAX_INDEX_BYTES", str(size))
    assert same_run(store, ref) == STEPS
    monkeypatch.setenv("EXPLAIND_MAX_INDEX_BYTES", "lots")
    with pytest.raises(ConfigError, match=r"EXPLAIND_MAX_INDEX_BYTES='lots' is not allowed"):
        load(store)
