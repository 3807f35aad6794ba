"""Print the table of docs/guide_own_model.md, "Fine-tuning and self-training".

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/paradigms_round13_table.py [NAME ...]

Each row records a case of tests/_paradigms13_kit.py (float64, 6 steps of 6 samples, tiny tanh models unless the
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

import torch
from _paradigms13_kit import CASES, DEFAULT_RULE, default_figures, figures
from stranger_loops_round9_table import classify

from explaind.exceptions import ExplaindWarning

#: The phrase of a message that names the paradigm's cause and fix, by a part of the case's name.
KEYS = {"l2sp": "one anchored at pretrained weights", "ewc": "one anchored at pretrained weights",
        "fixmatch": "targets the loop computes from the model", "ohem": "rows the loop keeps by their losses",
        "coteaching": "rows the loop keeps by their losses", "rdrop": "R-drop's", "probe": "a second phase's",
        "mean_teacher": ("for targets that follow the model", "an EMA teacher's targets"), "lora": "LoRA's merge"}


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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = CASES[name]()
        recorded = [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]
    except Exception as exc:  # the table shows what a user sees
        return f"| {name} | | | | | {refusal(name, exc)} |"
    if name in DEFAULT_RULE:
        got = default_figures(run)
        said = recorded + got["warnings"]
        cls = "exact" if got["replica"] <= 1e-6 and got["share"] <= 1e-9 and not said else (
            "loud: " + said[0][:300] if said else "SILENT")
        return f"| {name} (default estimators) | {got['replica']:.1e} | {got['share']:.1e} | | | {cls} |"
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
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print("| case | replica | residual share | scores vs reference | reference residual | class |")
    print("|---|---|---|---|---|---|")
    for name in sys.argv[1:] or CASES:
        print(row(name), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
