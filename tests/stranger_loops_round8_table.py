"""Print the table of docs/guide_own_model.md, "Round 8: optimizers, schedulers, loop structures and numerics".

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests \
        python tests/stranger_loops_round8_table.py [NAME ...] [--long]

Each row records a case of tests/_loops8_kit.py (float64, 6 steps of 6 samples of a small tanh model unless the
case names another) and prints the replica's relative error against the trained model in evaluation mode, the
residual share, the train scores' relative error against the slow float64 loop reference (tests/reference.py) and
that reference's own largest per-step residual relative to its largest update, and the class: ``exact``
(replica <= 1e-6, share <= 1e-9, scores <= 1e-9, reference residual <= 1e-12, no warning), ``loud`` (an
ExplaindWarning, or an error: its type and first sentence) or ``SILENT``. The two ReLU CNN cases show the default
replica's error and warning instead. ``--long`` adds a float32 run of 2000 steps explained with the default
estimators. The load average is printed first: the figures do not depend on it (only the long row's CPU seconds).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any

import torch
from _loops8_kit import CASES, DEFAULT_RULE, replica_with_defaults
from _stranger_loops_kit import measure

from explaind.exceptions import ExplaindWarning


def classify(got: dict[str, Any]) -> str:
    """``exact``, ``loud`` (warned) or ``SILENT``."""
    if (got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["scores"] <= 1e-9
            and got["reference_residual"] <= 1e-12 and not got["warnings"]):
        return "exact"
    return "loud: " + got["warnings"][0][:150] if got["warnings"] else "SILENT"


def row(name: str) -> str:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, traj = CASES[name]()
        recorded = [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]
        if name in DEFAULT_RULE:  # ReLU paths: the default replica (adaptive rule, tol 1e-7)
            got = replica_with_defaults(model, traj)
            return (f"| {name} (default replica) | {got['replica']:.1e} | | | | "
                    f"{'loud: ' + got['warnings'][0][:150] if got['warnings'] else 'SILENT'} |")
        got = measure(model, traj)
        got["warnings"] = recorded + got["warnings"]  # the recorder's warnings first
    except Exception as exc:  # the table shows what a user sees
        sentences = re.split(r"(?<=[.)])\s+(?=[A-Z])", " ".join(str(exc).split()))
        key = next((t for t in sentences[1:] if re.search(r"Fix|subclasses|Every gradient|is a tensor", t)), "")
        shown = sentences[0][:160] + (" ... " + key[:200] if key else "")
        return f"| {name} | | | | | loud: {type(exc).__name__}: {shown} |"
    return (f"| {name} | {got['replica']:.1e} | {got['share']:.1e} | {got['scores']:.1e} | "
            f"{got['reference_residual']:.1e} | {classify(got)} |")


def float32_long(steps: int = 2000) -> str:
    """The tanh MLP of tests/_numerics7_kit.py in float32, SGD momentum 0.9 at lr 0.05, ``steps`` steps of 16,
    explained with the default estimators on 8 training inputs (replica vs the recorded final state)."""
    from _numerics7_kit import data, explain, mlp, train

    X, y = data()
    model = mlp()
    traj, error = train(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), X, y, steps)
    got = explain(model, traj, X[:8])
    cls = "exact" if got["replica"] <= 1e-6 and got["share"] <= 1e-3 and not got["warnings"] else (
        "loud: " + got["warnings"][0][:150] if got["warnings"] else "SILENT")
    return (f"| float32, {steps} steps, SGD momentum (default estimators; replica vs recorded state, model "
            f"{got['model']:.1e}, quadrature share {got['quad']:.1e}, {got['cpu']:.0f} s CPU) | {got['replica']:.1e} | "
            f"{got['share']:.1e} | | | {cls}{'; ' + str(error)[:80] if error else ''} |")


def main() -> None:
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print("| case | replica | residual share | scores vs reference | reference residual | class |")
    print("|---|---|---|---|---|---|")
    names = [a for a in sys.argv[1:] if a != "--long"]
    for name in names or CASES:
        print(row(name), flush=True)
    if "--long" in sys.argv:
        print(float32_long(), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
