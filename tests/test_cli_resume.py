"""``explaind train`` writes run.json first and resumes interrupted runs; damaged run folders give one-line errors."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import explaind
from explaind.cli import main
from explaind.studies import analysis
from explaind.studies.runs import load_run

TRAIN = ["train", "-q", "--steps", "24", "--batch-size", "40", "--eval-every", "5", "--dtype", "float64",
         "--model", "hidden_sizes=[6]", "--data", "classes=[0,1,2]", "--optimizer", "adam"]


def _one_line_error(capsys, argv, *fragments):
    capsys.readouterr()  # earlier output
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture()
def interrupt_at():
    """Raise KeyboardInterrupt (Ctrl-C) before optimizer step number ``k`` (1-based) of the next training."""
    handles = []

    def arm(k):
        count = {"n": 0}

        def hook(optimizer, args, kwargs):
            count["n"] += 1
            if count["n"] == k:
                raise KeyboardInterrupt

        handles.append(register_optimizer_step_pre_hook(hook))

    yield arm
    for handle in handles:
        handle.remove()


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "whole"
    assert main([*TRAIN, "--out", str(folder)]) == 0
    return folder


def test_run_json_is_written_before_recording(tmp_path, interrupt_at, capsys):
    interrupt_at(1)
    assert main([*TRAIN, "--out", str(tmp_path / "run")]) == 130
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "recording" and record["config"]["steps"] == 24
    assert record["history"]["step"] == [0]


def test_an_interrupted_run_resumes_to_the_uninterrupted_trajectory(tmp_path, complete_run, interrupt_at, capsys,
                                                                    caplog):
    folder = tmp_path / "run"
    interrupt_at(13)
    assert main([*TRAIN, "--out", str(folder)]) == 130
    with caplog.at_level(logging.WARNING):
        partial = load_run(folder)  # usable as it is, with a note on how to resume
    assert 0 < partial.trajectory.n_steps <= 12 and "--resume" in caplog.text
    assert main(["train", "-q", "--json", "--out", str(folder), "--resume", "--steps", "24"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["resumed_at"] == partial.trajectory.n_steps and info["n_steps"] == 24
    resumed, whole = load_run(folder), load_run(complete_run)
    a, b = resumed.trajectory, whole.trajectory
    assert a.n_steps == b.n_steps == 24
    for s in range(25):
        for name, t in b.params(s).items():
            assert torch.equal(a.params(s)[name], t), (s, name)
    for s in range(24):
        assert all(torch.equal(x, y) for x, y in zip(a.batch(s), b.batch(s)))
    assert resumed.history.to_dict() == whole.history.to_dict()
    assert json.loads((folder / "run.json").read_text())["status"] == "complete"


def test_resume_refuses_other_settings_and_complete_runs(tmp_path, complete_run, interrupt_at, capsys):
    _one_line_error(capsys, ["train", "--out", str(complete_run), "--resume"], "is complete", "nothing to resume")
    folder = tmp_path / "run"
    interrupt_at(3)
    assert main([*TRAIN, "--out", str(folder)]) == 130
    _one_line_error(capsys, ["train", "--out", str(folder), "--resume", "--lr", "0.5"], "--lr 0.5",
                    "differs from the run's 0.001", "Drop --lr")
    _one_line_error(capsys, [*TRAIN, "--out", str(folder)], "holds an interrupted run",
                    f"'explaind train --out {folder} --resume'")


def test_a_trajectory_without_run_json_gives_the_fix(tmp_path, complete_run, capsys):
    folder = tmp_path / "orphan"
    shutil.copytree(complete_run / "trajectory", folder / "trajectory")
    for argv in (["replicate", str(folder)], ["influence", str(folder), "--out", str(tmp_path / "o")],
                 ["train", "--out", str(folder), "--resume"]):
        _one_line_error(capsys, argv, "no run.json", "explaind.Trajectory.load")
    _one_line_error(capsys, ["train", "--out", str(folder)], "without run.json", "Delete the folder")


@pytest.mark.parametrize("edit, fragment", [
    (lambda r: r.pop("config"), "lacks the field 'config'"),
    (lambda r: r.pop("dataset"), "lacks the field 'dataset'"),
    (lambda r: r.pop("model_config"), "lacks the field 'model_config'"),
    (lambda r: r["dataset"].pop("name"), "lacks the field 'dataset.name'"),
    (lambda r: r.update(history=[1, 2]), "'history' of type list"),
    (lambda r: r.update(status="done"), "status 'done'"),
])
def test_a_damaged_run_json_is_one_line_naming_the_field(tmp_path, complete_run, capsys, edit, fragment):
    folder = tmp_path / "run"
    shutil.copytree(complete_run, folder)
    record = json.loads((folder / "run.json").read_text())
    edit(record)
    (folder / "run.json").write_text(json.dumps(record))
    _one_line_error(capsys, ["replicate", str(folder)], fragment, "train it again")


def test_the_csv_limit_is_checked_before_computing(complete_run, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the influence was computed before the CSV size was checked")

    monkeypatch.setattr(analysis, "influence", refuse)
    monkeypatch.setattr(analysis, "CSV_LIMIT", 1000)
    _one_line_error(capsys, ["influence", str(complete_run), "--keep", "step,param", "--out", str(tmp_path / "o")],
                    "would write a CSV of", "nothing was computed", "--no-csv")


@pytest.mark.parametrize("keep, target", [(("step", "group"), "label"), (("train",), "all"), (("param",), "loss"),
                                          (("step", "train"), "predicted")])
def test_the_csv_row_estimate_is_the_computed_size(complete_run, keep, target):
    run = load_run(complete_run)
    att = analysis.influence(run, keep=keep, target=target, steps=(2, 6), n_test=3, quadrature="left")
    assert analysis.csv_rows(run, keep, target, 4, 3) == att.values.numel()


def test_the_library_loads_the_trajectory_of_a_run(complete_run):
    run = load_run(complete_run)
    again = explaind.Trajectory.load(complete_run / "trajectory", train_data=run.dataset.train)
    assert again.n_steps == 24


_CHILD = """
import sys, time
from torch.optim.optimizer import register_optimizer_step_post_hook
from explaind.cli import main
register_optimizer_step_post_hook(lambda *args: time.sleep(0.02))  # a slow loop, so the kill lands mid-run
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_resumes_to_the_uninterrupted_trajectory(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    argv = [*TRAIN, "--steps", "60", "--eval-every", "4"]
    folder = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, *argv, "--out", str(folder)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            try:
                steps = json.loads((folder / "run.json").read_text())["history"]["step"]
            except (OSError, ValueError, KeyError):
                steps = [0]
            if steps[-1] >= 20:
                break
            time.sleep(0.01)
        assert child.poll() is None, "the run ended before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert json.loads((folder / "run.json").read_text())["status"] == "recording"
    assert main(["train", "-q", "--out", str(folder), "--resume"]) == 0
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    resumed, whole = load_run(folder), load_run(tmp_path / "whole")
    a, b = resumed.trajectory, whole.trajectory
    assert a.n_steps == b.n_steps == 60 and resumed.info["resumed_at"] >= 16
    for s in range(61):
        for name, t in b.params(s).items():
            assert torch.equal(a.params(s)[name], t), (s, name)
    assert resumed.history.to_dict() == whole.history.to_dict()
