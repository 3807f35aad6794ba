"""train -> replicate -> influence -> report on a tiny recorded run, checked against plain torch."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
import torch
from _png import check_report_folder
from safetensors.torch import load_file

from explaind.cli import main
from explaind.datasets import digits

HIDDEN = 4
STEPS = 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "-q", "--out", str(folder), "--architecture", "mlp", "--dataset", "digits",
                 "--model", f"hidden_sizes=[{HIDDEN}]", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9",
                 "--batch-size", "64", "--steps", str(STEPS), "--eval-every", "2", "--dtype", "float64"])
    assert code == 0
    return folder


def _plain_mlp(params):
    """The recorded MLP rebuilt with plain torch layers (independent of the registry)."""
    net = torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10)).double()
    net.load_state_dict({k.removeprefix("net."): v for k, v in params.items()})
    return net


def _params(run_dir, s):
    import explaind

    traj = explaind.Trajectory.load(run_dir / "trajectory")
    return traj.params(s), traj.n_steps


def test_train_writes_a_run_with_honest_curves(run_dir):
    record = json.loads((run_dir / "run.json").read_text())
    assert record["info"]["n_steps"] == STEPS
    assert record["history"]["step"] == [0, 2, 4]
    final, n_steps = _params(run_dir, STEPS)
    assert n_steps == STEPS
    ds = digits(flatten=True, dtype=torch.float64)
    with torch.no_grad():
        logits = _plain_mlp(final)(ds.X_val)
    acc = float((logits.argmax(-1) == ds.y_val).double().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, ds.y_val))
    assert record["info"]["final_val_acc"] == pytest.approx(acc, abs=1e-12)
    assert record["info"]["final_val_loss"] == pytest.approx(loss, rel=1e-10)


def test_replicate_one_rule_json(run_dir, capsys):
    code = main(["replicate", str(run_dir), "--quadrature", "gauss-legendre", "--nodes", "3", "--n-test", "5",
                 "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert row["rule"] == "gauss-legendre-3" and row["n_test"] == 5 and row["n_steps"] == STEPS
    assert row["evals/step"] == 3.0
    assert row["argmax agreement"] == 1.0 and 0.0 <= row["KL"] < 1e-3
    # the default (adaptive) rule controls its error: within its tolerance per step
    assert main(["replicate", str(run_dir), "--n-test", "5", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    # a short run: the adaptive rule at the replica's own 1e-7 fits the default budget
    assert row["rule"] == "adaptive" and row["evals/step"] >= 2.0 and row["step error"] <= row["tol"] == 1e-7
    assert row["argmax agreement"] == 1.0 and row["KL"] < 1e-9 and row["max rel error"] < 1e-6
    # at the replica's tolerance given with --tol, to rounding level on this smooth run
    assert main(["replicate", str(run_dir), "--n-test", "5", "--json", "--tol", "1e-7"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["argmax agreement"] == 1.0 and row["KL"] < 1e-12 and row["max rel error"] < 1e-6


def test_replicate_table_of_a_run(run_dir, capsys):
    code = main(["replicate", str(run_dir), "--table", "--n-test", "3"])
    assert code == 0
    out = capsys.readouterr().out
    for label in ("midpoint-10", "midpoint-100", "gauss-legendre-4", "adaptive"):
        assert label in out
    assert "argmax agreement" in out and "max rel error" in out


def test_influence_step_group_is_complete_and_matches_the_model(run_dir, tmp_path, capsys):
    out_dir = tmp_path / "scores"
    code = main(["influence", str(run_dir), "--keep", "step,group", "--n-test", "3", "--out", str(out_dir), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["axes"] == ["test", "step", "group", "output"]
    tensors = load_file(str(out_dir / "attribution.safetensors"))
    values = tensors["values"]
    assert values.shape == (3, STEPS, 4, 1)
    # the explained quantity is the correct-class logit of the trained model, recomputed here with plain torch
    ds = digits(flatten=True, dtype=torch.float64)
    X, y = ds.X_val[:3], ds.y_val[:3]
    first, _ = _params(run_dir, 0)
    last, _ = _params(run_dir, STEPS)
    with torch.no_grad():
        start = _plain_mlp(first)(X).gather(1, y[:, None])
        final = _plain_mlp(last)(X).gather(1, y[:, None])
    assert torch.allclose(tensors["final"], final, rtol=1e-10, atol=1e-12)
    assert torch.allclose(tensors["initial"], start, rtol=1e-10, atol=1e-12)
    total = (tensors["initial"] + values.sum((1, 2)) + tensors["regularization"].sum((1, 2))
             + tensors["residual"].sum((1, 2)) + tensors["quadrature_error"].reshape(3, -1, 1).sum(1))
    assert torch.allclose(total, final, rtol=1e-9, atol=1e-10)
    # the CSV holds one row per cell with readable coordinates and the same numbers
    with (out_dir / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == values.numel()
    assert set(rows[0]) == {"test", "step", "group", "output", "value", "regularization", "residual"}
    groups = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    for row in rows[:: max(1, len(rows) // 7)]:
        t, s, g = int(row["test"]), int(row["step"]), groups.index(row["group"])
        assert float(row["value"]) == pytest.approx(float(values[t, s, g, 0]), rel=1e-15, abs=1e-300)


def test_influence_train_axis_with_loss_target(run_dir, tmp_path, capsys):
    out_dir = tmp_path / "train_scores"
    code = main(["influence", str(run_dir), "--keep", "train", "--target", "loss", "--n-test", "2", "--out",
                 str(out_dir), "--no-csv", "-q"])
    assert code == 0
    assert "completeness gap" in capsys.readouterr().out
    tensors = load_file(str(out_dir / "attribution.safetensors"))
    ds = digits(flatten=True, dtype=torch.float64)
    assert tensors["values"].shape == (2, ds.n_train, 1)
    assert not (out_dir / "scores.csv").exists()
    # samples never drawn into a batch have exactly zero influence
    import explaind

    traj = explaind.Trajectory.load(run_dir / "trajectory")
    used = torch.unique(torch.cat([torch.as_tensor(traj.batch(s)[0]) for s in range(STEPS)]))
    unused = np.setdiff1d(np.arange(ds.n_train), used.numpy())
    assert unused.size > 0
    assert torch.all(tensors["values"][:, torch.as_tensor(unused), :] == 0)


def test_report_renders_every_figure(run_dir, tmp_path, capsys):
    from explaind.validation import ValidationConfig, ValidationResult

    # a validation result in RUN/validation is included without being named
    lds = {"counterfactual": {0.5: (0.77, 0.011), 0.9: (0.95, 0.003), 0.99: (0.977, 0.001)}}
    result = ValidationResult(config=ValidationConfig.quick().as_dict(), lds=lds,
                              lds_per_test={"counterfactual": {f: [[v[0]]] for f, v in lds["counterfactual"].items()}},
                              removal={}, seconds={"counterfactual": 3.8})
    (run_dir / "validation").mkdir()
    try:
        result.to_json(run_dir / "validation" / "validation_tanh.json")
        out_dir = tmp_path / "report"
        code = main(["report", str(run_dir), "--out", str(out_dir), "--n-test", "4", "--json"])
    finally:
        shutil.rmtree(run_dir / "validation")
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["report"] == str(out_dir / "index.html")
    check_report_folder(out_dir, {"training_curves.png", "step_group_influence.png", "kernel_vs_regularization.png",
                                  "top_samples.png", "kernel_matrices.png", "validation_tanh.png"})
    html = (out_dir / "index.html").read_text()
    assert "Validation against retraining" in html and "<td>+0.977 ± 0.001</td>" in html


def test_influence_prints_its_evaluations_per_step_and_input(run_dir, tmp_path, capsys):
    """The mean over the steps of the evaluations per step and input the scores' meta stores (docs/quickstart.md
    quotes it; before, the command did not print it)."""
    out_dir = tmp_path / "step_scores"
    assert main(["influence", str(run_dir), "--keep", "step", "--n-test", "2", "--out", str(out_dir),
                 "--no-csv"]) == 0
    printed = re.search(r"; (\S+) path-gradient evaluations per step and input", capsys.readouterr().out)
    assert printed, "the influence command no longer prints its evaluations per step and input"
    stored = json.loads((out_dir / "attribution.json").read_text())["meta"]["evals_per_step"]
    assert len(stored) == STEPS
    assert float(printed.group(1)) == pytest.approx(sum(stored) / len(stored), rel=1e-3)
