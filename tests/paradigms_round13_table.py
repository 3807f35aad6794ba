"""Print the table of docs/guide_own_model.md, "Fine-tuning and self-training".

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/paradigms_round13_table.py [NAME ...]

A row per case of tests/_paradigms13_kit.py, with the columns and classes of tests/paradigms_round12_table.py (replica
against the trained model in evaluation mode, residual share, ``keep=("train",)`` scores against the slow float64
loop reference and its own residual; ``exact``, ``loud`` or ``SILENT``). A loud row shows the first sentence of its
error or warning and, from the phrase :data:`KEYS` gives for the case, the sentence naming the paradigm's fix; a row
refused only when explaining says so. The untuned-rate rows show the default estimators' figures. The load average is
printed first and last: no figure is a timing.
"""

from __future__ import annotations

import re
import sys
import warnings

from _paradigms13_kit import CASES, DEFAULT_RULE, figures
from paradigms_round12_table import print_table, recorded_run, untuned_row
from stranger_loops_round9_table import classify

from explaind.exceptions import ExplaindWarning

#: The phrase of a message that names the paradigm's cause and fix, by a part of the case's name.
KEYS = {"l2sp": "one anchored at pretrained weights", "ewc": "one anchored at pretrained weights",
        "fixmatch": "targets the loop computes from the model", "ohem": "rows the loop keeps by their losses",
        "coteaching": "rows the loop keeps by their losses", "rdrop": "R-drop's", "probe": "a second phase's",
        "mean_teacher": ("for targets that follow the model", "an EMA teacher's targets"), "lora": "LoRA's merge",
        "mixout": "it advances torch's generator"}


def key(name: str, text: str) -> str:
    """The sentence of ``text`` from the phrase :data:`KEYS` gives for case ``name`` on (300 characters)."""
    text = " ".join(text.split())
    phrases = [k for part, ks in KEYS.items() if part in name for k in ((ks,) if isinstance(ks, str) else ks)]
    phrase = next((k for k in phrases if k in text), None)
    return text[text.find(phrase):][:300] if phrase else ""


def refusal(name: str, exc: Exception) -> str:
    """The error's type, first sentence and the sentence naming the paradigm's fix."""
    text = " ".join(str(exc).split())
    first = re.split(r"(?<=[.)])\s+(?=[A-Z])", text)[0]
    fix = key(name, text)
    return f"loud: {type(exc).__name__}: {first[:200]}" + (f" ... {fix}" if fix else "")


def row(name: str) -> str:
    """The table row of case ``name``."""
    try:
        run, recorded = recorded_run(CASES[name])
    except Exception as exc:  # the table shows what a user sees
        return f"| {name} | | | | | {refusal(name, exc)} |"
    if name in DEFAULT_RULE:
        return untuned_row(name, run, recorded)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExplaindWarning)  # the 8-node replica's own notes; the estimator's count
            got = figures(name, run)
    except Exception as exc:  # refused when explaining
        return f"| {name} | | | | | explaining: {refusal(name, exc)} |"
    got["warnings"] = recorded + got["warnings"]
    said = classify(got)
    fix = next((key(name, w) for w in got["warnings"] if key(name, w)), "")
    return (f"| {name} | {got['replica']:.1e} | {got['share']:.1e} | {got['scores']:.1e} | "
            f"{got['reference_residual']:.1e} | {said}{' ... ' + fix if fix and fix[:60] not in said else ''} |")


def main() -> None:
    print_table(row, sys.argv[1:] or CASES)


if __name__ == "__main__":
    main()
