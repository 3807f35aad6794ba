"""The command line: help, plugins listing, and one-line errors for bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

import explaind
from explaind.cli import build_parser, main, parse_assignments
from explaind.exceptions import ConfigError


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "error:" in lines[0] and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"explaind {explaind.__version__}"
    code, _, err = _run([], capsys)
    assert code == 2 and "COMMAND" in err
    for command in ("demo", "train", "replicate", "influence", "prune", "report", "plugins", "study"):
        assert command in err


def test_plugins_text_and_json(capsys):
    code, out, _ = _run(["plugins"], capsys)
    assert code == 0
    for plugin in explaind.get_plugins():
        assert plugin["name"] in out
    code, out, _ = _run(["plugins", "--json"], capsys)
    data = json.loads(out)
    names = {p["name"] for p in data["plugins"]}
    assert {"explaind_losses", "explaind_optimizers", "explaind_architectures", "explaind_pruning"} <= names
    architectures = {n for p in data["plugins"] for n in p["entries"].get("architecture", [])}
    assert {"mlp", "cnn", "modular_transformer"} <= architectures


def test_console_script_is_installed():
    from pathlib import Path

    script = Path(sys.executable).parent / "explaind"
    assert script.is_file(), "the console script 'explaind' is not installed next to the interpreter"
    done = subprocess.run([str(script), "plugins", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["plugins"]
    bad = subprocess.run([str(script), "train", "--out", "x", "--steps", "-"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_python_dash_m_runs_the_same_command_line():
    """``python -m explaind`` is the console script: same output, same exit codes, one-line errors."""
    done = subprocess.run([sys.executable, "-m", "explaind", "plugins", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["plugins"] == json.loads(main_json(["plugins", "--json"]))["plugins"]
    bad = subprocess.run([sys.executable, "-m", "explaind", "train", "--out", "x", "--steps", "-"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--steps" in bad.stderr


def main_json(argv):
    """The stdout of :func:`explaind.cli.main` called in this process."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
        (["train", "--out", "X", "--steps", "x"], ["--steps", "invalid int value: 'x'"]),
        (["train"], ["--out"]),
        (["train", "--out", "{tmp}/r", "--dataset", "digit"], ["Unknown dataset 'digit'", "Did you mean 'digits'"]),
        (["train", "--out", "{tmp}/r", "--architecture", "mpl"], ["Unknown architecture 'mpl'", "mlp"]),
        (["train", "--out", "{tmp}/r", "--data", "p"], ["--data 'p' is not of the form KEY=VALUE"]),
        (["train", "--out", "{tmp}/r", "--optimizer", "adadelta"], ["'optimizer'", "'adadelta'", "'rmsprop'"]),
        (["train", "--out", "{tmp}/r", "--model", "widths=[3]"], ["widths"]),
        (["train", "--out", "{tmp}/r", "--steps", "0"], ["'steps'", "0"]),
        (["replicate", "{tmp}/missing"], ["'{tmp}/missing' does not exist", "explaind train --out {tmp}/missing"]),
        (["replicate", "{tmp}"], ["is not a run folder", "run.json is missing"]),
        (["replicate"], ["Give a run folder"]),
        (["replicate", "{tmp}", "--quadrature", "simpson"], ["Unknown quadrature 'simpson'", "midpoint"]),
        (["replicate", "--table", "--size", "huge"], ["invalid choice: 'huge'"]),
        (["influence", "{tmp}", "--keep", "steps", "--out", "{tmp}/o"], ["unknown axis 'steps'", "step, group"]),
        (["influence", "{tmp}", "--target", "best", "--out", "{tmp}/o"], ["Unknown target 'best'", "label"]),
        (["influence", "{tmp}", "--steps", "5", "--out", "{tmp}/o"], ["--steps '5' is not START:STOP"]),
        (["influence", "{tmp}", "--n-test", "0", "--out", "{tmp}/o"], ["--n-test 0 must be a positive integer"]),
        (["report", "{tmp}/missing"], ["does not exist"]),
        (["study"], ["choose a study: grokking"]),
        (["study", "grokking", "--p", "0", "--out", "{tmp}/g"], ["--p 0 must be a positive integer"]),
        (["demo", "--size", "medium"], ["invalid choice: 'medium'"]),
        (["plugins", "--threads", "0"], ["--threads 0 must be a positive integer"]),
        (["prune", "--tiny", "--nodes", "0", "--out", "{tmp}/p"], ["--nodes 0 must be a positive integer"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragments, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    fragments = [f.replace("{tmp}", str(tmp_path)) for f in fragments]
    try:
        code, _, err = _run(argv, capsys)
    except SystemExit as exc:  # argparse errors exit through parser.exit
        code, err = exc.code, capsys.readouterr().err
    _one_line_error(code, err, *fragments)


def test_existing_run_folder_is_refused(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")
    code, _, err = _run(["train", "--out", str(tmp_path), "--steps", "1"], capsys)
    _one_line_error(code, err, "already holds a run")


def test_damaged_run_json_is_reported(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{not json")
    code, _, err = _run(["replicate", str(tmp_path)], capsys)
    _one_line_error(code, err, "run.json", "damaged")


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(ConfigError, match="Unknown dataset"):
        main(["train", "--debug", "--out", str(tmp_path / "r"), "--dataset", "nope"])


def test_parse_assignments_reads_json_values():
    got = parse_assignments(["p=23", "n_train=0.5", "n_val=null", "classes=[3,8]", "name=abc", "flag=true"], "--data")
    assert got == {"p": 23, "n_train": 0.5, "n_val": None, "classes": (3, 8), "name": "abc", "flag": True}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignments(["=3"], "--data")


def test_parser_documents_every_subcommand_in_the_cli_reference():
    from pathlib import Path

    reference = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    for option in ("--quiet", "--json", "--debug", "--threads"):
        assert option in reference.split("## explaind demo")[0], f"{option} missing from the conventions"
    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{prefix} {name}", sub
                    yield from walk(sub, f"{prefix} {name}")

    commands = list(walk(build_parser(), "explaind"))
    assert "explaind study grokking" in [c for c, _ in commands]
    for command, subparser in commands:
        section = f"## {command}"
        assert section in reference, f"docs/cli.md lacks the section {section!r}"
        body = reference.split(section, 1)[1].split("\n## ", 1)[0]
        for action in subparser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option not in ("--help", "--quiet", "--json", "--debug", "--threads"):
                    assert option in body, f"the section of '{command}' in docs/cli.md lacks {option}"


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["replicate", "{tmp}", "--tabel"], ["explaind replicate: error: unknown option '--tabel'",
                                            "Did you mean '--table'?", "--quadrature, --nodes", "--max-evals"]),
        (["train", "--out", "{tmp}/r", "--optimiser", "sgd"], ["unknown option '--optimiser'",
                                                               "Did you mean '--optimizer'?", "--weight-decay"]),
        (["study", "grokking", "--setps", "3"], ["explaind study grokking: error: unknown option '--setps'",
                                                 "Did you mean '--steps'?"]),
        (["--quite", "plugins"], ["explaind plugins: error: unknown option '--quite'", "Did you mean '--quiet'?"]),
        (["influence", "{tmp}", "--out", "{tmp}/o", "--zzz"], ["unknown option '--zzz'. The options of"]),
        (["replicate", "{tmp}/a", "{tmp}/b"], ["unexpected argument '{tmp}/b'", "usage: explaind replicate"]),
        (["train", "--out", "{tmp}/r", "-a", "modular_transformer", "-d", "modular", "--model", "d_modl=3"],
         ["invalid value for 'd_modl'", "the fields are: p, d_model", "did you mean 'd_model'?", "--model KEY=VALUE"]),
    ],
)
def test_a_mistyped_option_names_the_closest_one_and_the_others(argv, fragments, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code, _, err = _run(argv, capsys)
    except SystemExit as exc:
        code, err = exc.code, capsys.readouterr().err
    _one_line_error(code, err, *[f.replace("{tmp}", str(tmp_path)) for f in fragments])


@pytest.fixture(scope="module")
def python_store(tmp_path_factory):
    """A trajectory store recorded in Python (TrajectoryRecorder(store=...)), as in docs/quickstart.md."""
    import torch

    folder = tmp_path_factory.mktemp("python") / "my_run"
    torch.manual_seed(0)
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(3, (16,))
    model = explaind.build_model("mlp", {"in_features": 4, "hidden_sizes": [5], "out_features": 3}, seed=0,
                                 dtype="float64")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = explaind.TrajectoryRecorder(model, optimizer, loss="cross_entropy", train_data=(X, y), store=folder)
    with recorder:
        for idx in torch.arange(16).reshape(4, 4):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            recorder.log_batch(idx)
            optimizer.step()
    return folder


def test_a_python_store_is_not_taken_for_a_run_folder(python_store, tmp_path, capsys):
    for argv in (["replicate", str(python_store)], ["influence", str(python_store), "--out", str(tmp_path / "o")],
                 ["report", str(python_store)]):
        code, _, err = _run(argv, capsys)
        _one_line_error(code, err, f"{str(python_store)!r} is a trajectory store recorded in Python",
                        f"explaind.Trajectory.load('{python_store}')", "explaind train --out")
    # 'explaind train' never writes a run into it
    code, _, err = _run(["train", "--out", str(python_store), "--steps", "1"], capsys)
    _one_line_error(code, err, "is a trajectory store recorded in Python", "Choose a new --out folder")
    assert not (python_store / "run.json").exists()


def test_the_trajectory_inside_a_run_folder_points_at_the_folder(python_store, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(python_store, run / "trajectory")
    (run / "run.json").write_text("{}")
    code, _, err = _run(["replicate", str(run / "trajectory")], capsys)
    _one_line_error(code, err, "is the trajectory inside the run folder", f"'explaind replicate {run}'")


def test_warnings_are_one_line_naming_the_command(monkeypatch, capsys):
    import warnings

    from explaind import cli_commands

    seen = []
    monkeypatch.setattr(cli_commands, "cmd_plugins",
                        lambda args, out: seen.append(warnings.formatwarning("inexact", UserWarning, "x.py", 3)) or 0)
    assert main(["plugins"]) == 0
    assert seen == ["explaind plugins: warning: inexact\n"]
    assert warnings.formatwarning("inexact", UserWarning, "x.py", 3) != seen[0]  # restored after the command


def test_a_warning_during_a_progress_bar_starts_on_its_own_line(monkeypatch, capsys):
    import warnings

    from tqdm import tqdm

    from explaind import cli_commands

    def handler(args, out):
        with tqdm(total=2, desc="quadrature") as bar:
            bar.update(1)
            seen.append(warnings.formatwarning("inexact", UserWarning, "x.py", 3))
        return 0

    seen = []
    monkeypatch.setattr(cli_commands, "cmd_plugins", handler)
    assert main(["plugins"]) == 0
    assert seen == ["\nexplaind plugins: warning: inexact\n"]
