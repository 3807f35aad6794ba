"""``explaind influence/replicate --nproc 2`` (two processes under torchrun) give the numbers of ``--nproc 1``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from explaind.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nproc") / "run"
    code = main(["train", "-q", "--out", str(folder), "--architecture", "mlp", "--dataset", "digits",
                 "--model", "hidden_sizes=[4]", "--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0.1",
                 "--batch-size", "64", "--steps", "4", "--eval-every", "2", "--dtype", "float64"])
    assert code == 0
    return folder


def _explaind(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "explaind.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)


def test_influence_with_two_processes_equals_one(run_dir, tmp_path):
    args = ["influence", str(run_dir), "--keep", "step,train", "--n-test", "3", "--no-csv", "-q"]
    done = _explaind(*args, "--nproc", "2", "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("axes [") == 1 and done.stdout.count("wrote ") == 2  # only rank 0 prints and writes
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = load_file(str(tmp_path / "two" / "attribution.safetensors"))
    one = load_file(str(tmp_path / "one" / "attribution.safetensors"))
    assert set(two) == set(one)
    for key, ref in one.items():
        scale = max(1e-3, float(ref.abs().max()))
        assert float((two[key] - ref).abs().max()) <= 1e-12 * scale, key
    meta = json.loads((tmp_path / "two" / "attribution.json").read_text())
    assert meta["meta"]["processes"] == 2 and meta["meta"]["shards"] == {"tests": 2, "blocks": 1, "steps": 1}


def test_replicate_with_two_processes_equals_one(run_dir, capsys):
    args = ["replicate", str(run_dir), "--quadrature", "gauss-legendre", "--nodes", "3", "--n-test", "1", "--json"]
    done = _explaind(*args, "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout)["rows"][0]
    assert main(args) == 0
    one = json.loads(capsys.readouterr().out)["rows"][0]
    assert two["evals/step"] == one["evals/step"] == 3.0 and two["n_steps"] == one["n_steps"] == 4
    assert abs(two["max rel error"] - one["max rel error"]) <= 1e-12
    assert abs(two["KL"] - one["KL"]) <= 1e-12


def test_nproc_must_be_positive(run_dir, tmp_path, capsys):
    code = main(["influence", str(run_dir), "--nproc", "0", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "--nproc 0 must be a positive integer" in capsys.readouterr().err
