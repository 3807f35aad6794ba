"""The ``explaind`` command line.

Subcommands: ``demo``, ``train``, ``replicate``, ``influence``, ``prune``, ``report``,
``salvage``, ``plugins`` and ``study grokking``. Every subcommand takes ``-q/--quiet`` (no progress bars,
no chatter), ``--json`` (one JSON document on stdout), ``--debug`` (tracebacks) and
``--threads N`` (torch's CPU threads for the command; 1 by default on the CPU unless ``OMP_NUM_THREADS``
is set; the library itself never sets them).

Bad input ends with one line on stderr (``explaind <command>: error: ...``) and exit code 2;
a file system problem with exit code 1; an interrupt with 130. The handlers live in
:mod:`explaind.cli_commands`; what both modules share, :class:`Output` and
:func:`parse_assignments`, lives in :mod:`explaind.cli_io`.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from . import __version__, cli_commands, cli_launch
from .cli_io import Output, parse_assignments
from .exceptions import ExplaindError

__all__ = ["main", "build_parser", "default_threads", "Output", "parse_assignments"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and a hint, never the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------- parser
def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else False
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars or chatter")
    parser.add_argument("--json", action="store_true", default=default, help="print results as one JSON document")
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks of errors")
    parser.add_argument("--threads", type=int, default=argparse.SUPPRESS if suppress else None, metavar="N",
                        help="CPU threads of torch for this command (default: 1 on the CPU, torch's choice when "
                             "OMP_NUM_THREADS is set or the device is a GPU)")


def _add_size(parser: argparse.ArgumentParser, default: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--size", choices=("tiny", "small", "full"), default=default,
                       help=f"size preset (default: {default}); 'tiny' runs in seconds, 'full' needs a GPU")
    group.add_argument("--tiny", dest="size", action="store_const", const="tiny", help="same as --size tiny")


def _add_quadrature(parser: argparse.ArgumentParser, chosen: str) -> None:
    parser.add_argument("--quadrature", default=None,
                        help=f"adaptive, gauss-legendre, midpoint or left (default: {chosen})")
    parser.add_argument("--nodes", type=int, default=None,
                        help="nodes per step of a fixed rule (per panel for adaptive)")


def _add_scores_rule(parser: argparse.ArgumentParser) -> None:
    """``--quadrature``, ``--nodes`` and ``--tol`` of the commands that compute influence scores."""
    from .studies.fidelity import SCORES_RULE, SCORES_TOL

    _add_quadrature(parser, f"adaptive with {SCORES_RULE.nodes}-node panels")
    parser.add_argument("--tol", type=float, default=None, metavar="TOL",
                        help=f"relative error per step and input of the adaptive rule (default: {SCORES_TOL:g})")


def _add_memory_budget(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--memory-budget", default=None, metavar="SIZE",
                        help=f"working memory of the estimator, in bytes or a size such as 2GB, 512MiB (default: "
                             f"{default}); it bounds the adaptive rule's state and each evaluation's outputs")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``explaind`` command (exposed for the CLI reference and tests)."""
    parser = _Parser(prog="explaind", description="Exact path-kernel replicas and additive influence scores "
                     "(ExPLAIND) for recorded training runs.")
    parser.add_argument("--version", action="version", version=f"explaind {__version__}")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    from .studies.fidelity import SCORES_RULE, SCORES_TOL

    p = sub.add_parser("demo", help="train a small grokking run, replicate it and write the HTML report")
    _add_size(p, "small")
    p.add_argument("--out", default="report", help="report folder (default: report)")
    p.add_argument("--seed", type=int, default=0)
    _add_device(p)
    _common(p, suppress=True)

    p = sub.add_parser("train", help="train a registered architecture on a built-in dataset and record it")
    p.add_argument("--out", required=True, help="new run folder (run.json + trajectory/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out with the settings of its run.json")
    p.add_argument("--architecture", "-a", default="mlp", help="registered architecture (see 'explaind plugins')")
    p.add_argument("--dataset", "-d", default="digits", help="modular, digits or cifar10 (default: digits)")
    p.add_argument("--data", action="append", metavar="KEY=VALUE", help="dataset option, e.g. p=23, classes=[3,8]")
    p.add_argument("--model", action="append", metavar="KEY=VALUE", help="architecture option, e.g. d_model=32")
    p.add_argument("--optimizer", default="adamw",
                   help="sgd, adam, adamw, rmsprop, adagrad, nadam, radam, adamax or adafactor (default: adamw)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD and RMSprop momentum")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("BETA1", "BETA2"))
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    p.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default: full batch)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--stop-at", type=float, default=None, help="stop once train and validation accuracy reach this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="float32 or float64")
    _add_device(p)
    _common(p, suppress=True)

    p = sub.add_parser("replicate", help="fidelity of the kernel replica of a stored run (--table: Table 1)")
    p.add_argument("run", nargs="?", help="run folder; without it, --table trains the three reference setups")
    p.add_argument("--table", action="store_true", help="compare every quadrature rule (the fidelity table)")
    _add_quadrature(p, f"adaptive with {SCORES_RULE.nodes}-node panels within --max-evals, else gauss-legendre")
    p.add_argument("--n-test", type=int, default=None,
                   help="validation inputs to compare on (default: 64, 32 with --table)")
    p.add_argument("--steps", default=None, metavar="START:STOP",
                   help="replicate only these optimizer steps, from f(theta_START) to f(theta_STOP)")
    p.add_argument("--max-evals", type=int, default=None, metavar="N",
                   help="path-gradient evaluations a run's replica may cost (default: 400000; 0: no limit): "
                        "without --quadrature the adaptive rule is used within it, else gauss-legendre 2; "
                        "--table skips the rules that exceed it together")
    p.add_argument("--tol", type=float, default=None, metavar="TOL",
                   help=f"relative error per step and input of the adaptive rule (default: the rule's own: 1e-07, "
                        f"the replica's, or {SCORES_TOL:g} for the default rule when the 1e-07 one exceeds "
                        f"--max-evals)")
    _add_memory_budget(p, "the replica's own bounds, as 2GiB")
    _add_size(p, "small")
    _add_device(p)
    cli_launch.add_nproc(p)
    _common(p, suppress=True)

    p = sub.add_parser("influence", help="influence scores along chosen axes, saved as safetensors and CSV")
    p.add_argument("run", help="run folder")
    p.add_argument("--keep", default="step,group",
                   help="kept axes among step, group, param, train (default: step,group)")
    p.add_argument("--target", default="label", help="label, predicted, all or loss (default: label)")
    p.add_argument("--steps", default=None, metavar="START:STOP", help="only these optimizer steps, e.g. 0:100")
    p.add_argument("--n-test", type=int, default=None, help="validation inputs to explain (default: 64)")
    p.add_argument("--out", required=True,
                   help="output folder: attribution.safetensors + attribution.json + scores.csv")
    p.add_argument("--no-csv", action="store_true", help="do not write the CSV")
    _add_scores_rule(p)
    _add_memory_budget(p, "2GB")
    _add_device(p)
    cli_launch.add_nproc(p)
    _common(p, suppress=True)

    p = sub.add_parser("prune", help="the pruning benchmark on digits (ExPLAIND scores versus classic criteria)")
    p.add_argument("--out", default="pruning", help="output folder (default: pruning)")
    _add_size(p, "small")
    p.add_argument("--seed", type=int, default=0)
    _add_scores_rule(p)
    _common(p, suppress=True)

    p = sub.add_parser("validate", help="how well each attribution method predicts retraining on digits subsets "
                                        "(LDS, top-k removal)")
    p.add_argument("--quick", action="store_true", help="tiny size: a smoke test, not a measurement")
    p.add_argument("--setting", nargs="+",
                   choices=("sgd_mlp", "adamw", "dropout", "batchnorm", "contrastive", "relu_untuned", "tiny_lm"),
                   default=["sgd_mlp"], help="training runs validated on (default: the MLP with SGD and momentum)")
    p.add_argument("--settings-size", action="store_true", help="sgd_mlp at the size of the other settings")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: each setting's own)")
    p.add_argument("--leave-out", action="store_true",
                   help="also measure against retraining with the removed samples left out of their batches")
    p.add_argument("--activation", choices=("tanh", "relu"), nargs="+", default=None,
                   help="hidden-layer nonlinearity (default tanh; relu for relu_untuned)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per recorded batch (default 25)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training set (default 10, settings 8)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default 500, settings 300)")
    p.add_argument("--n-test", type=int, default=None, help="explained test images (default 50, settings 30)")
    p.add_argument("--methods", nargs="+", default=None, help="compare only these methods (default: the setting's)")
    p.add_argument("--subsets", type=int, default=None, help="subsets per fraction (default 200; quick 8)")
    p.add_argument("--fractions", type=float, nargs="+", default=None, help="default: 0.5 0.9 0.99")
    p.add_argument("--top-k", type=int, default=None, help="proponents removed per test point (default 25)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=None, help="independent runs pooled (default 5; quick 1)")
    p.add_argument("--out", default=None, help="folder for the JSON, CSV and PNG results (for 'report --validation')")
    _common(p, suppress=True)

    p = sub.add_parser("report", help="plots and the HTML report of a stored run")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", default=None, help="report folder (default: RUN/report)")
    p.add_argument("--n-test", type=int, default=None, help="validation inputs in the influence figures")
    p.add_argument("--pruning", default=None, help="folder of an 'explaind prune' result to include")
    p.add_argument("--validation", default=None,
                   help="folder of an 'explaind validate --out DIR' result to include (default: RUN/validation "
                        "when it exists)")
    p.add_argument("--data-steps", default="32", metavar="N",
                   help="split the first N steps over training samples in the data view, or 'all' (default: 32)")
    _add_scores_rule(p)
    _add_memory_budget(p, "2GB")
    _add_device(p)
    _common(p, suppress=True)

    p = sub.add_parser("salvage", help="copy the steps of a damaged store that can be proven intact into a new one")
    p.add_argument("run", help="the damaged store (only read)")
    p.add_argument("--out", required=True, help="the new store (a new path or an empty directory)")
    p.add_argument("--replay", action="store_true",
                   help="prove steps of a store written before schema 3 whose journal lines were lost by replaying "
                        "their recorded updates (from the store's own model spec and data)")
    _common(p, suppress=True)

    p = sub.add_parser("plugins", help="list the installed plugins and what they register")
    _common(p, suppress=True)

    p = sub.add_parser("study", help="studies from the paper")
    studies = p.add_subparsers(dest="study", metavar="STUDY", parser_class=_Parser)
    g = studies.add_parser("grokking", help="grokking on (a + b) mod p: curves, influence per phase")
    g.add_argument("--out", default="grokking", help="output folder (default: grokking)")
    _add_size(g, "small")
    g.add_argument("--p", type=int, default=None, help="modulus (default: 113 at --size full, smaller on CPU)")
    g.add_argument("--steps", type=int, default=None, help="maximum optimizer steps (default: by size)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    _common(g, suppress=True)
    _common(p, suppress=True)
    return parser


# --------------------------------------------------------------------------- main
def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[argparse.ArgumentParser, str]:
    """The parser of the (sub)command that ``args`` chose, and its name (``explaind study grokking``)."""
    prog, names = "explaind", [args.command, getattr(args, "study", None)]
    for name in names:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if name is None or not subs or name not in subs[0].choices:
            break
        parser, prog = subs[0].choices[name], f"{prog} {name}"
    return parser, prog


def _unknown_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> NoReturn:
    """Exit 2 with one line naming the first argument the command does not take, the closest option and the rest."""
    chosen, prog = _chosen_parser(parser, args)
    options = [o for a in chosen._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    word = extra[0]
    if word.startswith("-"):
        close = difflib.get_close_matches(word.split("=")[0], options, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        message = f"unknown option {word!r}.{hint} The options of '{prog}' are: {', '.join(options)}"
    else:
        usage = " ".join(chosen.format_usage().split()[1:])
        message = f"unexpected argument {word!r}; usage: {usage}"
    chosen.exit(EXIT_USAGE, f"{prog}: error: {message} (see '{prog} --help')\n")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines)


def _warning_line(prog: str, message: Warning | str) -> str:
    """A warning as one line naming the command (not Python's file:line and source line), below any progress bar."""
    from tqdm import tqdm

    # a bar being drawn has no newline yet: start the warning on a line of its own
    return f"{chr(10) if getattr(tqdm, '_instances', None) else ''}{prog}: warning: {message}\n"


def default_threads(args: argparse.Namespace) -> int | None:
    """CPU threads of torch for a command: ``--threads``, else 1 on the CPU (``None``: leave torch's choice).

    The models of the commands are small: their operations fall under torch's parallel grain size,
    and on a machine whose cores are busy the waiting worker threads spin and cost several times
    the work (measured by ``benchmarks/bench_quickstart.py --threads``, table in ``docs/cli.md``). An
    ``OMP_NUM_THREADS`` set in the environment, or a ``cuda`` device, keeps torch's choice.
    """
    if args.threads is not None:
        return int(args.threads)
    if "OMP_NUM_THREADS" in os.environ or str(getattr(args, "device", "cpu") or "cpu").startswith("cuda"):
        return None
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also used as the console script)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unknown_arguments(parser, args, extra)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "study" and args.study is None:
        parser.exit(EXIT_USAGE, "explaind study: error: choose a study: grokking (see 'explaind study --help')\n")
    nproc = getattr(args, "nproc", 1)
    if nproc != 1 and not cli_launch.under_torchrun():
        try:
            return cli_launch.launch(list(sys.argv[1:] if argv is None else argv), nproc)
        except ExplaindError as exc:
            print(f"explaind {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
    grouped = hasattr(args, "nproc") and cli_launch.under_torchrun()
    rank = cli_launch.join_group(args.device) if grouped else 0
    out = Output(quiet=args.quiet, as_json=args.json, silent=rank > 0)
    if rank > 0:  # rank 0 warns for all
        warnings.simplefilter("ignore")
    threads = default_threads(args)
    if threads is not None:
        if threads < 1:
            parser.exit(EXIT_USAGE, f"explaind: error: --threads {threads} must be a positive integer\n")
        import torch

        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR if out.quiet else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    prog = f"explaind {args.command}" + (f" {args.study}" if args.command == "study" else "")
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: _warning_line(prog, message)
    try:
        handler = getattr(cli_commands, f"cmd_{args.command}")
        code = int(handler(args, out) or EXIT_OK)
        if grouped:
            cli_launch.leave_group(code)
        return code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ExplaindError, ValueError) as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
