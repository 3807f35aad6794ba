"""The numbers the documentation quotes about runs, produced by running the documented commands.

``python -m explaind.studies.docs_numbers`` (from the repository root, about eight minutes on
the 2-core development machine) runs

* ``explaind demo --threads 1`` (the ``make demo`` run, size ``small``),
* ``explaind replicate --table --threads 1`` (the reference fidelity table, size ``small``),
* ``python examples/quickstart.py`` (the quickstart's replica and influence),
* with ``--only engine`` (not run by default: it times, so run it on an idle machine)
  ``python benchmarks/bench_engine.py --skip-baseline --repeats 3`` (docs/engine.md §7),

and writes every number the pages in ``docs/`` quote about them to ``docs/numbers.json``, each
formatted as the docs print it. ``--write-docs`` then puts them into the pages: a number is
written in Markdown as ``<!--n:KEY-->VALUE<!--/n-->`` and a generated table as
``<!--table:KEY-->`` … ``<!--/table-->``. ``tests/test_docs_numbers.py`` checks that every
marked value in ``docs/`` equals the file, without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import re
import runpy
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["NUMBER", "TABLE", "collect", "fill_docs", "markdown_table", "main"]

logger = logging.getLogger(__name__)

#: ``<!--n:KEY-->VALUE<!--/n-->``: one generated number (or short phrase) in a page.
NUMBER = re.compile(r"<!--n:([\w.\-]+)-->(.*?)<!--/n-->")
#: ``<!--table:KEY-->`` ... ``<!--/table-->``: a generated Markdown table.
TABLE = re.compile(r"<!--table:([\w.\-]+)-->\n(.*?)<!--/table-->", re.S)

_FIDELITY_COLUMNS = ("setup", "rule", "evals/step", "argmax agreement", "KL", "max rel error")


def _g(value: float, digits: int = 2) -> str:
    """Scientific notation as the docs print it: ``3.3e-10``, ``0`` for zero."""
    return "0" if value == 0 else f"{value:.{digits - 1}e}".replace("e-0", "e-").replace("e+0", "e")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows``; a ``setup`` repeated from the row above is left blank."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    previous = None
    for row in rows:
        cells = []
        for column in columns:
            value = row[column]
            if column == "setup":
                cells.append("" if value == previous else str(value))
                previous = value
            elif column == "evals/step":
                cells.append(f"{value:.1f}" if isinstance(value, float) and not float(value).is_integer()
                             else f"{int(value)}")
            elif isinstance(value, float):
                cells.append(f"{value:.3g}" if column == "argmax agreement" else _g(value))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _demo_numbers(size: str) -> dict[str, Any]:
    from .demo import run_demo
    from .grokking import PRESETS
    from .phases import detect_phases
    from .runs import load_run

    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo(Path(tmp) / "report", size=size, seed=0)
        run = load_run(result["run"])
        scores = json.loads((Path(tmp) / "report" / "scores.json").read_text())
    preset, outcome, history = PRESETS[size], result["outcome"], run.history
    phases = detect_phases(history, n_steps=run.trajectory.n_steps) if outcome["generalised"] else []
    at_train = history.val_acc[history.step.index(outcome["train_step"])] if outcome["train_step"] else None
    values: dict[str, str] = {
        "p": str(preset["data"]["p"]), "train_fraction": f"{preset['data']['n_train']:.0%}",
        "lr": f"{preset['lr']:g}", "weight_decay": f"{preset['weight_decay']:g}", "max_steps": str(preset["steps"]),
        "n_train": str(run.dataset.n_train), "n_val": str(run.dataset.n_val), "n_steps": str(result["n_steps"]),
        "train_step": str(outcome["train_step"]), "val_step": str(outcome["val_step"]),
        "delay": str(outcome["val_step"] - outcome["train_step"]) if outcome["generalised"] else "none",
        "val_at_train_step": f"{at_train:.2f}" if at_train is not None else "n/a",
        "final_val_acc": f"{outcome['final_val']:.3f}", "grokked": "yes" if outcome["grokked"] else "no",
        "phases": ", ".join(f"{ph.name} {ph.start}–{ph.stop}" for ph in phases) or "none (no generalisation)",
        "seconds": f"{result['seconds']:.0f}",
        "completeness_gap": _g(scores["exactness"]["completeness_gap"]),
        "quadrature_error": f"{scores['exactness']['quadrature_error']:.3g}",
        "quadrature_relative": f"{scores['exactness']['relative_to_output']:.1%}",
        "quadrature_relative_drawn": f"{scores['exactness']['relative_to_drawn']:.2%}",
    }
    for stage, seconds in {**result["timings"], **scores["timings"]}.items():
        values[f"{stage.replace('_seconds', '')}_seconds"] = f"{seconds:.0f}"
    for row in result["fidelity"]:  # the demo's adaptive row (replicate's default rule) keeps the key "adaptive"
        key = "adaptive" if row["rule"].startswith("adaptive") else row["rule"]
        values[f"{key}.evals"] = f"{row['evals/step']:.1f}"
        values[f"{key}.max_rel_error"] = _g(row["max rel error"])
    return {"values": values, "history": history.to_dict()}


def _reference_numbers(size: str) -> dict[str, Any]:
    from .fidelity import reference_table

    rows = reference_table(size)
    adaptive = [float(r["evals/step"]) for r in rows if r["rule"] == "adaptive"]
    values = {"adaptive_evals_min": f"{min(adaptive):.1f}", "adaptive_evals_max": f"{max(adaptive):.1f}",
              "seconds": f"{sum(float(r['seconds']) for r in rows):.0f}"}
    return {"values": values, "tables": {"fidelity": markdown_table(rows, _FIDELITY_COLUMNS)}}


def _quickstart_numbers(root: Path) -> dict[str, Any]:
    with contextlib.redirect_stdout(io.StringIO()):
        result = runpy.run_path(str(root / "examples" / "quickstart.py"))["main"](False)
    report = result["fidelity"]
    return {"values": {"evals_per_step": f"{float(report['evals_per_step'].mean()):.1f}",
                       "max_rel_error": _g(float(report["max_rel_error"])),
                       "argmax_agreement": f"{float(report['argmax_agreement']):g}",
                       "completeness_gap": _g(float(result["completeness_gap"]))}}


#: ``benchmarks/bench_engine.py`` rows quoted in docs/engine.md §7, by the key the docs use.
_ENGINE_ROWS = {"replica, adaptive (tol 1e-7)": "adaptive", "replica, gauss-legendre 4": "gl4",
                "replica, midpoint 100": "midpoint", "replica, GELU variant, adaptive (tol 1e-7)": "gelu",
                "influence keep=(train,), reverse": "train_reverse",
                "influence keep=(train,), forward": "train_forward",
                "influence keep=(train,), reverse, factored='never'": "train_never"}


def _engine_numbers(root: Path) -> dict[str, Any]:
    """Run the engine benchmark (torch's default threads, best of 3) and keep the rows the docs quote."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_engine.py"), "--skip-baseline",
                           "--repeats", "3"], capture_output=True, text=True, check=True, cwd=root)
    rows = []
    values: dict[str, str] = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = _ENGINE_ROWS.get(cells[0]) if len(cells) >= 6 else None
        if key is None:
            continue
        rows.append({"measurement": cells[0], "time (s)": cells[1], "rel. error": cells[2],
                     "evals / step / input": cells[3]})
        values[f"{key}.seconds"] = cells[1]
        values[f"{key}.error"] = cells[2].split(" ")[0]
        values[f"{key}.evals"] = cells[3]
        if key == "adaptive":
            values["adaptive.ratio"] = cells[5].split("x batched")[0] + "×"
    table = markdown_table(rows, ("measurement", "time (s)", "rel. error", "evals / step / input"))
    return {"values": values, "tables": {"cost": table}}


def collect(root: Path, *, size: str = "small", parts: Sequence[str] = ("demo", "replicate", "quickstart")) -> dict:
    """Run the documented commands and gather their numbers (see the module docstring).

    Parameters
    ----------
    root : Path
        Repository root (for ``examples/quickstart.py``).
    size : str
        Size of the demo and of the reference table (``small`` is what the docs describe).
    parts : sequence of str
        Which commands to run.

    Returns
    -------
    dict
        ``values`` (key -> text), ``tables`` (key -> Markdown), ``commands``, ``machine``, ``seconds``.
    """
    torch.set_num_threads(1)  # the documented commands run with --threads 1
    runners = {"demo": ("explaind demo --threads 1", lambda: _demo_numbers(size)),
               "replicate": ("explaind replicate --table --threads 1", lambda: _reference_numbers(size)),
               "quickstart": ("python examples/quickstart.py", lambda: _quickstart_numbers(root)),
               "engine": ("python benchmarks/bench_engine.py --skip-baseline --repeats 3",
                          lambda: _engine_numbers(root))}
    out: dict[str, Any] = {"values": {}, "tables": {}, "commands": {}, "size": size, "seconds": {},
                           "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                       "threads": torch.get_num_threads()}}
    for part in parts:
        command, runner = runners[part]
        logger.info("docs numbers: running %s", command)
        start = time.perf_counter()
        found = runner()
        out["commands"][part] = command
        out["seconds"][part] = round(time.perf_counter() - start, 1)
        out["values"].update({f"{part}.{k}": v for k, v in found.get("values", {}).items()})
        out["tables"].update({f"{part}.{k}": v for k, v in found.get("tables", {}).items()})
        if "history" in found:
            out[f"{part}_history"] = found["history"]
    return out


def fill_docs(numbers: dict[str, Any], pages: Sequence[Path]) -> list[Path]:
    """Write the generated values and tables into the markers of ``pages``; returns the pages changed.

    Raises
    ------
    KeyError
        When a page marks a key that ``numbers`` lacks.
    """
    changed = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        new = NUMBER.sub(lambda m: f"<!--n:{m.group(1)}-->{numbers['values'][m.group(1)]}<!--/n-->", text)
        new = TABLE.sub(lambda m: f"<!--table:{m.group(1)}-->\n{numbers['tables'][m.group(1)]}<!--/table-->", new)
        if new != text:
            page.write_text(new, encoding="utf-8")
            changed.append(page)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run, write ``docs/numbers.json`` and (``--write-docs``) fill the pages."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="repository root (default: the current folder)")
    parser.add_argument("--size", default="small")
    parser.add_argument("--only", nargs="*", default=None, help="demo, replicate, quickstart and/or engine")
    parser.add_argument("--write-docs", action="store_true", help="fill the markers in docs/*.md")
    parser.add_argument("--fill-only", action="store_true",
                        help="run nothing: fill the markers in docs/*.md from the existing docs/numbers.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(args.root)
    target = root / "docs" / "numbers.json"
    if args.fill_only:
        for page in fill_docs(json.loads(target.read_text()), sorted((root / "docs").glob("*.md"))):
            logger.info("updated %s", page)
        return 0
    numbers = collect(root, size=args.size, parts=args.only or ("demo", "replicate", "quickstart"))
    if target.is_file():  # keep the parts not rerun (the default run leaves out the engine's timings)
        old = json.loads(target.read_text())
        for key in ("values", "tables", "commands", "seconds"):
            numbers[key] = {**old.get(key, {}), **numbers[key]}
        numbers = {**old, **numbers}
    target.write_text(json.dumps(numbers, indent=1, ensure_ascii=False) + "\n")
    logger.info("wrote %s", target)
    if args.write_docs:
        for page in fill_docs(numbers, sorted((root / "docs").glob("*.md"))):
            logger.info("updated %s", page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
