"""Handlers of the ``explaind`` subcommands (parsing lives in :mod:`explaind.cli`).

Each ``cmd_<name>(args, out)`` validates its arguments, calls the library and reports through
:class:`explaind.cli_io.Output`; it returns the exit code. Errors are raised as
:class:`~explaind.exceptions.ExplaindError` / ``ValueError`` and turned into one line by
:func:`explaind.cli.main`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .cli_io import parse_assignments
from .exceptions import ConfigError
from .studies.fidelity import format_table

__all__ = [
    "cmd_demo",
    "cmd_train",
    "cmd_replicate",
    "cmd_influence",
    "cmd_prune",
    "cmd_report",
    "cmd_plugins",
    "cmd_study",
]


def _positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{option} {value} must be a positive integer.")


# --------------------------------------------------------------------------- plugins
def cmd_plugins(args: argparse.Namespace, out: Any) -> int:
    """List loaded plugins and their entries."""
    import explaind

    plugins = explaind.get_plugins()
    lines = []
    for plugin in plugins:
        lines.append(f"{plugin['name']} {plugin['version']}")
        for kind, names in sorted(plugin["entries"].items()):
            lines.append(f"  {kind}: {', '.join(names)}")
    out.result("\n".join(lines) if lines else "(no plugins loaded)", {"plugins": plugins})
    return 0


# --------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace, out: Any) -> int:
    """Train and record a run."""
    from .studies.runs import train_run

    config = {
        "architecture": args.architecture,
        "dataset": args.dataset,
        "data": parse_assignments(args.data, "--data"),
        "model": parse_assignments(args.model, "--model"),
        "optimizer": args.optimizer,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "momentum": args.momentum,
        "betas": tuple(args.betas),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "eval_every": args.eval_every,
        "stop_at": args.stop_at,
        "seed": args.seed,
        "dtype": args.dtype,
        "device": args.device,
    }
    run = train_run(config, args.out, progress=out.progress, log=out.info)
    info = dict(run.info, run=str(run.path))
    text = (f"recorded {info['n_steps']} steps to {run.path} in {info['train_seconds']:.1f} s: "
            f"train acc {info['final_train_acc']:.3f}, validation acc {info['final_val_acc']:.3f}")
    out.result(text, info)
    return 0


# --------------------------------------------------------------------------- replicate
def cmd_replicate(args: argparse.Namespace, out: Any) -> int:
    """Fidelity of the kernel replica (one rule, or every rule with --table)."""
    from .studies import fidelity
    from .studies.runs import load_run

    _positive(args.n_test, "--n-test")
    _positive(args.nodes, "--nodes")
    if args.run is None:
        if not args.table:
            raise ConfigError("Give a run folder (explaind replicate RUN) or --table for the reference fidelity table.")
        start = time.perf_counter()
        rows = fidelity.reference_table(size=args.size, device=args.device, progress=out.progress)
        text = format_table(rows, fidelity.TABLE_COLUMNS)
        out.result(text + f"\n({time.perf_counter() - start:.1f} s)", {"rows": rows})
        return 0
    rules = fidelity.all_rules() if args.table else [fidelity.rule_from(args.quadrature, args.nodes)]
    run = load_run(args.run)
    rows = fidelity.run_fidelity(run, rules, n_test=args.n_test, device=args.device, progress=out.progress)
    out.result(format_table(rows, fidelity.TABLE_COLUMNS), {"run": str(run.path), "rows": rows})
    return 0


# --------------------------------------------------------------------------- influence
def cmd_influence(args: argparse.Namespace, out: Any) -> int:
    """Influence scores along the kept axes, saved to safetensors (+ CSV)."""
    from .studies import analysis, fidelity
    from .studies.runs import load_run

    _positive(args.n_test, "--n-test")
    keep = analysis.parse_keep(args.keep)
    steps = analysis.parse_steps(args.steps)
    target = analysis.check_target(args.target)
    rule = fidelity.rule_from(args.quadrature, args.nodes)
    run = load_run(args.run)
    att = analysis.influence(run, keep=keep, target=target, steps=steps, n_test=args.n_test, device=args.device,
                             quadrature=rule.quadrature, nodes=rule.nodes, progress=out.progress)
    written = analysis.save_attribution(att, Path(args.out), csv_file=not args.no_csv)
    summary = analysis.summarise(att)
    lines = [f"axes {summary['axes']} shape {summary['shape']}; completeness gap {summary['completeness_gap']:.3g}"]
    lines += [f"wrote {p}" for p in written]
    out.result("\n".join(lines), dict(summary, files=[str(p) for p in written]))
    return 0


# --------------------------------------------------------------------------- prune
def cmd_prune(args: argparse.Namespace, out: Any) -> int:
    """Run the pruning benchmark on digits."""
    from .studies import pruning_run

    result = pruning_run.run_benchmark(args.out, size=args.size, seed=args.seed, progress=out.progress)
    out.result(pruning_run.format_result(result), result)
    return 0


# --------------------------------------------------------------------------- validate
def cmd_validate(args: argparse.Namespace, out: Any) -> int:
    """The validation benchmark (``python -m explaind.validation``) with the same options."""
    from .validation.__main__ import main as validation_main

    argv = ["--activation", *args.activation, "--seed", str(args.seed)]
    argv += ["--quick"] if args.quick else []
    for flag, value in (("--subsets", args.subsets), ("--top-k", args.top_k), ("--out", args.out)):
        if value is not None:
            argv += [flag, str(value)]
    if args.fractions is not None:
        argv += ["--fractions", *(str(f) for f in args.fractions)]
    return validation_main(argv)


# --------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace, out: Any) -> int:
    """Figures and the HTML report of a stored run."""
    from .studies import fidelity
    from .studies.report import ReportOptions, build_report
    from .studies.runs import load_run

    _positive(args.n_test, "--n-test")
    rule = fidelity.rule_from(args.quadrature, args.nodes)
    run = load_run(args.run)
    target = Path(args.out) if args.out else Path(args.run) / "report"
    options = ReportOptions(quadrature=rule.quadrature, nodes=rule.nodes, device=args.device)
    page = build_report(run, target, n_test=args.n_test, pruning_dir=args.pruning, options=options,
                        progress=out.progress, log=out.info)
    out.result(f"report written to {page}", {"report": str(page), "figures": sorted(
        str(p) for p in page.parent.glob("*.png"))})
    return 0


# --------------------------------------------------------------------------- demo and studies
def cmd_demo(args: argparse.Namespace, out: Any) -> int:
    """The end-to-end demo."""
    from .studies.demo import run_demo

    result = run_demo(args.out, size=args.size, seed=args.seed, device=args.device, progress=out.progress,
                      log=out.info)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["timings"].items())
    text = result["fidelity_text"] + f"\n\nreport written to {result['report']} in {result['seconds']:.0f} s ({stages})"
    out.result(text, {k: v for k, v in result.items() if k != "fidelity_text"})
    return 0


def cmd_study(args: argparse.Namespace, out: Any) -> int:
    """Studies from the paper (currently: grokking)."""
    from .studies.grokking import run_grokking_study

    _positive(args.p, "--p")
    _positive(args.steps, "--steps")
    result = run_grokking_study(args.out, size=args.size, p=args.p, steps=args.steps, seed=args.seed,
                                device=args.device, progress=out.progress, log=out.info)
    phases = ", ".join(f"{ph['name']} {ph['start']}-{ph['stop']}" for ph in result["phases"])
    text = (f"grokking study: p={result['p']}, {result['n_steps']} steps, final train/val acc "
            f"{result['final_train_acc']:.3f}/{result['final_val_acc']:.3f}\nphases: {phases}\n"
            f"report written to {result['report']}")
    out.result(text, result)
    return 0
