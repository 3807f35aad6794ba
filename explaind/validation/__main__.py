"""``python -m explaind.validation``: LDS and top-k removal of the attribution methods on digits.

Prints the tables as markdown (one section per setting and activation) and, with ``--out DIR``, writes
``validation_<activation>.json``, ``.csv`` and ``.png`` (the LDS bars) there, ``validation_<setting>_<activation>.*``
for the settings beyond the SGD MLP (``--setting``, :mod:`explaind.validation.settings`); ``explaind report
RUN --validation DIR`` puts them in the HTML report.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .problem import SETTINGS

if TYPE_CHECKING:
    from .benchmark import ValidationResult
    from .problem import ValidationConfig


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m explaind.validation``."""
    p = argparse.ArgumentParser(
        prog="python -m explaind.validation",
        description="Measure how well each attribution method predicts retraining on subsets of the digits "
                    "training set (LDS) and the effect of removing top proponents.",
    )
    p.add_argument("--quick", action="store_true",
                   help="tiny size (60 train, 10 test, 20 steps, 8 subsets, top-5, 1 seed): a smoke test, not a "
                        "measurement")
    p.add_argument("--setting", choices=SETTINGS, nargs="+", default=["sgd_mlp"],
                   help="training runs to validate on (default sgd_mlp, the MLP with SGD and momentum; adamw, dropout, "
                        "batchnorm, contrastive, relu_untuned: docs/scores_meaning.md, 'Beyond SGD on an MLP', smaller "
                        "by default; tiny_lm: a tiny causal transformer on generated token sequences, 'A token "
                        "model')")
    p.add_argument("--settings-size", action="store_true",
                   help="run sgd_mlp at the size of the other settings, as their baseline (written as "
                        "validation_sgd_mlp_<activation>.*)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: each setting's own; a changed one is written as "
                        "validation_<setting>_<activation>_lr<LR>.*)")
    p.add_argument("--leave-out", action="store_true",
                   help="also retrain with the removed samples taken out of their batches (batch statistics and "
                        "InfoNCE negatives without them; with dropout the recorded batch's masks, the removed rows "
                        "dropped) and measure every method against that too (docs/scores_meaning.md, 'Leave-out "
                        "retraining')")
    p.add_argument("--activation", choices=("tanh", "relu"), nargs="+", default=None,
                   help="hidden-layer nonlinearity (default tanh; relu for relu_untuned, which is a ReLU MLP)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per recorded batch (default 25; quick 15); a changed one is written as "
                        "validation_<setting>_<activation>_bs<N>.*")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training set (default 10, settings 8)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default 500, settings 300)")
    p.add_argument("--n-test", type=int, default=None, help="explained test images (default 50, settings 30)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="compare only these methods (default: every method of the setting; names as in the tables)")
    p.add_argument("--subsets", type=int, default=None, help="M, subsets per fraction (default 200; quick 8)")
    p.add_argument("--fractions", type=float, nargs="+", default=None, help="default: 0.5 0.9 0.99")
    p.add_argument("--top-k", type=int, default=None, help="proponents removed per test point (default 25; quick 5)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=None,
                   help="independent runs SEED, SEED+1, ... pooled with a two-level bootstrap (default 5; quick 1)")
    p.add_argument("--out", default=None, help="directory for the JSON, CSV and PNG results")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    p.add_argument("--progress", action="store_true", help="a progress bar over the stages on stderr")
    return p


def timing(result: ValidationResult) -> str:
    """One line: the counterfactual's score time against the decomposition's, when both ran."""
    sec = result.seconds
    if "counterfactual" not in sec or "explaind" not in sec:
        return ""
    return (f"score time per seed: counterfactual {sec['counterfactual']:.2f}s, InfluenceEstimator(keep=('train',)) "
            f"{sec['explaind']:.2f}s, ratio {sec['counterfactual'] / sec['explaind']:.2f}\n")


def _announcement(config: ValidationConfig, quick: bool, methods: tuple[str, ...] | None = None) -> str:
    """The cost, said before the work: retrainings and, at the default size, the measured time."""
    from .benchmark import retrainings

    size = ("a smoke test, seconds" if quick else
            "the measurement itself: tens of minutes on a CPU, measured times in docs/scores_meaning.md; "
            "--quick is a smoke test in seconds")
    label = config.activation if config.setting == "sgd_mlp" else f"{config.setting}, {config.activation}"
    return (f"validate ({label}): {config.seeds} seed(s), {retrainings(config, methods):,} retrainings of "
            f"{config.n_steps} steps ({size})\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark for each setting and activation, print the tables; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    changes: dict[str, Any] = {"seed": args.seed}
    if args.subsets is not None:
        changes["n_subsets"] = args.subsets
    if args.fractions is not None:
        changes["fractions"] = tuple(args.fractions)
    if args.top_k is not None:
        changes["top_k"] = args.top_k
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    if args.lr is not None:
        changes["lr"] = args.lr
    if args.leave_out:
        changes["leave_out"] = True
    for option in ("batch_size", "epochs", "n_train", "n_test"):
        if getattr(args, option) is not None:
            changes[option] = getattr(args, option)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for setting in args.setting:
        for activation in args.activation or ["relu" if setting == "relu_untuned" else "tanh"]:
            code = _run_one(setting, activation, args, changes, out)
            if code:
                return code
    return 0


def _run_one(setting: str, activation: str, args: argparse.Namespace, changes: dict[str, Any],
             out: Path | None) -> int:
    """Measure one setting with one activation: print its tables and write its files; returns the exit status."""
    from ..exceptions import ExplaindError
    from .benchmark import run_validation
    from .settings import CLASSIFICATION_METHODS, describe, setting_config

    start = time.perf_counter()
    try:
        config = setting_config(setting, args.quick, args.settings_size, activation=activation, **changes)
        # the baseline compares what the classification settings do
        methods = CLASSIFICATION_METHODS if args.settings_size else None
        methods = tuple(args.methods) if args.methods is not None else methods
        if args.progress:
            sys.stderr.write(_announcement(config, args.quick, methods))
        result = run_validation(config, methods=methods, progress=args.progress)
    except ExplaindError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    c = result.config
    if setting == "sgd_mlp" and not args.settings_size:
        head = (f"\n## {activation}: digits {c['n_train']} train / {c['n_test']} test, MLP 64-{c['hidden']}-10, SGD "
                f"lr {c['lr']} momentum {c['momentum']}, {c['n_steps']} steps of {c['batch_size']}, float64; ")
        name = f"validation_{activation}"
    else:
        head = f"\n## {setting} ({activation}): {describe(c)}; "
        name = (f"validation_{setting}_{activation}" + ("" if args.lr is None else f"_lr{args.lr:g}")
                + ("" if args.batch_size is None else f"_bs{args.batch_size}"))
    left_out = ("" if not args.leave_out else
                f"; leave-out retrain with every sample kept vs recorded run: max |Δ logit| = "
                f"{result.checks['leave_out_full_max_abs_diff']:.1e}")
    sys.stdout.write(
        f"{head}M = {c['n_subsets']} subsets per fraction, {c['seeds']} seed(s) from {c['seed']}\n\n"
        f"{result.table()}\n\n"
        f"{timing(result)}"
        f"recording {result.seconds['record']:.1f}s, subset retraining {result.seconds['retrain_subsets']:.1f}s, "
        f"removal retraining {result.seconds['retrain_removal']:.1f}s, total {time.perf_counter() - start:.1f}s; "
        f"full-set retrain vs recorded run: max |Δ logit| = {result.checks['full_retrain_max_abs_diff']:.1e}"
        f"{left_out}\n"
    )
    if out is not None:
        result.to_json(out / f"{name}.json")
        result.to_csv(out / f"{name}.csv")
        result.plot(out / f"{name}.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
