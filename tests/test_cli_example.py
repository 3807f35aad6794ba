"""The worked example of docs/cli.md (``runs/cli``), run at a reduced size: exact and without a warning.

The commands are those ``benchmarks/bench_quickstart.py`` times at full size (its ``CLI_COMMANDS``, checked
against the page by ``tests/test_cli_quickstart.py``), with only the sizes reduced. The example trains in
float64, so ``influence`` and ``report`` split the updates to rounding level: the residual share is
checked at 1e-12, far below what the float32 rounding of a run's gradients leaves
(docs/cli.md, "Float32 runs and the residual").
"""

from __future__ import annotations

import json
import shlex
import sys
import warnings
from pathlib import Path

import pytest

from explaind.cli import main

#: The only changes to the documented commands: the sizes (a model width of 8 wants 2 heads).
SIZES = {"--data p=23": "--data p=7", "--model d_model=32": "--model d_model=8 --model n_heads=2",
         "--model d_mlp=128": "--model d_mlp=16", "--steps 1000": "--steps 30"}


def _cli_commands() -> list[str]:
    if "bench_quickstart" not in sys.modules:
        import importlib.util

        path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quickstart.py"
        spec = importlib.util.spec_from_file_location("bench_quickstart", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_quickstart"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_quickstart"].CLI_COMMANDS


def documented(command: str, run: Path, tmp: Path) -> list[str]:
    """The example's ``explaind COMMAND ... runs/cli ...`` at the reduced sizes, on ``run``."""
    (line,) = [c for c in _cli_commands() if c.split()[1] == command and "runs/cli" in c]
    for full, reduced in SIZES.items():
        line = line.replace(full, reduced)
    return [str(run) + a[len("runs/cli"):] if a.startswith("runs/cli") else a for a in shlex.split(line)[1:]]


def _warned(argv: list[str]) -> list[str]:
    from explaind.exceptions import ExplaindWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    return [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_example")
    argv = documented("train", tmp / "runs" / "cli", tmp)
    assert "--dtype" in argv and argv[argv.index("--dtype") + 1] == "float64"
    assert all(reduced.split()[0] + " " + reduced.split()[1] in " ".join(argv) for reduced in SIZES.values())
    assert main(["-q", *argv]) == 0
    return tmp / "runs" / "cli"


def test_influence_on_the_example_is_exact_and_warns_nothing(run, capsys):
    argv = documented("influence", run, run.parent)
    assert argv == ["influence", str(run), "--out", str(run / "scores")]
    assert _warned(argv) == []
    meta = json.loads((run / "scores" / "attribution.json").read_text())["meta"]
    assert meta["residual_share"] < 1e-12
    assert meta["quadrature_share"] < 1e-3
    assert "residual share" in capsys.readouterr().out


def test_report_on_the_example_warns_nothing(run, capsys):
    argv = documented("report", run, run.parent)
    assert argv == ["report", str(run)]
    assert _warned([*argv, "--data-steps", "8"]) == []
    assert (run / "report" / "index.html").exists()
