"""``python -m explaind.pruning``: the pruning benchmark on scikit-learn's 8x8 digits.

Writes ``results.json``, ``results.csv``, ``summary.csv``, ``table.txt`` and ``pruning.png`` to
``--out`` and prints the table at the ``--show`` sparsities.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from .harness import DEFAULT_SPARSITIES


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m explaind.pruning``."""
    p = argparse.ArgumentParser(
        prog="python -m explaind.pruning",
        description="Prune digits classifiers (trained with SGD + momentum while recording the run) with every "
                    "registered strategy and compare the pruned copies with the unpruned model, without retraining.",
    )
    p.add_argument("--out", default="pruning-digits", help="output directory (default: %(default)s)")
    p.add_argument("--architecture", choices=("mlp", "cnn"), default="mlp")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES),
                   help="fractions of prunable weights removed (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one trained model per seed")
    p.add_argument("--strategies", nargs="+", default=None, help="registered strategy names (default: all)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--hidden", type=int, nargs="+", default=[64], help="MLP hidden widths (default: %(default)s)")
    p.add_argument("--channels", type=int, nargs="+", default=[8, 16], help="CNN channels (default: %(default)s)")
    p.add_argument("--quadrature", default="adaptive",
                   help="path-integral rule of the ExPLAIND scores: adaptive, gauss-legendre, midpoint or left "
                        "(default: %(default)s)")
    p.add_argument("--nodes", type=int, default=None,
                   help="nodes per step of the ExPLAIND scores' rule (per panel for adaptive; default: 2 for adaptive)")
    p.add_argument("--tol", type=float, default=None,
                   help="relative error per step and input of the adaptive rule (default: 1e-3)")
    p.add_argument("--scope", choices=("global", "layer"), default="global")
    p.add_argument("--granularity", choices=("unstructured", "neuron"), default="unstructured")
    p.add_argument("--show", type=float, nargs="+", default=[0.9, 0.95, 0.99],
                   help="sparsities printed in the table (default: %(default)s)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log each fitted strategy")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the digits benchmark; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..exceptions import ExplaindError
    from .digits import run_digits_benchmark

    start = time.perf_counter()
    try:
        result = run_digits_benchmark(
            args.out, architecture=args.architecture, sparsities=args.sparsities, seeds=args.seeds,
            strategies=args.strategies, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            momentum=args.momentum, hidden_sizes=args.hidden, channels=args.channels, quadrature=args.quadrature,
            quadrature_nodes=args.nodes, tol=args.tol,
            scope=args.scope, granularity=args.granularity, progress=args.progress,
        )
        shown = [s for s in args.show if s in result.sparsities] or result.sparsities
        sys.stdout.write(result.table(shown) + "\n")
    except ExplaindError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(f"wrote {args.out}/results.json, results.csv, summary.csv, table.txt, pruning.png "
                     f"in {time.perf_counter() - start:.1f}s\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
