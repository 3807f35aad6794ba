"""Prints one row per case of tests/_zoo13_cases.py, the runs of tests/test_hf_zoo_round13.py and
tests/test_hf_zoo_round13_more.py (not collected by pytest): verdict, replica error against the trained model in
evaluation mode, residual share, ``keep=("train",)`` error against the slow float64 loop reference (for train-mode
batch norm tests/_zoo11_kit.py's ``BufferReplayReference``), that reference's own quadrature error, seconds, the
gradient check's largest mismatch and the first words of a refusal or warning. Three more rows, named among the
arguments (or with none): ``swiftformer_reference`` (round 10's SwiftFormer against ``BufferReplayReference`` with
one panel per smooth piece, about 20 minutes), ``kinks`` (the kinks LeViT's and SwiftFormer's paths cross, per
step and test input, tests/_zoo13_kinks.py) and ``mobilenet_v2_replica`` (round 10's MobileNetV2: seconds of its
recording and of ``KernelReplica`` at ``tol=1e-7``, the trained model's largest logit, the warnings).

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/hf_zoo_round13_table.py [case ...]``
from the repository root. The load average comes first.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings

from _zoo9_kit import run
from _zoo11_kit import BufferReplayReference
from _zoo13_cases import BATCH_NORM, CASES
from hf_zoo_round9_table import _short
from hf_zoo_round11_table import print_table, result_row

from explaind.exceptions import ExplaindError, ExplaindWarning

#: Cases run without the reference: the loud ones whose explaind figures already fail.
NO_REFERENCE = {"hiera", "qwen3_moe_top2", "apertus_xielu"}


def row(name: str) -> str:
    """The table row of case ``name``."""
    case = CASES.get(name) or BATCH_NORM[name]
    reference = False if name in NO_REFERENCE else BufferReplayReference if name in BATCH_NORM else True
    start = time.perf_counter()
    try:
        got = run(case, reference)
    except (ExplaindError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
        seconds = time.perf_counter() - start
        return f"| {name} | loud: {type(exc).__name__} | | | | | {seconds:.0f} | {_short(str(exc))} |"
    return result_row(name, got, time.perf_counter() - start, f" gradient check {got['check']:.2g};")


def extra_row(name: str) -> str:
    """The rows of the cases left from earlier rounds (module docstring)."""
    from _zoo9_kit import N_TEST, logits_of, record
    from _zoo10_cases import BATCH_NORM as ROUND10
    from _zoo11_cases import ROUTES
    from _zoo13_kinks import kinks_on_grid
    from reference import rel_err

    import explaind

    start = time.perf_counter()
    if name == "swiftformer_reference":
        got = run(dataclasses.replace(ROUND10["swiftformer"], panels=1), BufferReplayReference)
        return result_row(name, got, time.perf_counter() - start, f" gradient check {got['check']:.2g};")
    if name == "kinks":
        levit = kinks_on_grid(*record(ROUTES["levit_cache_emptied"])[:3], grid=64)
        swift = kinks_on_grid(*record(ROUND10["swiftformer"])[:3], grid=64)
        return f"| kinks | | | | | | {time.perf_counter() - start:.0f} | LeViT {levit}; SwiftFormer {swift} |"
    model, traj, X, _ = record(ROUND10["mobilenet_v2"])
    recorded = time.perf_counter() - start
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        replica = explaind.KernelReplica(device="cpu", tol=1e-7).fit(traj).predict(X)
    truth = logits_of(model(**X)).detach().reshape(N_TEST, -1)
    said = "; ".join(_short(str(w.message)) for w in caught if issubclass(w.category, ExplaindWarning))
    return (f"| mobilenet_v2_replica | | {rel_err(replica, truth):.2g} | | | | {time.perf_counter() - start:.0f} | "
            f"recorded in {recorded:.0f} s; largest trained logit {float(truth.abs().max()):.2g}; {said} |")


EXTRA = ["swiftformer_reference", "kinks", "mobilenet_v2_replica"]


def main(names: list[str]) -> None:
    print_table(names or [*CASES, *BATCH_NORM, *EXTRA], lambda n: extra_row(n) if n in EXTRA else row(n))


if __name__ == "__main__":
    main(sys.argv[1:])
