"""Validation of the attribution methods against retraining on sklearn digits (LDS and top-k removal).

Runs :func:`explaind.validation.run_validation` (500 train / 50 test digits, MLP 64-32-10, SGD with
momentum 0.9, 200 steps of 25, float64; M = 200 random subsets at 50%, 90% and 99% of the training
set, each retrained from the same initialisation with the same batches and the removed samples
weighted 0; 5 seeds) for each activation, and prints per activation:

1. LDS of the true-class logit (Spearman across subsets, mean over seeds and test points ± two-level
   bootstrap std) for the counterfactual metagradients, the ExPLAIND decomposition, TracIn (its left
   rule), the explicit damped influence function, the gradient dot product at the end of training,
   random scores and, when installed, Captum's influence function and TRAK, with each method's wall
   time, and the counterfactual's time against ``InfluenceEstimator(keep=("train",))``;
2. the fraction of test points whose true-class logit went down after removing the
   counterfactual's (and the decomposition's) top-25 proponents and retraining;
3. which of the targets of the validation issue hold (reported, not tuned for).

Run: ``python benchmarks/bench_validation.py [--activation tanh relu] [--subsets 200] [--seeds 5] [--quick]
[--out DIR]``
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from explaind.validation import ValidationConfig, ValidationResult, run_validation
from explaind.validation.__main__ import timing


def targets(result: ValidationResult) -> list[tuple[str, bool]]:
    """The issue's targets and whether this run meets them."""
    lds = result.lds
    fractions = sorted(lds["counterfactual"])
    rows = []
    if {"counterfactual", "explaind", "tracin", "grad_dot", "random"} <= set(lds):
        best = all(max(lds, key=lambda m: lds[m][f][0]) == "counterfactual" for f in fractions)
        rows.append((f"counterfactual has the highest LDS at every fraction (of {', '.join(lds)})", best))
    if 0.99 in lds["counterfactual"]:
        rows.append(("counterfactual LDS >= 0.9 at 99%", lds["counterfactual"][0.99][0] >= 0.9))
    if 0.5 in lds["counterfactual"]:
        rows.append(("counterfactual LDS > 0.67 at 50%", lds["counterfactual"][0.5][0] > 0.67))
    if "explaind" in lds and "tracin" in lds:
        gap = max(abs(lds["explaind"][f][0] - lds["tracin"][f][0]) for f in fractions)
        rows.append((f"decomposition within ±0.02 of TracIn (largest gap {gap:.3f})", gap <= 0.02))
    if "random" in lds:
        worst = max(abs(lds["random"][f][0]) for f in fractions)
        rows.append((f"random within ±0.04 of 0 (largest {worst:.3f})", worst <= 0.04))
    if "counterfactual" in result.removal:
        rows.append(("removing the counterfactual's top proponents lowers the logit in >= 95% of test points",
                     result.removal["counterfactual"]["fraction_lowered"] >= 0.95))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activation", choices=("tanh", "relu"), nargs="+", default=["tanh", "relu"])
    parser.add_argument("--subsets", type=int, default=None, help="M, subsets per fraction (default 200)")
    parser.add_argument("--seeds", type=int, default=None, help="independent runs (default 5; quick 1)")
    parser.add_argument("--quick", action="store_true", help="the tiny smoke-test size")
    parser.add_argument("--out", default=None, help="directory for validation_<activation>.json/.csv")
    args = parser.parse_args()
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for activation in args.activation:
        config = replace(ValidationConfig.quick() if args.quick else ValidationConfig(), activation=activation)
        if args.subsets is not None:
            config = replace(config, n_subsets=args.subsets)
        if args.seeds is not None:
            config = replace(config, seeds=args.seeds)
        start = time.perf_counter()
        result = run_validation(config)
        c = result.config
        print(f"\n## {activation}: {c['n_train']} train / {c['n_test']} test, MLP 64-{c['hidden']}-10, "
              f"{c['n_steps']} steps, M = {c['n_subsets']}, seeds {c['seed']}..{c['seed'] + c['seeds'] - 1}\n")
        print(result.table())
        print("\n" + timing(result), end="")
        print(f"\nwall time {time.perf_counter() - start:.1f}s (recording {result.seconds['record']:.1f}s, "
              f"subset retraining {result.seconds['retrain_subsets']:.1f}s, removal retraining "
              f"{result.seconds['retrain_removal']:.1f}s); full-set retrain vs recorded run: max |Δ logit| = "
              f"{result.checks['full_retrain_max_abs_diff']:.1e}\n")
        for text, met in targets(result):
            print(f"- [{'x' if met else ' '}] {text}")
        if out is not None:
            result.to_json(out / f"validation_{activation}.json")
            result.to_csv(out / f"validation_{activation}.csv")
            result.plot(out / f"validation_{activation}.png")


if __name__ == "__main__":
    main()
