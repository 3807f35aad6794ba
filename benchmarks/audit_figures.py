"""Rerun the commands behind figures of the docs and compare what they print with what the docs say.

Each :class:`Figure` names the page and a piece of text on the line that holds the figure (so its line is
found again after the page is edited), the command that measured it (written as in the docs, run from the
repository root or from a scratch folder), a regular expression that reads the value from the command's
output, the documented value and how close the rerun must come. Only figures whose command measures
something deterministic are listed (errors, residual shares, counts, bytes, test counts; never wall
times) and whose command runs in a few minutes on a 2-core machine. The table of docs/reproducing.md is
this script's output.

The commands run with ``OMP_NUM_THREADS=1`` and ``PYTHONPATH`` set to this checkout (its root, ``plugins``
and ``tests``), with ``python`` and ``explaind`` on the ``PATH`` meaning this interpreter and this
checkout's command line, so the docs' command lines run as written. A command shared by several figures
runs once; ``setup`` commands (e.g. the training run a ``replicate`` reads) run before, once.

Run: ``python benchmarks/audit_figures.py [--match TEXT ...] [--workdir DIR] [--list] [--reuse OUTPUTS ...]``.
It prints the load average before and after and one markdown row per figure (and keeps every command's output
in ``WORKDIR/outputs.txt``, which ``--reuse`` reads back instead of running those commands again); the exit
code is 1 when a figure did not reproduce. To add a figure, append a :class:`Figure` to :data:`FIGURES`.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: How a rerun value is compared with the docs' value.
MODES = ("equal", "bound")
#: Where a command runs: the repository root, or a scratch folder shared by the CLI commands.
WHERES = ("root", "scratch")
TIMEOUT_S = 600

_COLLECT = r"(\d+) tests? collected"
_QS_TRAIN = ("explaind train --out runs/grok -a modular_transformer -d modular --data p=23 --data n_train=0.6 "
             "--data n_val=null --model d_model=48 --model d_mlp=192 --lr 1e-2 --weight-decay 1 --betas 0.9 0.98 "
             "--steps 800 --stop-at 1.0 --dtype float64")
_CLI_TRAIN = ("explaind train --out runs/cli -a modular_transformer -d modular --data p=23 --data n_train=0.5 "
              "--data n_val=null --model d_model=32 --model d_mlp=128 --optimizer adamw --lr 3e-3 "
              "--weight-decay 4 --betas 0.9 0.98 --steps 1000 --stop-at 1.0 --dtype float64")


@dataclass(frozen=True)
class Figure:
    """One documented figure and the command that reproduces it.

    Parameters
    ----------
    name : str
        Short unique label.
    doc : str
        The page, relative to the repository root (``docs/recording.md``).
    anchor : str
        Text on the page's line that holds the figure (its first occurrence gives the line number).
    command : str
        The command line, as the docs write it (``python ...`` or ``explaind ...``).
    pattern : str
        Regular expression with one group, searched in the command's stdout and stderr (multi-line); every
        match's group is read as a number (commas and a trailing ``%`` dropped).
    value : float
        The docs' value.
    rel_tol : float
        Accepted relative difference; 0 for counts.
    mode : str
        ``"equal"``: ``|rerun - value| <= rel_tol * |value|``; ``"bound"`` (the docs give an upper bound,
        ``≤ value``): ``rerun <= value * (1 + rel_tol)``.
    agg : str
        How several matches combine: ``"max"``, ``"min"`` or ``"first"``.
    where : str
        ``"root"`` or ``"scratch"``.
    setup : tuple of str
        Commands run (once) before ``command`` in the same folder.
    """

    name: str
    doc: str
    anchor: str
    command: str
    pattern: str
    value: float
    rel_tol: float = 0.0
    mode: str = "equal"
    agg: str = "max"
    where: str = "root"
    setup: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Figure {self.name!r}: mode {self.mode!r} is not one of {MODES}.")
        if self.where not in WHERES:
            raise ValueError(f"Figure {self.name!r}: where {self.where!r} is not one of {WHERES}.")
        if self.agg not in ("max", "min", "first"):
            raise ValueError(f"Figure {self.name!r}: agg {self.agg!r} is not one of max, min, first.")
        if re.compile(self.pattern).groups != 1:
            raise ValueError(f"Figure {self.name!r}: its pattern needs exactly one group, got {self.pattern!r}.")
        if self.rel_tol < 0:
            raise ValueError(f"Figure {self.name!r}: rel_tol must be >= 0, got {self.rel_tol}.")

    def read(self, output: str) -> float | None:
        """The value the output shows (``None`` when the pattern does not match)."""
        found = [float(m.replace(",", "").rstrip("%")) for m in re.findall(self.pattern, output, re.MULTILINE)]
        if not found:
            return None
        return {"max": max, "min": min, "first": lambda v: v[0]}[self.agg](found)

    def verdict(self, rerun: float | None) -> str:
        """``"reproduced"``, ``"differs"`` or ``"no value"``."""
        if rerun is None:
            return "no value"
        if self.mode == "bound":
            ok = rerun <= self.value * (1 + self.rel_tol)
        else:
            ok = abs(rerun - self.value) <= self.rel_tol * abs(self.value)
        return "reproduced" if ok else "differs"

    def line(self, root: Path = ROOT) -> int | None:
        """The page's line number of the anchor (1-based), ``None`` when the page no longer holds it."""
        for number, text in enumerate((root / self.doc).read_text().splitlines(), 1):
            if self.anchor in text:
                return number
        return None


def _count(name: str, doc: str, anchor: str, test_file: str, value: int) -> Figure:
    """A test count: ``pytest --collect-only -q`` of one file."""
    return Figure(name, doc, anchor, f"python -m pytest --collect-only -q -p no:cacheprovider {test_file}",
                  _COLLECT, value)


def _column(case: str, index: int) -> str:
    """A pattern reading column ``index`` (0 = the first after the row's name) of the table rows starting ``case``."""
    return r"^\| (?:" + case + r") \|" + r"[^|]*\|" * index + r" ([-+.,\deE%]+)[^|]*\|"


#: A rounding-level figure or an upper bound ("≤"): the rerun within twice the docs' value.
_ROUNDING = (1.0, "bound")
_BC = "python tests/batch_coupled_losses_table.py"
_GOM = "docs/guide_own_model.md"
_QS = "docs/quickstart.md"
_ENG = "docs/engine.md"
_BENCH_ENGINE = "python benchmarks/bench_engine.py --skip-baseline --repeats 3"
#: The rows of the engine's cost table: (relative error or completeness gap, evaluations per step and input).
_ENGINE_ROWS = {
    "replica, adaptive (tol 1e-7)": (3.3e-10, 6.0),
    "replica, gauss-legendre 4": (1.5e-03, 4.0),
    "replica, midpoint 100": (3.5e-05, 100.0),
    "replica, GELU variant, adaptive (tol 1e-7)": (8.8e-16, 4.0),
    "influence keep=(train,), forward": (2.2e-15, 6.1),
    "influence keep=(train,), reverse": (3.3e-15, 6.1),
}
_CLI = "docs/cli.md"
_TABLE = "explaind replicate runs/grok --table"
_WINDOW = "explaind replicate runs/grok --steps 0:100"
_QS_INFLUENCE = "explaind influence runs/grok --keep step,group --out runs/grok/scores"
_GM = "python tests/grad_mode_table.py"
_SWITCHED = r"NormHead\((?:no_grad|set_grad_enabled|set_grad_enabled_call|decorated)\)"
#: The batch-coupled losses table: its row's text, the table script's case names (a regular expression), the
#: (replica, residual share, train scores) errors and the tolerance (a "≤" row: bounds within a factor 2).
_BC_ROWS = {
    "CLIP": ("| CLIP's symmetric InfoNCE, two towers", r"clip_\w+", (2.2e-12, 1.7e-15, 1.7e-12), _ROUNDING),
    "SimCLR": ("| SimCLR's NT-Xent on two views", r"simclr_\w+", (2.3e-12, 8.4e-16, 2.9e-12), _ROUNDING),
    "SupCon/triplet": ("| SupCon with labels (SGD momentum",
                       r"supcon_\w+|batch_hard_triplet_sgd_momentum|batch_hard_triplet_adam_dropout",
                       (4.0e-12, 4.2e-15, 3.1e-12), _ROUNDING),
    "REINFORCE/ListNet": ("| REINFORCE with the batch's mean reward", r"reinforce_\w+|listnet_\w+",
                          (7.9e-13, 1.5e-15, 8.8e-13), _ROUNDING),
    "triplet head bias": ("| batch-hard triplets under Adam with the head's bias",
                          "batch_hard_triplet_adam_dropout_head_bias", (3.5e-12, 9.8e-10, 9.1e-11), (0.5, "equal")),
}
_REC = "docs/recording.md"

FIGURES: list[Figure] = [
    # test counts of docs/recording.md
    _count("watch layouts tests", _REC, "9 of its 10 tests fail", "tests/test_optimizer_state_watch_layouts.py", 10),
    _count("store round 8 tests", _REC, "`tests/test_store_round8.py` (38 tests", "tests/test_store_round8.py", 38),
    _count("store round 9 tests", _REC, "80 since commit f1c4e0b", "tests/test_store_round9.py", 80),
    _count("salvage tests", _REC, "`tests/test_store_salvage.py` (22 tests", "tests/test_store_salvage.py", 22),
    _count("salvage round 10 tests", _REC, "test_store_salvage_round10.py`, 14 tests",
           "tests/test_store_salvage_round10.py", 14),
    _count("store round 10 tests", _REC, "24 since commit 9e87b0e", "tests/test_store_round10.py", 24),
    _count("store round 11 tests", _REC, "`tests/test_store_round11.py` (27 tests", "tests/test_store_round11.py", 27),
    _count("store round 12 tests", _REC, "`tests/test_store_round12.py` (17 tests", "tests/test_store_round12.py", 17),
    _count("store round 12 tools tests", _REC, "`tests/test_store_round12_tools.py` (21 tests",
           "tests/test_store_round12_tools.py", 21),
    # docs/guide_own_model.md: the batch-coupled losses table (float64, rounding level: within a factor 2)
    *[Figure(f"{label} {what}", _GOM, anchor, _BC, _column(cases, index), value, *tolerance)
      for label, (anchor, cases, values, tolerance) in _BC_ROWS.items()
      for index, (what, value) in enumerate(zip(("replica", "residual share", "train scores"), values))],
    # docs/guide_own_model.md: gradient switches inside forward (float64, adaptive rule at tol 1e-9)
    Figure("no_grad switches replica", _GOM, "so the replica (1.6e-10 against the trained model)", _GM,
           _column(_SWITCHED, 0), 1.6e-10, 0.5),
    Figure("no_grad switches step scores", _GOM, "`keep=(\"step\",)` scores (1.5e-10 against the", _GM,
           _column(_SWITCHED, 1), 1.5e-10, 0.5),
    Figure("no_grad switches train quadrature share (8.79 %)", _GOM, "leave 8.79 % of", _GM,
           _column(_SWITCHED, 2), 0.0879, 0.02),
    Figure("inference_mode replica", _GOM, "(replica 0.13 off)", _GM,
           _column(r"CentredHead\(inference_mode\)", 0), 0.13, 0.1),
    Figure("inference_mode fixed by no_grad replica", _GOM, "whose replica is exact (2.6e-10", _GM,
           _column(r"CentredHead\(no_grad\)", 0), 2.6e-10, 0.5),
    # docs/engine.md §7: the engine's cost table (float64; its errors and evaluation counts, not its times)
    *[Figure(f"engine: {row} error", _ENG, f"| {row} |", _BENCH_ENGINE, _column(re.escape(row), 1), error,
             *(_ROUNDING if row.startswith("influence") else (0.5, "equal")))
      for row, (error, _) in _ENGINE_ROWS.items()],
    *[Figure(f"engine: {row} evals per step", _ENG, f"| {row} |", _BENCH_ENGINE, _column(re.escape(row), 2), evals,
             0.02) for row, (_, evals) in _ENGINE_ROWS.items()],
    # docs/quickstart.md and docs/cli.md: the quickstart's run (float64; its length follows the CPU's rounding)
    Figure("quickstart run steps", _QS, "the documented run (seed 0) stopped at step 670", _QS_TRAIN,
           r"recorded (\d+) steps to runs/grok", 670, where="scratch"),
    Figure("table: midpoint-100 evaluations", _CLI, "(midpoint-100 alone is 2,144,000 evaluations", _TABLE,
           r"skipped midpoint-100: ([\d,]+) evaluations", 2_144_000, where="scratch", setup=(_QS_TRAIN,)),
    Figure("table: adaptive lower bound", _CLI, "adaptive's lower bound, 257,280", _TABLE,
           r"at least ([\d,]+) evaluations, with the", 257_280, where="scratch", setup=(_QS_TRAIN,)),
    Figure("table: evaluations of the rules computed", _CLI, "300,160 of the two rules computed", _TABLE,
           r"with the ([\d,]+) of the rules computed", 300_160, where="scratch", setup=(_QS_TRAIN,)),
    Figure("influence quadrature share (%)", _QS, "`influence` left 0.00437 % of the", _QS_INFLUENCE,
           r"quadrature error share ([\d.e+-]+)%", 0.00437, 0.01, where="scratch", setup=(_QS_TRAIN,)),
    Figure("influence evaluations per step and input", _QS, "at 2.41 evaluations", _QS_INFLUENCE,
           r"; ([\d.]+) path-gradient evaluations per step and input", 2.41, 0.01, where="scratch",
           setup=(_QS_TRAIN,)),
    Figure("replicate evaluations per step and input", _CLI, "(the adaptive rule at 1e-3 per step: 2.92",
           "explaind replicate runs/grok", r"^\S+ / adamw\s+adaptive-2\s+([\d.]+)", 2.92, 0.01, where="scratch",
           setup=(_QS_TRAIN,)),
    Figure("replicate largest step error", _QS, "(largest step error 9.96e-4",
           "explaind replicate runs/grok", r"largest step error ([\d.e-]+) of its step", 9.96e-4, 0.01,
           where="scratch", setup=(_QS_TRAIN,)),
    Figure("replicate max rel error vs trained model", _QS, "maximum relative error 2.7e-4 against",
           "explaind replicate runs/grok", r"against the trained model: max rel error ([\d.e-]+)", 2.7e-4, 0.02,
           where="scratch", setup=(_QS_TRAIN,)),
    Figure("replicate 0:100 pairs above 1e-7", _CLI, "says that 1,803 of 6,400 pairs", _WINDOW,
           r"quadrature left ([\d,]+) of 6400 \(step, input\) pairs above", 1803, where="scratch", setup=(_QS_TRAIN,)),
    Figure("replicate 0:100 largest error of those pairs", _CLI, "stayed above 1e-7, by up to 1.6e-3", _WINDOW,
           r"pairs above tol=1e-07, with relative error up to ([\d.e-]+)", 1.6e-3, 0.05, where="scratch",
           setup=(_QS_TRAIN,)),
    Figure("influence residual share (% of 6.9e-16)", _CLI, "6.9e-16 to the residual", _QS_INFLUENCE,
           r"residual share ([\d.e+-]+)%", 6.9e-14, *_ROUNDING, where="scratch", setup=(_QS_TRAIN,)),
    Figure("example influence residual share (% of 1.13e-15)", _CLI, "share is at rounding level (1.13e-15",
           "explaind influence runs/cli --out runs/cli/scores", r"residual share ([\d.e+-]+)%", 1.13e-13, *_ROUNDING,
           where="scratch", setup=(_CLI_TRAIN,)),
]


def _shims(folder: Path) -> Path:
    """A ``bin`` folder whose ``python`` is this interpreter and whose ``explaind`` is this checkout's command."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("python", f'exec "{sys.executable}" "$@"\n'),
                       ("explaind", f'exec "{sys.executable}" -m explaind.cli "$@"\n')):
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _environment(bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (ROOT, ROOT / "plugins", ROOT / "tests"))
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    return env


def _run(command: str, cwd: Path, env: dict[str, str]) -> str:
    """The command's stdout and stderr together (its exit code appended when not 0)."""
    try:
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"[timed out after {TIMEOUT_S} s]"
    tail = "" if done.returncode == 0 else f"\n[exit code {done.returncode}]"
    return done.stdout + done.stderr + tail


def read_outputs(path: Path) -> dict[str, str]:
    """The outputs an earlier run kept in its ``outputs.txt`` (each command's block starts with ``$ COMMAND``)."""
    found: dict[str, str] = {}
    command = None
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("$ "):
            command = line[2:].rstrip("\n")
            found[command] = ""
        elif command is not None:
            found[command] += line
    return found


def audit(figures: list[Figure], workdir: Path, reused: dict[str, str] | None = None) -> list[dict]:
    """Run each figure's commands (each distinct command once) and compare; one row per figure.

    ``reused`` maps commands to the output of an earlier run of them (``--reuse``), which are not run again.
    """
    env = _environment(_shims(workdir))
    scratch = workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    outputs: dict[tuple[str, str], str] = {}
    rows = []
    for fig in figures:
        cwd = ROOT if fig.where == "root" else scratch
        if reused and fig.command in reused:  # its setup ran with it
            outputs.setdefault((fig.where, fig.command), reused[fig.command])
        for command in (*fig.setup, fig.command):
            if (fig.where, command) not in outputs and (fig.where, fig.command) not in outputs:
                print(f"# running: {command}", file=sys.stderr, flush=True)
                outputs[(fig.where, command)] = _run(command, cwd, env)
        rerun = fig.read(outputs[(fig.where, fig.command)])
        rows.append({"figure": fig, "rerun": rerun, "verdict": fig.verdict(rerun)})
    (workdir / "outputs.txt").write_text("\n".join(f"$ {c}\n{o}" for (_, c), o in outputs.items()))
    return rows


def _number(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{int(x):,}" if x == int(x) and abs(x) >= 1 else f"{x:.4g}"


def table(rows: list[dict]) -> str:
    """The markdown table of docs/reproducing.md."""
    lines = ["| figure | doc:line | command | docs value | rerun value | tolerance | verdict |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        fig = row["figure"]
        if fig.mode == "bound":
            tol = "≤ docs" + (f" × {1 + fig.rel_tol:g}" if fig.rel_tol else "")
        else:
            tol = f"± {100 * fig.rel_tol:g} %" if fig.rel_tol else "="
        lines.append(f"| {fig.name} | {fig.doc}:{fig.line() or '?'} | `{fig.command}` | {_number(fig.value)} | "
                     f"{_number(row['rerun'])} | {tol} | {row['verdict']} |")
    return "\n".join(lines)


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--match", nargs="*", default=[], help="only figures whose name or command contains one of these")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--list", action="store_true", help="list the figures and their commands, run nothing")
    p.add_argument("--reuse", nargs="*", default=[], metavar="OUTPUTS",
                   help="outputs.txt files of earlier runs: their commands' outputs are read, not run again")
    args = p.parse_args(argv)
    figures = [f for f in FIGURES if not args.match or any(m in f.name or m in f.command for m in args.match)]
    if args.list:
        for fig in figures:
            print(f"{fig.name}\t{fig.doc}:{fig.line() or '?'}\t{fig.command}")
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="audit_figures_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {_load()}; outputs in {workdir / 'outputs.txt'}")
    reused = {command: text for path in args.reuse for command, text in read_outputs(Path(path)).items()}
    rows = audit(figures, workdir, reused)
    print(f"load average after: {_load()}")
    print(table(rows))
    return 0 if all(r["verdict"] == "reproduced" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
