"""Print the table of docs/guide_own_model.md, "Training paradigms".

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/paradigms_round12_table.py [NAME ...]

Each row records a case of tests/_paradigms12_kit.py (float64, 6 steps of 6 samples, tiny tanh models unless the
case names ReLU) and prints the replica's relative error against the trained model in evaluation mode, the residual
share, the ``keep=("train",)`` scores' relative error against the slow float64 loop reference (tests/reference.py;
tests/replay_reference.py where the training forward draws or counts a buffer up) and that reference's own largest
per-step residual relative to its largest update, and the class: ``exact`` (replica <= 1e-6, share <= 1e-9, scores
<= 1e-9, reference residual <= 1e-12, no warning), ``loud`` (an ExplaindWarning, or an error: its type, its first
sentence and the sentence naming the paradigm's fix) or ``SILENT``. The untuned-rate rows (``*_untuned``) show the
default replica's error and the default estimator's residual share. The load average is printed first and last: no
figure is a timing.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from _paradigms12_kit import CASES, DEFAULT_RULE, default_figures, figures
from stranger_loops_round9_table import classify

from explaind.exceptions import ExplaindWarning

#: Phrases of a refusal worth showing beside its first sentence, in order: the paradigm's cause and fix.
KEYS = ("Noise drawn anew", "rows where", "nor has a detached batch statistic", "the forward reads it",
        "Fix: record with capture_random=True", "has no such split", "Fix: make such changes", "MAML's inner step")


def refusal(exc: Exception) -> str:
    """The error's type, first sentence and, from the first of :data:`KEYS` it holds, the paradigm's fix."""
    text = " ".join(str(exc).split())
    first = re.split(r"(?<=[.)])\s+(?=[A-Z])", text)[0]
    key = next((text[text.find(k):][:300] for k in KEYS if k in text), "")
    return f"loud: {type(exc).__name__}: {first[:220]}" + (f" ... {key}" if key else "")


def recorded_run(case: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``case()`` and the ExplaindWarning messages it gave while recording."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = case()
    return run, [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]


def untuned_row(name: str, run: Any, recorded: list[str]) -> str:
    """The row of an untuned-rate case: the default replica's error and the default estimator's residual share."""
    got = default_figures(run)
    said = recorded + got["warnings"]
    cls = "exact" if got["replica"] <= 1e-6 and got["share"] <= 1e-9 and not said else (
        "loud: " + said[0][:300] if said else "SILENT")
    return f"| {name} (default estimators) | {got['replica']:.1e} | {got['share']:.1e} | | | {cls} |"


def row(name: str) -> str:
    """The table row of case ``name``."""
    try:
        run, recorded = recorded_run(CASES[name])
    except Exception as exc:  # the table shows what a user sees
        return f"| {name} | | | | | {refusal(exc)} |"
    if name in DEFAULT_RULE:
        return untuned_row(name, run, recorded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExplaindWarning)  # the 8-node replica's own notes; the estimator's count
        got = figures(name, run)
    got["warnings"] = recorded + got["warnings"]
    return (f"| {name} | {got['replica']:.1e} | {got['share']:.1e} | {got['scores']:.1e} | "
            f"{got['reference_residual']:.1e} | {classify(got)} |")


def print_table(row: Callable[[str], str], names: Iterable[str]) -> None:
    """The load average, the header, ``row(name)`` for each of ``names``, the load average at the end."""
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print("| case | replica | residual share | scores vs reference | reference residual | class |")
    print("|---|---|---|---|---|---|")
    for name in names:
        print(row(name), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


def main() -> None:
    print_table(row, sys.argv[1:] or CASES)


if __name__ == "__main__":
    main()
