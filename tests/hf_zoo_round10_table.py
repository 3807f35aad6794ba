"""Prints one row per case of tests/_zoo10_cases.py, the Hugging Face architectures of tests/test_hf_zoo_round10.py and
tests/test_hf_zoo_round10_more.py (not collected by pytest): verdict, replica error against the trained model in
evaluation mode, residual share, ``keep=("train",)`` error against the replaying float64 loop reference, the
conversions to float32 explaind found, seconds for the case, and the first words of a refusal or warning; then,
with ``rwkv_diagnosis`` among the arguments (or none), RWKV's diagnosis, and with ``mobilenet_v2_fixed_rule`` (or
none) MobileNetV2 under a fixed 4-node rule.

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/hf_zoo_round10_table.py [case ...]``
from the repository root (set-up: tests/_zoo9_kit.py). The load average comes first.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch
from _zoo9_kit import logits_of, record, rel_err, run
from _zoo10_cases import BATCH_NORM, CASES, OTHERS, embedding_norms, path_share
from hf_zoo_round9_table import _short

import explaind
from explaind.exceptions import ExplaindError

#: Cases whose verdict is a refusal or a warning, and the batch-norm models (no reference is run for them: the
#: loop reference does not replay running statistics).
NO_REFERENCE = {"rwkv", "squeezebert", "convbert", "rembert", "megatron_bert", "nystromformer", "ibert", "layoutlm",
                "led_global", "yoso", "canine", "xglm", *BATCH_NORM, *OTHERS}


def row(name: str) -> str:
    """The table row of case ``name``."""
    start = time.perf_counter()
    try:
        got = run({**CASES, **BATCH_NORM, **OTHERS}[name], reference=name not in NO_REFERENCE)
    except (ExplaindError, RuntimeError) as exc:
        seconds = time.perf_counter() - start
        return f"| {name} | loud: {type(exc).__name__} | | | | | {seconds:.0f} | {_short(str(exc))} |"
    said = _short(got["warnings"][0]) if got["warnings"] else ""
    exact = got["replica"] <= 1e-6 and got["share"] <= 1e-7 and not got["train"] > 1e-6 and not said
    verdict = "exact" if exact else "loud" if said else "inexact"
    return (f"| {name} | {verdict} | {got['replica']:.2g} | {got['share']:.2g} | {got['train']:.2g} | "
            f"{got['casts']} | {time.perf_counter() - start:.0f} | {said} |")


def rwkv_diagnosis() -> None:
    """RWKV as initialised: embedding row norms, the share of each step's change reached along its path, and the
    replica error of the midpoint rule and of Gauss-Legendre with growing node counts."""
    start, step = embedding_norms(CASES["rwkv"])
    print(f"rwkv: largest embedding row norm at initialisation {start:.2g}, of its first update {step:.2g}")
    for s in range(3):
        shares = path_share(CASES["rwkv"], s, (1e-4, 1e-3, 1e-2, 1e-1))
        print(f"rwkv step {s}: share of the step's change reached at t = 1e-4, 1e-3, 1e-2, 1e-1: "
              + ", ".join(f"{v:.2g}" for v in shares))
    model, traj, X_test, _ = record(CASES["rwkv"], check=False)
    with torch.no_grad():
        truth = logits_of(model(**X_test)).reshape(X_test["input_ids"].shape[0], -1)
    for rule, nodes in (("midpoint", 1000), ("midpoint", 4000), ("gauss-legendre", 64), ("gauss-legendre", 256),
                        ("adaptive", None)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = explaind.KernelReplica(device="cpu", quadrature=rule, nodes=nodes).fit(traj)
            err = rel_err(rep.predict(X_test), truth)
            per_step = rep.fidelity_report(X_test)["relative_quadrature_error"]
        print(f"rwkv {rule} nodes={nodes}: replica {err:.2g}, relative quadrature error per step "
              + ", ".join(f"{v:.2g}" for v in per_step))


def fixed_rule(name: str, nodes: int = 4) -> None:
    """Seconds and per-step relative quadrature error of the replica of case ``name`` under a fixed ``nodes``-node
    Gauss-Legendre rule (what one pass over the path costs, and how far from straight the path is)."""
    _, traj, X_test, _ = record({**CASES, **BATCH_NORM}[name])
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = explaind.KernelReplica(device="cpu", quadrature="gauss-legendre", nodes=nodes).fit(traj)
        per_step = rep.fidelity_report(X_test)["relative_quadrature_error"]
    print(f"{name} gauss-legendre nodes={nodes}: {time.perf_counter() - start:.1f} s, relative quadrature error "
          f"per step " + ", ".join(f"{v:.2g}" for v in per_step))


#: Cases left out of the default list: MobileNetV2 runs past 100 s (``fixed_rule`` shows why).
SLOW = {"mobilenet_v2"}


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print("| case | verdict | replica | residual share | train vs reference | float32 casts | seconds | message |")
    print("|---|---|---|---|---|---|---|---|")
    extras = ("rwkv_diagnosis", "mobilenet_v2_fixed_rule")
    every = [n for n in [*CASES, *BATCH_NORM, *OTHERS] if n not in SLOW]
    rows = [n for n in names if n not in extras] if names else every
    for name in rows:
        print(row(name), flush=True)
    if not names or "rwkv_diagnosis" in names:
        rwkv_diagnosis()
    if not names or "mobilenet_v2_fixed_rule" in names:
        fixed_rule("mobilenet_v2")


if __name__ == "__main__":
    main(sys.argv[1:])
