"""benchmarks/audit_figures.py: its list of figures parses, names pages that hold the figures and commands whose
files exist; its reading and comparison of a command's output (fast: nothing is run)."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("audit_figures", ROOT / "benchmarks" / "audit_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


audit = _module()


def test_the_list_holds_at_least_thirty_figures_with_unique_names():
    names = [f.name for f in audit.FIGURES]
    assert len(names) >= 30
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("fig", audit.FIGURES, ids=lambda f: f.name)
def test_each_figure_is_found_on_its_page(fig):
    assert (ROOT / fig.doc).is_file(), fig.doc
    assert fig.line(ROOT) is not None, f"{fig.doc} no longer holds {fig.anchor!r}: update the figure's entry"


def _named_files(command: str) -> list[str]:
    return [t for t in shlex.split(command) if t.endswith(".py") or t.startswith(("tests/", "benchmarks/"))]


@pytest.mark.parametrize("fig", audit.FIGURES, ids=lambda f: f.name)
def test_each_command_names_existing_files(fig):
    for command in (*fig.setup, fig.command):
        assert command.split()[0] in ("python", "explaind"), command
        for name in _named_files(command):
            # a bare test file name is one of tests/hf_strangers_table.py's arguments, under tests/
            assert (ROOT / name).is_file() or (ROOT / "tests" / name).is_file(), f"{command!r} names {name!r}"


def test_a_scratch_command_of_the_cli_is_run_from_the_scratch_folder():
    for fig in audit.FIGURES:
        if fig.command.startswith("explaind "):
            assert fig.where == "scratch", fig.name


def test_bad_entries_are_refused_naming_the_value():
    with pytest.raises(ValueError, match="mode 'close' is not one of"):
        audit.Figure("x", "README.md", "a", "python a.py", r"(\d+)", 1.0, mode="close")
    with pytest.raises(ValueError, match="exactly one group"):
        audit.Figure("x", "README.md", "a", "python a.py", r"\d+", 1.0)
    with pytest.raises(ValueError, match="where 'home' is not one of"):
        audit.Figure("x", "README.md", "a", "python a.py", r"(\d+)", 1.0, where="home")
    with pytest.raises(ValueError, match="rel_tol must be >= 0"):
        audit.Figure("x", "README.md", "a", "python a.py", r"(\d+)", 1.0, rel_tol=-1)


def test_a_test_count_is_read_and_compared_exactly():
    fig = audit._count("n", "README.md", "a", "tests/test_x.py", 38)
    assert fig.read("....\n38 tests collected in 2.31s\n") == 38
    assert fig.verdict(38.0) == "reproduced"
    assert fig.verdict(39.0) == "differs"
    assert fig.verdict(fig.read("no tests ran")) == "no value"


def test_table_columns_are_read_by_row_name_and_combined():
    output = "\n".join([
        "| case | replica error | residual share | train-score error |",
        "| clip_a | 1.0e-12 | 3.0e-16 | 2.0e-12 |",
        "| clip_b | 2.5e-12 | 1.0e-16 | 1.0e-12 |",
        "| clip_b_shown | 9.0e-10 | 9.0e-10 | 9.0e-10 |",
        "| other | 1,234 | 0.5% | 7 |",
    ])
    bound = audit.Figure("x", "README.md", "a", "python a.py", audit._column(r"clip_a|clip_b", 0), 2.2e-12, 0.0,
                         "bound")
    assert bound.read(output) == 2.5e-12
    assert bound.verdict(bound.read(output)) == "differs"
    assert audit.Figure("x", "README.md", "a", "python a.py", audit._column(r"clip_a|clip_b", 0), 2.2e-12, 0.2,
                        "bound").verdict(2.5e-12) == "reproduced"
    assert audit.Figure("x", "README.md", "a", "python a.py", audit._column(r"clip_\w+", 1), 1.0,
                        agg="min").read(output) == 1.0e-16
    assert audit.Figure("x", "README.md", "a", "python a.py", audit._column("other", 0), 1.0).read(output) == 1234
    assert audit.Figure("x", "README.md", "a", "python a.py", audit._column("other", 1), 1.0).read(output) == 0.5


def test_the_table_names_each_figure_with_its_line():
    fig = audit.FIGURES[0]
    text = audit.table([{"figure": fig, "rerun": fig.value, "verdict": fig.verdict(fig.value)}])
    assert f"| {fig.doc}:{fig.line(ROOT)} |" in text
    assert "| reproduced |" in text


def test_outputs_kept_by_a_run_are_read_back_per_command(tmp_path):
    kept = tmp_path / "outputs.txt"
    kept.write_text("$ python a.py\n| x | 1 |\nrecorded 670 steps\n$ explaind plugins\nplugins: 3\n")
    found = audit.read_outputs(kept)
    assert found == {"python a.py": "| x | 1 |\nrecorded 670 steps\n", "explaind plugins": "plugins: 3\n"}
