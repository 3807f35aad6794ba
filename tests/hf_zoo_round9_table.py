"""Prints one row per case of tests/_zoo9_cases.py, the Hugging Face architectures of tests/test_hf_zoo_round9.py and
tests/test_hf_zoo_round9_more.py (not collected by pytest): verdict, replica error against the trained model in
evaluation mode, residual share, ``keep=("train",)`` error against the replaying float64 loop reference, the
conversions to float32 explaind found in the forward, and the first words of a refusal or warning.

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/hf_zoo_round9_table.py [case ...]`` from
the repository root (set-up: tests/_zoo9_kit.py). The load average comes first; no figure is a timing.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from _zoo9_cases import CAUSAL, OTHERS, regnet_batch_norm
from _zoo9_kit import run

from explaind.exceptions import ExplaindError

#: Cases whose verdict is a refusal or a warning (no reference is run for them).
LOUD = {"bloom_alibi", "mixtral_top2", "qwen2_moe_top2", "mixtral_batched_top2", "rwkv", "reformer_lsh"}


def _short(message: str) -> str:
    """The first 200 characters of ``message`` on one line (a refusal's list of problems starts on line 2)."""
    return " ".join(message.replace("The model cannot be explained (1 problem(s)):", "").split())[:200]


def row(name: str) -> str:
    """The table row of case ``name``."""
    if name == "regnet_batch_norm":
        got = regnet_batch_norm()
        return f"| {name} | exact | {got['replica']:.2g} | {got['share']:.2g} | {got['train']:.2g} | | |"
    case = {**CAUSAL, **OTHERS}[name]
    try:
        got = run(case, reference=name not in LOUD)
    except ExplaindError as exc:
        return f"| {name} | loud: {type(exc).__name__} | | | | | {_short(str(exc))} |"
    said = _short(got["warnings"][0]) if got["warnings"] else ""
    exact = got["replica"] <= 1e-6 and got["share"] <= 1e-7 and got["train"] <= 1e-6 and not said
    verdict = "exact" if exact else "loud" if said else "inexact"
    return (f"| {name} | {verdict} | {got['replica']:.2g} | {got['share']:.2g} | {got['train']:.2g} | "
            f"{got['casts']} | {said} |")


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print("| case | verdict | replica | residual share | train vs reference | float32 casts | message |")
    print("|---|---|---|---|---|---|---|")
    for name in names or [*CAUSAL, *OTHERS, "regnet_batch_norm"]:
        print(row(name), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
