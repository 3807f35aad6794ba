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
    "cmd_salvage",
    "cmd_study",
]


def _positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{option} {value} must be a positive integer.")


def _memory_budget(value: str | None, default: str | None) -> int | str | None:
    """``--memory-budget``: checked as the estimators check ``memory_budget`` (bytes or a size such as ``2GB``);
    ``default`` without it."""
    from .kernel.budget import parse_bytes

    return default if value is None else parse_bytes(value, "--memory-budget")


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


def cmd_salvage(args: argparse.Namespace, out: Any) -> int:
    """Copy the steps of a damaged store that can be proven intact into a new store (docs/recording.md)."""
    from .trajectory.base import Trajectory

    report = Trajectory.salvage(args.run, out=args.out, replay=args.replay)
    out.result(str(report), {"source": str(report.source), "out": str(report.out), "kept": report.kept,
                             "dropped": report.dropped, "unreadable_lines": report.unreadable_lines,
                             "states": report.states, "resume_at": report.resume_at, "replayed": report.replayed})
    return 0


# --------------------------------------------------------------------------- train
def _resume_conflicts(config: dict[str, Any], run_dir: str) -> None:
    """With ``--resume`` the settings come from ``run.json``: an option given with another value is an error."""
    from .config import validate_config
    from .studies.run_file import read_run_file
    from .studies.runs import TrainConfig

    stored = read_run_file(run_dir)["config"]
    given = validate_config(TrainConfig, config, "train", fix="Fix the option and resume again.")
    given = given.model_dump(mode="json")
    defaults = TrainConfig().model_dump(mode="json")
    for key, value in given.items():
        if value != defaults[key] and value != stored.get(key):
            option = "--" + key.replace("_", "-")
            raise ConfigError(f"--resume continues {run_dir!r} with the settings of its run.json, but {option} "
                              f"{value!r} differs from the run's {stored.get(key)!r}. Drop {option}, or train a new "
                              f"run into another --out folder.")


def cmd_train(args: argparse.Namespace, out: Any) -> int:
    """Train and record a run (or continue an interrupted one with ``--resume``)."""
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
    if args.resume:
        _resume_conflicts(config, args.out)
    run = train_run(None if args.resume else config, args.out, progress=out.progress, log=out.info,
                    resume=args.resume)
    info = dict(run.info, run=str(run.path))
    resumed = "" if info.get("resumed_at") is None else f" (resumed at step {info['resumed_at']})"
    text = (f"recorded {info['n_steps']} steps to {run.path}{resumed} in {info['train_seconds']:.1f} s: "
            f"train acc {info['final_train_acc']:.3f}, validation acc {info['final_val_acc']:.3f}")
    out.result(text, info)
    return 0


# --------------------------------------------------------------------------- replicate
#: Validation inputs compared or explained when --n-test is not given (one rule / the table of a run).
N_TEST_DEFAULT, N_TEST_TABLE = 64, 32


def _window(n_steps: int, steps: tuple[int, int | None] | None) -> int:
    if steps is None:
        return n_steps
    return max(0, (n_steps if steps[1] is None else min(steps[1], n_steps)) - steps[0])


def _announce(out: Any, what: str, rule: Any, n_steps: int, n_test: int) -> None:
    """Say up front how many path-gradient evaluations a computation will make."""
    from .kernel.adaptive import MAX_EVALS
    from .kernel.planning import EVALS_NOTICE
    from .studies import fidelity

    evals = fidelity.estimated_evals(rule, n_steps, n_test)
    label = rule.label if rule.tol is None else _rule_text(rule, rule.tol)
    bound = (f"; up to about {MAX_EVALS:,} per step and input where the path crosses many activation kinks (the "
             f"progress bar shows the mean, and a warning says so above {EVALS_NOTICE} on average)"
             if rule.quadrature == "adaptive" else "")
    out.info(f"{what}: {label} over {n_steps} steps x {n_test} inputs = {fidelity.evals_text(rule, evals)} "
             f"path-gradient evaluations{bound}")


def _cheaper_default(out: Any, n_steps: int, n_test: int, limit: int | None, tol: float | None) -> Any:
    """The rule of ``replicate RUN`` without ``--quadrature``: adaptive unless its cost exceeds the budget.

    ``tol`` (``--tol``) replaces the adaptive rule's tolerance when given.
    """
    import dataclasses

    from .studies import fidelity

    rule, passed = fidelity.default_rule(n_steps, n_test, limit)
    for other, evals in passed:
        out.info(f"replicate: {_default_text(other)} would take {fidelity.evals_text(other, evals)} path-gradient "
                 f"evaluations, more than --max-evals {limit:,}; using {_default_text(rule)} (its error is measured "
                 f"and shown). Force a rule with --quadrature and --tol, or raise --max-evals (0: no limit).")
    return dataclasses.replace(rule, tol=tol) if tol is not None and rule.quadrature == "adaptive" else rule


def _with_tol(rule: Any) -> Any:
    """``rule`` with the adaptive rule's tolerance spelled out (``None``: the replica's own, 1e-7)."""
    import dataclasses

    from .estimators.replica import KernelReplica

    if rule.quadrature != "adaptive" or rule.tol is not None:
        return rule
    return dataclasses.replace(rule, tol=KernelReplica().tol)


def _default_text(rule: Any) -> str:
    """A default rule as said to the user, with the adaptive rule's tolerance."""
    rule = _with_tol(rule)
    return rule.label if rule.tol is None else _rule_text(rule, rule.tol)


def _tolerance_line(row: dict[str, Any]) -> str:
    """Whether a single rule's steps met the tolerance the replica was asked for, with the measured error."""
    met = "within" if row["step error"] <= row["tol"] else "ABOVE"
    return (f"{row['rule']} at tol {row['tol']:g}: largest step error {row['step error']:.3g} of its step's change "
            f"({met} tol); the replica against the trained model: max rel error {row['max rel error']:.3g}")


def _note(rows: list[dict[str, Any]]) -> list[str]:
    """Under a table of rules, the line naming the fixed rules that left steps above tolerance (their error is in
    the table: the line is its reading, printed with the result rather than warned)."""
    from .studies.fidelity import inexact_rules_note

    note = inexact_rules_note(rows)
    return [] if note is None else [f"note: {note}"]


def _skip_note(rule: Any, evals: int, spent: int, limit: int) -> str:
    """Why ``--table`` left a rule out: its own cost, or its cost on top of the rules computed."""
    from .studies.fidelity import evals_text

    why = (f"{evals_text(rule, evals)} evaluations exceed" if evals > limit else
           f"{evals_text(rule, evals)} evaluations, with the {spent:,} of the rules computed, exceed")
    return f"skipped {rule.label}: {why} --max-evals {limit:,} (raise it, or use --steps / --n-test)"


def cmd_replicate(args: argparse.Namespace, out: Any) -> int:
    """Fidelity of the kernel replica (one rule, or every affordable rule with --table)."""
    from .studies import analysis, fidelity
    from .studies.runs import load_run

    _positive(args.n_test, "--n-test")
    _positive(args.nodes, "--nodes")
    budget = _memory_budget(args.memory_budget, None)
    if args.max_evals is not None and args.max_evals < 0:
        raise ConfigError(f"--max-evals {args.max_evals} must be 0 (no limit) or a positive integer.")
    if args.run is None:
        if not args.table:
            raise ConfigError("Give a run folder (explaind replicate RUN) or --table for the reference fidelity table.")
        start = time.perf_counter()
        rows = fidelity.reference_table(size=args.size, device=args.device, progress=out.progress, log=out.info,
                                        warn=False)
        text = "\n".join([format_table(rows, fidelity.TABLE_COLUMNS), *_note(rows)])
        out.result(text + f"\n({time.perf_counter() - start:.1f} s)", {"rows": rows,
                                                                       "note": fidelity.inexact_rules_note(rows)})
        return 0
    steps = analysis.parse_steps(args.steps)
    # without --quadrature (and --nodes, which alone keeps meaning panels of the adaptive rule) the rule is chosen
    # by its cost below
    chosen = args.quadrature is None and args.nodes is None
    # --tol sets the adaptive rule's tolerance; without it each rule keeps its own (the replica's 1e-7, or the
    # default rule's, fidelity.DEFAULT_RULES)
    tol = None if args.tol is None else _tol(args.tol)
    single = None if args.table or chosen else fidelity.rule_from(args.quadrature or "adaptive", args.nodes, tol)
    run = load_run(args.run)
    n_test = min(args.n_test or (N_TEST_TABLE if args.table else N_TEST_DEFAULT), run.dataset.n_val)
    n_steps = _window(int(run.trajectory.n_steps), steps)
    skipped: list[tuple[Any, int]] = []
    limit = fidelity.TABLE_MAX_EVALS if args.max_evals is None else args.max_evals or None
    if args.table:
        rules, skipped = fidelity.affordable_rules([fidelity.rule_from(r.quadrature, r.nodes, tol)
                                                    for r in fidelity.all_rules()], n_steps, n_test, limit)
    elif single is None:
        rules = [_cheaper_default(out, n_steps, n_test, limit, tol)]
    else:
        rules = [single]
    for rule in rules:
        _announce(out, "replicate", _with_tol(rule), n_steps, n_test)
    rows = fidelity.run_fidelity(run, rules, n_test=n_test, device=args.device, progress=out.progress, steps=steps,
                                 warn=False, memory_budget=budget)
    rows_evals = sum(fidelity.estimated_evals(rule, n_steps, n_test) for rule in rules)
    notes = [_skip_note(rule, evals, rows_evals, limit) for rule, evals in skipped]
    single_line = [_tolerance_line(rows[0])] if len(rows) == 1 and rows[0]["rule"].startswith("adaptive") else []
    text = "\n".join([format_table(rows, fidelity.TABLE_COLUMNS), *single_line, *_note(rows), *notes])
    out.result(text, {"run": str(run.path), "rows": rows, "note": fidelity.inexact_rules_note(rows),
                      "skipped": [{"rule": r.label, "estimated_evals": e} for r, e in skipped]})
    return 0


# --------------------------------------------------------------------------- influence
def cmd_influence(args: argparse.Namespace, out: Any) -> int:
    """Influence scores along the kept axes, saved to safetensors (+ CSV)."""
    from .studies import analysis, fidelity
    from .studies.runs import load_run

    _positive(args.n_test, "--n-test")
    budget = _memory_budget(args.memory_budget, "2GB")
    keep = analysis.parse_keep(args.keep)
    steps = analysis.parse_steps(args.steps)
    target = analysis.check_target(args.target)
    rule = fidelity.scores_rule(args.quadrature, args.nodes)
    tol = _tol(args.tol)
    run = load_run(args.run)
    n_test = min(args.n_test or N_TEST_DEFAULT, run.dataset.n_val)
    window = _window(int(run.trajectory.n_steps), steps)
    if not args.no_csv:
        analysis.check_csv_rows(analysis.csv_rows(run, keep, target, window, n_test), keep, n_test)
    _announce(out, "influence", rule, window, n_test)
    att = analysis.influence(run, keep=keep, target=target, steps=steps, n_test=n_test, device=args.device,
                             quadrature=rule.quadrature, nodes=rule.nodes, tol=tol, progress=out.progress,
                             memory_budget=budget)
    written = [] if out.silent else analysis.save_attribution(att, Path(args.out), csv_file=not args.no_csv)
    summary = analysis.summarise(att)
    evals = summary["evals_per_step_mean"]
    lines = [f"axes {summary['axes']} shape {summary['shape']}; completeness gap {summary['completeness_gap']:.3g}; "
             f"quadrature error {summary['quadrature_error_max']:.3g} (largest per input and output, "
             f"{_rule_text(rule, tol)})" + (f"; {evals:.3g} path-gradient evaluations per step and input"
                                            if evals is not None else ""),
             _shares(att.meta, rule)]
    lines += [f"wrote {p}" for p in written]
    out.result("\n".join(lines), dict(summary, files=[str(p) for p in written]))
    return 0


def _tol(value: float | None) -> float:
    """``--tol``: the adaptive rule's relative tolerance per step and input (default ``fidelity.SCORES_TOL``)."""
    from .studies.fidelity import SCORES_TOL

    if value is None:
        return SCORES_TOL
    if not 0.0 < value < 1.0:
        raise ConfigError(f"--tol {value:g} must be a relative error between 0 and 1 (exclusive), e.g. --tol 1e-5.")
    return float(value)


def _rule_text(rule: Any, tol: float) -> str:
    """The rule as said to the user: ``adaptive-2, tol 0.0001`` or ``gauss-legendre-4``."""
    return f"{rule.label}, tol {tol:g}" if rule.quadrature == "adaptive" else rule.label


def _shares(meta: dict[str, Any], rule: Any) -> str:
    """The parts of the explained change the scores leave out (docs/maths.md), and how to shrink the quadrature's."""
    from .estimators._residual_tol import quadrature_tol
    from .estimators.influence import InfluenceConfig

    tol = quadrature_tol(InfluenceConfig.model_fields["residual_tol"].default)
    parts = [f"{name} share {100 * meta[key]:.3g}%" for name, key in (("quadrature error", "quadrature_share"),
                                                                       ("residual", "residual_share")) if key in meta]
    shrink = ("a smaller --tol shrinks" if rule.quadrature == "adaptive" else
              "more --nodes or --quadrature adaptive shrink")
    fix = (f"; above {100 * tol:g}%: {shrink} the quadrature error, at a higher cost"
           if meta.get("quadrature_share", 0.0) > tol and rule.quadrature != "left" else "")
    return f"of the explained change g(theta_stop) - g(theta_start): {', '.join(parts) or 'not measured'}{fix}"


# --------------------------------------------------------------------------- prune
def cmd_prune(args: argparse.Namespace, out: Any) -> int:
    """Run the pruning benchmark on digits."""
    from .studies import fidelity, pruning_run

    rule = fidelity.scores_rule(args.quadrature, args.nodes)
    tol = _tol(args.tol) if rule.quadrature == "adaptive" else None
    scored = "explaind" in (pruning_run.PRESETS.get(args.size, {}).get("strategies") or ("explaind",))
    out.info(pruning_run.cost_text(args.size) + (f"; the ExPLAIND scores' path integral: {_rule_text(rule, tol or 0.0)}"
                                                 if scored else ""))
    result = pruning_run.run_benchmark(args.out, size=args.size, seed=args.seed, nodes=rule.nodes,
                                       quadrature=rule.quadrature, tol=tol, progress=out.progress)
    out.result(pruning_run.format_result(result), result)
    return 0


# --------------------------------------------------------------------------- validate
def cmd_validate(args: argparse.Namespace, out: Any) -> int:
    """The validation benchmark (``python -m explaind.validation``) with the same options."""
    from .validation.__main__ import main as validation_main

    argv = ["--setting", *args.setting, "--seed", str(args.seed)]
    argv += ["--activation", *args.activation] if args.activation is not None else []
    argv += ["--methods", *args.methods] if args.methods is not None else []
    argv += ["--quick"] if args.quick else []
    argv += ["--settings-size"] if args.settings_size else []
    argv += ["--leave-out"] if args.leave_out else []
    argv += ["--progress"] if out.progress else []
    for flag, value in (("--subsets", args.subsets), ("--top-k", args.top_k), ("--seeds", args.seeds),
                        ("--lr", args.lr), ("--out", args.out), ("--batch-size", args.batch_size),
                        ("--epochs", args.epochs), ("--n-train", args.n_train), ("--n-test", args.n_test)):
        if value is not None:
            argv += [flag, str(value)]
    if args.fractions is not None:
        argv += ["--fractions", *(str(f) for f in args.fractions)]
    return validation_main(argv)


# --------------------------------------------------------------------------- report
def _data_steps(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--data-steps {text!r} must be a positive integer or 'all'.") from None
    _positive(value, "--data-steps")
    return value


def cmd_report(args: argparse.Namespace, out: Any) -> int:
    """Figures and the HTML report of a stored run."""
    from .studies import fidelity
    from .studies.report import ReportOptions, build_report
    from .studies.runs import load_run

    _positive(args.n_test, "--n-test")
    budget = _memory_budget(args.memory_budget, "2GB")
    rule = fidelity.scores_rule(args.quadrature, args.nodes)
    data_steps = _data_steps(args.data_steps)
    run = load_run(args.run)
    target = Path(args.out) if args.out else Path(args.run) / "report"
    options = ReportOptions(quadrature=rule.quadrature, nodes=rule.nodes, tol=_tol(args.tol), device=args.device,
                            data_steps=data_steps, memory_budget=budget)
    n_steps = int(run.trajectory.n_steps)
    _announce(out, "report, step x group view", rule, n_steps, min(options.n_test if args.n_test is None
                                                                    else args.n_test, run.dataset.n_val))
    _announce(out, "report, data view", rule, n_steps if data_steps is None else min(n_steps, data_steps),
              min(options.n_kernel, run.dataset.n_val))
    validation = args.validation
    if validation is None and any((Path(args.run) / "validation").glob("validation_*.json")):
        validation = Path(args.run) / "validation"
    page = build_report(run, target, n_test=args.n_test, pruning_dir=args.pruning, validation_dir=validation,
                        options=options, progress=out.progress, log=out.info)
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
