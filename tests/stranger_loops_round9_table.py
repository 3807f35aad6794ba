"""Print the table of docs/guide_own_model.md,
"Round 9: schedulers that edit momentum, optimizer options, loop habits".

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_loops_round9_table.py [NAME ...]
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_loops_round9_table.py --adapters

Each row records a case of tests/_loops9_kit.py (float64, 6 steps of 6 samples of a small tanh model unless the
case names another) and prints the replica's relative error against the trained model in evaluation mode, the
residual share, the train scores' relative error against the slow float64 loop reference (tests/reference.py,
tests/replay_reference.py for dropout) and that reference's own largest per-step residual relative to its
largest update, and the class: ``exact`` (replica <= 1e-6, share <= 1e-9, scores <= 1e-9, reference residual
<= 1e-12, no warning), ``loud`` (an ExplaindWarning, or an error: its type and the sentences naming cause and fix)
or ``SILENT``. The ReLU cases show the default replica's error and the default estimator's residual share
instead (no 8-node reference on kinked paths). For the optimizer state loaded before recording the reference
residual column holds the ``initial_state`` term's error against the reference's carried part (tests/_loops9_kit.py,
``start_state_figures``). ``--adapters`` prints instead the conformance check's largest per-step residual of every
default scenario of the ``asgd``, ``adadelta`` and ``rprop`` adapters in float64 and float32, and the largest
residual of their start-state check and of their pure updates. The load average is printed first: no figure is a timing.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any

import torch
from _loops8_kit import replica_with_defaults
from _loops9_kit import CASES, DEFAULT_RULE, figures
from _round4_kit import estimator_warnings

import explaind
from explaind.exceptions import ExplaindWarning
from explaind.testing import check_adapter_start_state, check_optimizer_adapter


def classify(got: dict[str, Any]) -> str:
    """``exact``, ``loud`` (warned) or ``SILENT``."""
    if (got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["scores"] <= 1e-9
            and got["reference_residual"] <= 1e-12 and not got["warnings"]):
        return "exact"
    return "loud: " + got["warnings"][0][:200] if got["warnings"] else "SILENT"


def default_rule(model: Any, traj: Any, recorded: list[str]) -> dict[str, Any]:
    """The default replica's error and warnings, the default estimator's residual share and warnings."""
    got = replica_with_defaults(model, traj)
    share, caught = estimator_warnings(traj)
    return {"replica": got["replica"], "share": share, "warnings": recorded + got["warnings"] + caught}


def row(name: str, cases: dict[str, Any] = CASES, default: tuple[str, ...] = DEFAULT_RULE,
        measure: Any = figures) -> str:
    """One table row of case ``name`` of ``cases`` (the ReLU cases in ``default`` with the default estimators, the
    others measured by ``measure(name, model, traj)``)."""
    recorded: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model, traj = cases[name]()
            finally:
                recorded = [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]
        if name in default:
            got = default_rule(model, traj, recorded)
            missed = [w for w in got["warnings"] if "the replica misses" in w]  # the replica's own warning first
            shown = (missed or got["warnings"] or [""])[0]
            cls = "exact" if got["replica"] <= 1e-6 and got["share"] <= 1e-9 and not got["warnings"] else (
                "loud: " + shown[:400] if got["warnings"] else "SILENT")
            return f"| {name} (default estimators) | {got['replica']:.1e} | {got['share']:.1e} | | | {cls} |"
        got = measure(name, model, traj)
        got["warnings"] = recorded + got["warnings"]  # the recorder's warnings first
    except Exception as exc:  # the table shows what a user sees
        sentences = re.split(r"(?<=[.)])\s+(?=[A-Z])", " ".join(str(exc).split()))
        key = next((t for t in sentences[1:] if re.search(r"Fix|fix|[Pp]ass|[Uu]se ", t)), "")
        shown = sentences[0][:200] + (" ... " + key[:240] if key else "")
        first = recorded[0] if recorded else ""
        warned = f"warns: {first[:160]} ... {first[first.find('Fix'):][:200]}; then " if recorded else ""
        return f"| {name} | | | | | loud: {warned}{type(exc).__name__}: {shown} |"
    return (f"| {name} | {got['replica']:.1e} | {got['share']:.1e} | {got['scores']:.1e} | "
            f"{got['reference_residual']:.1e} | {classify(got)} |")


def adapter_rows(names: tuple[str, ...] = ("asgd", "adadelta", "rprop")) -> None:
    """The conformance check's maximum residual per default scenario of each adapter in ``names``, in float64 and
    float32 (docs/optimizers.md, "How exact is it?")."""
    for name in names:
        record = explaind.get_entry("optimizer_adapter", name)
        runs = {dt: check_optimizer_adapter(record, dtype=dt, tol=1.0).max_residual
                for dt in (torch.float64, torch.float32)}
        for scenario, value in runs[torch.float64].items():
            print(f"| `{scenario}` | {value:.1e} | {runs[torch.float32][scenario]:.1e} |", flush=True)
        start = max(check_adapter_start_state(record).values())
        print(f"{name}: largest residual of check_adapter_start_state (float64) {start:.1e}", flush=True)
        if record.update_fn is not None:
            pure = check_optimizer_adapter(record, dtype=torch.float64, tol=1.0)
            worst = max(float(v.max()) for v in pure.pure_residuals.values())
            print(f"{name}: largest residual of its pure update (float64) {worst:.1e}; refused: "
                  f"{sorted(pure.pure_refused)}", flush=True)


def print_table(cases: dict[str, Any], default: tuple[str, ...], measure: Any) -> None:
    """Print the load average, the header and one :func:`row` per case named on the command line (default: every
    case of ``cases``), then the load average again: the ``main`` of the later rounds' tables."""
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print("| case | replica | residual share | scores vs reference | reference residual | class |")
    print("|---|---|---|---|---|---|")
    for name in sys.argv[1:] or cases:
        print(row(name, cases, default, measure), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


def main() -> None:
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    if "--adapters" in sys.argv:
        adapter_rows()
    else:
        print("| case | replica | residual share | scores vs reference | reference residual | class |")
        print("|---|---|---|---|---|---|")
        for name in sys.argv[1:] or CASES:
            print(row(name), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
