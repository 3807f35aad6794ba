"""Files explaind reads besides a store's own, attacked by strangers and crashes, round 6.

A saved :class:`~explaind.Attribution` (edited, truncated, linked, of a newer format, killed while saved),
a pruned-model file (:func:`explaind.pruning.load_pruned`), a template model that is not the recorded one,
a store read without the plugin of its optimizer adapter, and the environment (``HOME`` unset, a read-only
``TMPDIR``, a path with a newline, a relative path after ``os.chdir``); and the strict parse of the
store's index (a string where the manifest or the journal holds a number). Each is read as what was
written, or refused with an error naming the file, the value, what is allowed and the fix; a killed save
leaves the old result or the new one. docs/recording.md, "Strangers' files, round 6", lists the cases.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import test_store_round5
import torch
import torch.nn.functional as F
from _recording_helpers import batches, regression_data
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from test_store_strangers import STEPS, _model, _record
from torch import nn

import explaind
from explaind import Attribution
from explaind.exceptions import ConfigError, TrajectoryError, UnknownEntryError
from explaind.kernel.layout import ParamLayout
from explaind.pruning.apply import apply_masks, load_pruned, save_pruned
from explaind.trajectory._binding import run_binding
from explaind.trajectory._checksum import checksum
from explaind.trajectory.manifest import TrajectoryManifest

LAYOUT = ParamLayout(("w", "b"), ((2, 3), (2,)))
#: the fixtures of round 5: a recorded dense store (module scope) and a copy of it per test
template, store = test_store_round5.template, test_store_round5.store


def _attribution(seed: int = 0) -> Attribution:
    """An attribution with axes (test, step, train, output): T=2, 3 steps, 4 samples, O=2 (float64)."""
    g = torch.Generator().manual_seed(seed)
    T, S, N, O = 2, 3, 4, 2
    side = torch.randn(T, S, O, generator=g, dtype=torch.float64)
    return Attribution(axes=("test", "step", "train", "output"),
                       values=torch.randn(T, S, N, O, generator=g, dtype=torch.float64),
                       initial=torch.randn(T, O, generator=g, dtype=torch.float64),
                       final=torch.randn(T, O, generator=g, dtype=torch.float64),
                       regularization=side, residual=side.clone(), quadrature_error=side.clone() / 7,
                       coords={"test": np.arange(T), "step": np.arange(5, 5 + S), "train": np.arange(N),
                               "output": np.arange(O)},
                       layout=LAYOUT, meta={"window": [5, 8], "seed": seed})


def _same(a: Attribution, b: Attribution) -> bool:
    names = ("values", "initial", "final", "regularization", "residual", "quadrature_error", "buffers",
             "initial_state")
    return (a.axes == b.axes and a.meta == b.meta and all(torch.equal(getattr(a, n), getattr(b, n)) for n in names)
            and {k: list(v) for k, v in a.coords.items()} == {k: list(v) for k, v in b.coords.items()})


def _rewrite(root: Path, edit) -> None:
    """Rewrite attribution.safetensors with ``edit(tensors, header) -> (tensors, header)`` (its header inside)."""
    path = root / "attribution.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors, header = edit(dict(st_load(data)), json.loads(metadata["explaind_attribution"]))
    path.write_bytes(st_save(tensors, metadata={"explaind_attribution": json.dumps(header)}))


# --------------------------------------------------------------------------- saved attributions
def test_an_attribution_saves_and_loads_bit_for_bit_with_its_header_inside_the_tensor_file(tmp_path):
    att = _attribution()
    back = Attribution.load(att.save(tmp_path / "a"))
    assert _same(att, back)
    data = (tmp_path / "a" / "attribution.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    assert json.loads(header["explaind_attribution"]) == json.loads((tmp_path / "a" / "attribution.json").read_text())


def test_an_edited_attribution_json_is_not_read_and_is_named_in_a_warning(tmp_path, caplog):
    att = _attribution()
    root = att.save(tmp_path / "a")
    header = json.loads((root / "attribution.json").read_text())
    header["axes"] = ["test", "train", "step", "output"]  # the scores would be read along the wrong axes
    (root / "attribution.json").write_text(json.dumps(header))
    with caplog.at_level(logging.WARNING, logger="explaind.kernel._attribution_io"):
        back = Attribution.load(root)
    assert _same(att, back)
    assert "attribution.json differs from the header saved inside attribution.safetensors" in caplog.text


TENSOR_EDITS = {
    "a tensor of the wrong shape": (lambda t, h: ({**t, "residual": t["residual"][:, :2].contiguous()}, h),
                                    r"'residual' has shape \[2, 2, 2\]; allowed: \[2, 3, 2\]"),
    "a tensor of another dtype": (lambda t, h: ({**t, "initial": t["initial"].float()}, h),
                                  r"'initial' has dtype torch.float32 \('values': torch.float64\); allowed: one "
                                  r"floating dtype"),
    "a missing tensor": (lambda t, h: ({k: v for k, v in t.items() if k != "final"}, h),
                         r"lacks the tensors \['final'\] and holds the unknown ones \[\]"),
    "an extra tensor": (lambda t, h: ({**t, "../outside": torch.zeros(1, dtype=torch.float64)}, h),
                        r"lacks the tensors \[\] and holds the unknown ones \['../outside'\]"),
    "NaN": (lambda t, h: ({**t, "values": t["values"].index_fill(0, torch.tensor([1]), float("nan"))}, h),
            r"'values' holds NaN or infinite values; allowed: finite scores"),
    "values with an axis too few": (lambda t, h: ({**t, "values": t["values"].sum(2)}, h),
                                    r"'values' has shape \[2, 3, 2\], 3 axes for the 4 names"),
    "an unknown axis": (lambda t, h: (t, {**h, "axes": ["test", "step", "sample", "output"]}),
                        r"axes is \['test', 'step', 'sample', 'output'\]; allowed: \['test', \*kept, 'output'\]"),
    "coordinates of the wrong length": (lambda t, h: (t, {**h, "coords": {**h["coords"], "train": [0, 1, 2]}}),
                                        r"coords\['train'\] is '\[0, 1, 2\]'; allowed: 4 coordinates"),
    "a layout whose offsets lie": (lambda t, h: (t, {**h, "layout": {**h["layout"], "offsets": [0, 6, 9]}}),
                                   r"layout is .*allowed: \{'names': \[distinct str\]"),
    "a file from a newer format": (lambda t, h: (t, {**h, "format_version": 2}),
                                   r"has format_version 2, newer than this explaind reads \(1\): it was saved by a "
                                   r"newer explaind. Upgrade explaind"),
    "a format version that is a string": (lambda t, h: (t, {**h, "format_version": "1"}),
                                          r"format_version is '1'; allowed: the integer 1"),
}


@pytest.mark.parametrize("case", list(TENSOR_EDITS))
def test_a_saved_attribution_that_is_not_what_save_wrote_is_refused_naming_the_file_and_value(tmp_path, case):
    edit, message = TENSOR_EDITS[case]
    root = _attribution().save(tmp_path / "a")
    _rewrite(root, edit)
    with pytest.raises(ConfigError, match=r"Attribution '.*attribution\.safetensors'.*" + message):
        Attribution.load(root)


def test_a_header_with_a_key_given_twice_is_refused_naming_the_key(tmp_path):
    root = _attribution().save(tmp_path / "a")
    path = root / "attribution.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + n])["__metadata__"]
    text = metadata["explaind_attribution"].replace('{"format_version"', '{"axes": ["test", "output"], '
                                                    '"format_version"', 1)
    tensors = st_load(data)
    path.write_bytes(st_save(dict(tensors), metadata={"explaind_attribution": text}))
    with pytest.raises(ConfigError, match=r"its header is not valid JSON \(the key 'axes' appears twice"):
        Attribution.load(root)


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_a_truncated_attribution_file_is_refused_not_a_parser_error(tmp_path, cut):
    root = _attribution().save(tmp_path / "a")
    path = root / "attribution.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ConfigError, match=r"it is not a complete safetensors file .*allowed: the file as "
                                          r"Attribution.save wrote it"):
        Attribution.load(root)


def test_an_attribution_file_that_is_a_link_out_of_the_directory_is_refused_not_followed(tmp_path):
    outside = _attribution(seed=1).save(tmp_path / "elsewhere")
    root = _attribution().save(tmp_path / "a")
    (root / "attribution.safetensors").unlink()
    (root / "attribution.safetensors").symlink_to(outside / "attribution.safetensors")
    with pytest.raises(ConfigError, match=r"it is a symbolic link; allowed: a regular file .*cp -L"):
        Attribution.load(root)


def test_an_attribution_file_that_is_a_fifo_is_refused_at_once_not_waited_on(tmp_path):
    root = _attribution().save(tmp_path / "a")
    (root / "attribution.safetensors").unlink()
    os.mkfifo(root / "attribution.safetensors")
    with pytest.raises(ConfigError, match=r"it is a directory, a FIFO or a device; allowed: a regular file"):
        Attribution.load(root)  # opened without blocking: no writer needed for the test to end


def test_a_missing_directory_or_file_names_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a directory holding a saved attribution \(it does not exist\)"):
        Attribution.load(tmp_path / "nothing")
    root = _attribution().save(tmp_path / "a")
    (root / "attribution.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"attribution\.safetensors': it is missing"):
        Attribution.load(root)


def test_an_attribution_saved_by_format_1_with_its_header_only_in_the_json_file_still_loads(tmp_path):
    """Files written before the header travelled inside the tensor file (and before buffers and initial_state)."""
    att = _attribution()
    root = att.save(tmp_path / "a")
    tensors = {k: v for k, v in st_load((root / "attribution.safetensors").read_bytes()).items()
               if k not in ("buffers", "initial_state")}
    (root / "attribution.safetensors").write_bytes(st_save(tensors))
    assert _same(att, Attribution.load(root))
    (root / "attribution.json").unlink()
    with pytest.raises(ConfigError, match=r"attribution\.json': it is missing \(the tensor file holds no header\)"):
        Attribution.load(root)


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[3])
    import explaind._io as io
    from explaind.kernel import _attribution_io
    from test_store_round6 import _attribution
    when = sys.argv[2]
    calls = []

    def killing_write(path, data, **kwargs):
        calls.append(path)
        if when == "inside the tensor file" and len(calls) == 1:
            with open(io.temporary_path(path), "wb") as fh:  # half of the new file, under its temporary name
                fh.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        if when == "between the two files" and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return io.atomic_write(path, data, **kwargs)

    _attribution_io.atomic_write = killing_write
    _attribution(seed=1).save(sys.argv[1])
""")


@pytest.mark.parametrize("when", ["inside the tensor file", "between the two files"])
def test_a_save_killed_by_sigkill_leaves_the_old_attribution_or_the_new_one_never_a_mix(tmp_path, when):
    old, new = _attribution(seed=0), _attribution(seed=1)
    root = old.save(tmp_path / "a")
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path, tests])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(root), when, tests], env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    back = Attribution.load(root)
    assert _same(back, old if when == "inside the tensor file" else new)
    assert any(".tmp-" in p.name for p in root.iterdir()) == (when == "inside the tensor file")
    new.save(root)  # the next save removes the killed one's temporary file
    assert not any(".tmp-" in p.name for p in root.iterdir()) and _same(Attribution.load(root), new)


# --------------------------------------------------------------------------- a model that is not the recorded one
def test_a_model_with_a_buffer_the_run_did_not_record_is_refused_naming_it(store):
    model = _model()
    model.register_buffer("scale", torch.ones(2, dtype=torch.float64), persistent=False)
    with pytest.raises(TrajectoryError, match=r"scale: model buffer of shape \(2,\), not in the recorded trajectory"):
        explaind.Trajectory.load(store, model=model)


def _scores(store: Path, model: nn.Module) -> Attribution:
    X, _ = regression_data(n=12)
    return explaind.InfluenceEstimator(keep=("train",)).fit(explaind.Trajectory.load(store, model=model)).transform(
        X[:3])


def test_a_float32_template_of_a_float64_run_gives_the_float64_scores_bit_for_bit(store):
    """The recorded tensors replace the template's in every evaluation: its dtype does not matter."""
    assert torch.equal(_scores(store, _model().float()).values, _scores(store, _model()).values)


def test_a_different_architecture_with_the_same_names_and_shapes_is_reported_by_the_residual_share(store):
    """Nothing in the store records the modules' code: the model's own forward is the contract. A template that
    computes something else leaves its difference in the residual, and the estimator warns, naming the share."""
    model = _model()
    model[1] = nn.ReLU()  # the recorded model has Tanh
    with pytest.warns(UserWarning, match=r"residual share 0\.\d+ > residual_tol"):
        _scores(store, model)


# --------------------------------------------------------------------------- plugins that are not installed
def _rebind(root: Path, manifest: dict) -> None:
    """Rewrite every step file's "run" entry as a recording of ``manifest`` would have written it (and its record)."""
    run = run_binding(TrajectoryManifest.model_validate(manifest))
    for record in manifest["steps"]:
        path = root / record["file"]["path"]
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        meta = {**json.loads(data[8 : 8 + n])["__metadata__"], "run": run}
        data = st_save(dict(st_load(data)), metadata=meta)
        path.write_bytes(data)
        record["file"].update(nbytes=len(data), checksum=checksum(data))


def test_a_sparse_store_whose_optimizer_adapter_is_not_installed_names_the_plugin_fix(tmp_path):
    root = tmp_path / "sparse"
    _record(root, 4, checkpoint_every=3)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["adapter"] = "someone_elses_sgd"  # as recorded with a plugin this environment lacks:
    _rebind(root, manifest)  # the step files bind the adapter's name (schema 3), so they are rewritten with it
    (root / "manifest.json").write_text(json.dumps(manifest))
    traj = explaind.Trajectory.load(root, model=_model())
    with pytest.raises(UnknownEntryError, match=r"Unknown optimizer adapter 'someone_elses_sgd'.*installing a "
                                                r"plugin that registers them"):
        traj.params(2)  # between checkpoints: replayed with the recorded optimizer


# --------------------------------------------------------------------------- the strict index
def test_a_journal_count_written_as_a_string_is_refused_when_the_store_is_opened(store):
    manifest = json.loads((store / "manifest.json").read_text())
    manifest.update(steps=[], complete=False)
    (store / "manifest.json").write_text(json.dumps(manifest))
    lines = (store / "journal.jsonl").read_bytes().splitlines()
    forged = lines[1].replace(b'"n_samples":4', b'"n_samples":"4"')
    assert forged != lines[1]
    (store / "journal.jsonl").write_bytes(b"\n".join([lines[0], forged, *lines[2:]]) + b"\n")
    with pytest.raises(TrajectoryError, match=r"journal\.jsonl' is corrupted at line 2: n_samples = '4': Input "
                                              r"should be a valid integer"):
        explaind.Trajectory.load(store, model=_model())


def test_a_manifest_number_written_as_a_string_is_refused_naming_the_field(store):
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["n_train"] = "12"
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrajectoryError, match=r"manifest\.json' is invalid: n_train = '12': Input should be a valid "
                                              r"integer"):
        explaind.Trajectory.load(store, model=_model())


# --------------------------------------------------------------------------- pruned-model files
@pytest.fixture
def pruned(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = {"0.weight": torch.rand(4, 3) > 0.5}
    apply_masks(model, masks, inplace=True)
    return save_pruned(model, tmp_path / "pruned.safetensors", masks, {"sparsity": 0.5})


def _plain() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _forge_pruned(path: Path, tensors=None, metadata=None) -> None:
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    old = dict(st_load(data))
    path.write_bytes(st_save((tensors or (lambda t: t))(old), metadata={**header, **(metadata or {})}))


PRUNED_EDITS = {
    "a weight of another shape": ({"tensors": lambda t: {**t, "state::0.weight": torch.zeros(4, 4)}},
                                  r"holds '0.weight' with shape \[4, 4\] and dtype torch.float32; the model's has "
                                  r"shape \[4, 3\]"),
    "float64 weights for a float32 model (rounded by a cast)": (
        {"tensors": lambda t: {**t, "state::0.bias": t["state::0.bias"].double() + 1e-12}},
        r"holds '0.bias' with shape \[4\] and dtype torch.float64; the model's has shape \[4\] and dtype "
        r"torch.float32"),
    "a mask of 0.5s (not boolean)": ({"tensors": lambda t: {**t, "mask::0.weight": torch.full((4, 3), 0.5)}},
                                     r"mask '0.weight' has dtype torch.float32; masks are boolean"),
    "a newer format version": ({"metadata": {"version": "2"}},
                               r"has format version '2'; this explaind reads version 1. It was written by a newer "
                               r"explaind: upgrade explaind"),
    "metadata that is not JSON": ({"metadata": {"metadata": "{sparsity"}},
                                  r"the metadata of .* is not JSON .*allowed: the JSON object save_pruned writes"),
}


@pytest.mark.parametrize("case", list(PRUNED_EDITS))
def test_a_pruned_model_file_that_is_not_what_save_pruned_wrote_is_refused(pruned, case):
    edit, message = PRUNED_EDITS[case]
    _forge_pruned(pruned, **edit)
    model = _plain()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        load_pruned(pruned, model)
    if case != "a mask of 0.5s (not boolean)":  # refused before anything is loaded
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_pruned_float32_file_loads_exactly_into_a_float64_model(pruned):
    model, masks, meta = load_pruned(pruned, _plain().double())
    stored = st_load(pruned.read_bytes())
    assert meta == {"sparsity": 0.5} and masks["0.weight"].dtype == torch.bool
    assert all(torch.equal(v, stored["state::" + k].double()) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- the environment
def test_a_relative_store_path_stays_the_same_store_after_os_chdir(template, tmp_path, monkeypatch):
    """A reader opened by a relative path, and a recorder writing one, keep their directory when the process
    changes its working directory (before: the writer put later step files into the new directory's 'w')."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copytree(template, tmp_path / "a" / "run")
    monkeypatch.chdir(tmp_path / "a")
    traj = explaind.Trajectory.load("run", model=_model())
    X, y = regression_data(n=12)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store="w") as rec:
        for i, idx in enumerate(batches(12, 4) * 2):
            if i == 2:
                os.chdir(tmp_path / "b")
            opt.zero_grad()
            F.mse_loss(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    assert sorted(os.listdir(tmp_path / "b")) == []
    assert torch.equal(traj.params(STEPS)["0.weight"], explaind.Trajectory.load(template, model=_model()).params(
        STEPS)["0.weight"])
    written = explaind.Trajectory.load(tmp_path / "a" / "w", model=_model())
    written.verify()
    assert written.n_steps == 6


def test_home_unset_a_read_only_tmpdir_and_a_newline_in_the_path_change_nothing(template, tmp_path, monkeypatch):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setenv("TMPDIR", str(readonly))
    root = tmp_path / "line\nbreak" / "run"
    _record(root, STEPS)
    traj = explaind.Trajectory.load(root, model=_model())
    traj.verify()
    ref = explaind.Trajectory.load(template, model=_model())
    assert all(torch.equal(traj.params(s)[k], ref.params(s)[k]) for s in range(STEPS + 1) for k in traj.param_names)
    att = _attribution()
    assert _same(att, Attribution.load(att.save(tmp_path / "line\nbreak" / "scores")))
    (root / "steps" / "000001.safetensors").unlink()
    with pytest.raises(TrajectoryError, match=r"'.*line\\nbreak/run/steps/000001\.safetensors' \(step 1\) is "
                                              r"missing"):
        explaind.Trajectory.load(root, model=_model()).params(2)


# --------------------------------------------------------------------------- run folders of explaind train
@pytest.mark.parametrize("edit, problem", [
    (lambda text: text.replace('"status": "complete"', '"status": "complete", "config": {"lr": 10.0}'),
     r"the key 'config' appears twice in one object"),
    (lambda text: text.replace('"model_config": {}', '"model_config": ' + "[" * 100000 + "]" * 100000),
     r"maximum recursion depth exceeded"),
], ids=["a key given twice", "JSON nested deeper than the parser goes"])
def test_a_run_json_that_parsers_could_read_differently_or_not_at_all_is_named_damaged(tmp_path, edit, problem):
    from explaind.studies.run_file import read_run_file, write_run_file

    write_run_file(tmp_path, {"config": {"lr": 0.1}, "dataset": {"name": "digits", "params": {}}, "model_config": {},
                              "status": "complete"})
    (tmp_path / "run.json").write_text(edit((tmp_path / "run.json").read_text()))
    with pytest.raises(TrajectoryError, match=r"run\.json' cannot be read \(.*" + problem + r".*The run folder is "
                                              r"damaged"):
        read_run_file(tmp_path)
