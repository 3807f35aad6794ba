"""The fidelity table: how exactly the kernel replica reproduces the trained model.

Extends Table 1 of the ExPLAIND paper: for three reference setups (a digits CNN trained with
SGD and momentum, the modular-arithmetic transformer with AdamW, an MLP with Adam) and every
quadrature rule (midpoint with 10 and 100 nodes, Gauss–Legendre, the adaptive rule) it reports

* **argmax agreement** — fraction of validation inputs where replica and model pick the same class;
* **KL** — mean ``KL(softmax f || softmax f̂)`` between model and replica;
* **max rel error** — ``max |f̂ - f| / max |f|`` over inputs and outputs;
* **step error** — the largest quadrature error of a step, relative to its largest change
  ``|g(θ_{s+1}) − g(θ_s)|`` (the rule's own error, what its warnings are about);
* **evals/step** — path-gradient evaluations per step and input (the cost).

A table compares rules, so each fixed rule's error is its row's **step error** and the rules that
left steps above the replica's tolerance are named in one warning after the table
(:func:`warn_inexact_rules`); the adaptive rule, the error-controlled one, keeps its own warnings.

``explaind replicate --table`` prints it; :func:`run_fidelity` computes the rows of one run.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..exceptions import ConfigError, ExplaindWarning, warn_at_caller

__all__ = ["format_table", "Rule", "all_rules", "rule_from", "run_fidelity", "reference_setups", "reference_table",
           "TABLE_COLUMNS", "estimated_evals", "evals_text", "affordable_rules", "TABLE_MAX_EVALS", "DEFAULT_RULES",
           "default_rule", "SCORES_RULE", "SCORES_TOL", "scores_rule", "warn_inexact_rules", "inexact_rules_note"]

TABLE_COLUMNS = ["setup", "rule", "evals/step", "argmax agreement", "KL", "max rel error", "step error", "seconds"]
_QUADRATURES = ("adaptive", "gauss-legendre", "midpoint", "left")
#: Path-gradient evaluations that ``explaind replicate RUN --table`` spends by default (about a
#: minute for the quickstart's transformer on one CPU thread, at ~165 µs per evaluation).
TABLE_MAX_EVALS = 400_000
#: Fewest evaluations per step and input the adaptive rule makes (two panels of Gauss–Legendre 4
#: and their comparison); its real cost grows with how curved each step's path is.
_ADAPTIVE_MIN_EVALS = 12


@dataclass(frozen=True)
class Rule:
    """A quadrature rule of the replica: name, nodes and, for ``adaptive``, its tolerance.

    ``nodes=None`` is the rule's default; ``tol=None`` the replica's (``KernelReplica``'s 1e-7): the
    relative error per step and input the adaptive rule refines to, and above which it warns.
    """

    quadrature: str
    nodes: int | None = None
    tol: float | None = None

    @property
    def label(self) -> str:
        """Short name, e.g. ``midpoint-100``."""
        return self.quadrature if self.nodes is None else f"{self.quadrature}-{self.nodes}"


def all_rules() -> list[Rule]:
    """The rules of the table: midpoint 10 and 100, Gauss–Legendre 4, adaptive."""
    return [Rule("midpoint", 10), Rule("midpoint", 100), Rule("gauss-legendre", 4), Rule("adaptive")]


def estimated_evals(rule: Rule, n_steps: int, n_test: int) -> int:
    """Path-gradient evaluations of ``rule`` over ``n_steps`` steps and ``n_test`` inputs.

    Exact for the fixed rules; a lower bound for ``adaptive``, whose refinement depends on the
    path (the early steps of a run with a large learning rate can take hundreds per step): its
    first estimate, ``nodes`` per step and input, when the panel nodes are given.
    """
    from ..kernel.quadrature import DEFAULT_NODES

    if rule.quadrature == "adaptive":  # with its panel nodes given: its first estimate, which every unit makes
        per_step = _ADAPTIVE_MIN_EVALS if rule.nodes is None else rule.nodes
    else:
        per_step = rule.nodes if rule.nodes is not None else DEFAULT_NODES[rule.quadrature]
    return int(per_step) * int(n_steps) * int(n_test)


def evals_text(rule: Rule, evals: int) -> str:
    """``evals`` as said to the user: ``"4,000"``, or ``"at least 4,800"`` for ``adaptive`` (a lower bound)."""
    return f"{'at least ' if rule.quadrature == 'adaptive' else ''}{evals:,}"


def rules_cost(rules: list[Rule], n_steps: int, n_test: int) -> str:
    """The evaluations of comparing ``rules`` over ``n_steps`` steps and ``n_test`` inputs, as said to the user.

    E.g. ``"midpoint-10, gauss-legendre-4 and adaptive over 40 steps x 64 inputs = at least 66,560
    path-gradient evaluations"`` (``at least`` when ``adaptive`` is among them: its count is a lower bound).
    """
    total = sum(estimated_evals(rule, n_steps, n_test) for rule in rules)
    bound = any(rule.quadrature == "adaptive" for rule in rules)
    labels = [rule.label for rule in rules]
    names = labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} and {labels[-1]}"
    return (f"{names} over {n_steps} steps x {n_test} inputs = {'at least ' if bound else ''}{total:,} "
            f"path-gradient evaluations")


def affordable_rules(rules: list[Rule], n_steps: int, n_test: int,
                     max_evals: int | None = TABLE_MAX_EVALS) -> tuple[list[Rule], list[tuple[Rule, int]]]:
    """Split ``rules`` into those whose evaluations fit in ``max_evals`` together, and the rest.

    Rules are admitted cheapest first (the table keeps the order of ``rules``); ``adaptive`` is
    counted at its lower bound (:func:`estimated_evals`).

    Returns
    -------
    kept : list of Rule
        In the order of ``rules``.
    skipped : list of (Rule, int)
        Each left-out rule with its estimated evaluations.
    """
    if max_evals is None:
        return list(rules), []
    cost = {rule: estimated_evals(rule, n_steps, n_test) for rule in rules}
    spent, admitted = 0, set()
    for rule in sorted(rules, key=lambda r: cost[r]):
        if spent + cost[rule] <= max_evals:
            spent += cost[rule]
            admitted.add(rule)
    return [r for r in rules if r in admitted], [(r, cost[r]) for r in rules if r not in admitted]


#: The rule of the influence scores of ``explaind influence`` and ``explaind report`` when none is chosen: the
#: adaptive rule on 2-node Gauss–Legendre panels. A step whose 2-node estimate is within ``SCORES_TOL`` costs its
#: 2 evaluations; a step across activation kinks is refined until it is (docs/cli.md, "explaind influence").
SCORES_RULE = Rule("adaptive", 2)
#: Relative tolerance per step and input of :data:`SCORES_RULE`. Steps within it leave, for one output per input,
#: at most ``SCORES_TOL * sum_s |g(theta_{s+1}) - g(theta_s)|`` to the quadrature error. That bound is no promise
#: of a share below the warning threshold (1e-3; the steps' changes add up to 4.8 times the explained change on the
#: quickstart's run), but the errors of a step within tolerance mostly cancel: the quickstart's influence leaves
#: 0.00437 % at 1e-3 (its float64 run of 670 steps, 80.5 s on one idle CPU thread; docs/cli.md). At tolerances of
#: 1e-3 and above the adaptive rule integrates failing pairs on cut gaps between its nodes (docs/engine.md §2,
#: "Loose tolerances"). The share is
#: measured from every step's exact change and printed, and warned about above the threshold, so a run where the
#: errors do not cancel is told; a step the rule leaves above its tolerance is warned about too.
SCORES_TOL = 1e-3

#: The rules ``explaind replicate RUN`` tries without ``--quadrature``, the first whose cost fits the budget: the
#: adaptive rule at the replica's own tolerance (1e-7 per step and input: a replica at rounding level on smooth
#: paths; where a path crosses many ReLU kinks some pairs are integrated on a grid that misses 1e-7, and a warning
#: says so); then the adaptive rule of the scores (:data:`SCORES_RULE` at :data:`SCORES_TOL`: every step and input
#: within 1e-3 of its change, or a warning), whose lower bound is a sixth of the first's; else the fixed rule of
#: the same count, whatever its cost (docs/cli.md, "explaind replicate").
DEFAULT_RULES = (Rule("adaptive"),
                 Rule(SCORES_RULE.quadrature, SCORES_RULE.nodes, SCORES_TOL),
                 Rule("gauss-legendre", SCORES_RULE.nodes))


def default_rule(n_steps: int, n_test: int,
                 max_evals: int | None = TABLE_MAX_EVALS) -> tuple[Rule, list[tuple[Rule, int]]]:
    """The rule of a replica whose rule was not chosen, and the more accurate rules passed over for their cost.

    The first of :data:`DEFAULT_RULES` whose :func:`estimated_evals` (a lower bound for ``adaptive``)
    is at most ``max_evals`` (``None``: no limit, always the first, the adaptive rule at the replica's 1e-7); the
    last one when none fits.

    Returns
    -------
    rule : Rule
    passed_over : list of (Rule, int)
        The rules before it with their estimated evaluations.

    Raises
    ------
    ConfigError
        When ``max_evals`` is negative.
    """
    if max_evals is not None and max_evals < 0:
        raise ConfigError(f"max_evals={max_evals} is not allowed: it counts path-gradient evaluations. Allowed: an "
                          f"integer >= 0, or None for no limit. Fix: pass e.g. max_evals={TABLE_MAX_EVALS}.")
    passed: list[tuple[Rule, int]] = []
    for rule in DEFAULT_RULES[:-1]:
        cost = estimated_evals(rule, n_steps, n_test)
        if max_evals is None or cost <= max_evals:
            return rule, passed
        passed.append((rule, cost))
    return DEFAULT_RULES[-1], passed


def scores_rule(quadrature: str | None, nodes: int | None) -> Rule:
    """The rule of the influence scores given on the command line (``None``: not given).

    Without ``--quadrature``, :data:`SCORES_RULE` (``--nodes`` alone sets its panel nodes); with it,
    the rule as given (:func:`rule_from`).
    """
    if quadrature is None:
        return rule_from(SCORES_RULE.quadrature, SCORES_RULE.nodes if nodes is None else nodes)
    return rule_from(quadrature, nodes)


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Plain-text table of dict rows (floats in 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join([line, rule, *body])


def rule_from(quadrature: str, nodes: int | None = None, tol: float | None = None) -> Rule:
    """Validate a rule given on the command line (``tol`` is kept for ``adaptive`` only)."""
    if quadrature not in _QUADRATURES:
        raise ConfigError(f"Unknown quadrature {quadrature!r}. Choose one of: {', '.join(_QUADRATURES)}.")
    if nodes is not None and nodes < 1:
        raise ConfigError(f"--nodes {nodes} must be a positive integer.")
    return Rule(quadrature, nodes, tol if quadrature == "adaptive" else None)


def run_fidelity(run: Any, rules: list[Rule], *, n_test: int | None = None, device: str = "cpu",
                 progress: bool = False, setup: str | None = None,
                 steps: tuple[int, int | None] | None = None, warn: bool = True,
                 memory_budget: int | str | None = None) -> list[dict[str, Any]]:
    r"""One table row per rule for a recorded run, on (the first ``n_test`` of) its validation inputs.

    Parameters
    ----------
    run : explaind.studies.runs.Run
    rules : list of Rule
    n_test : int, optional
    device : str
    progress : bool
        Progress bar over steps for each rule.
    setup : str, optional
        Name shown in the ``setup`` column (default: architecture + optimizer).
    steps : (int, int or None), optional
        Step window: the replica of steps ``start .. stop-1`` from :math:`f(x;\theta_{start})`
        against :math:`f(x;\theta_{stop})` (default: the whole run).
    warn : bool
        With more than one rule, the fixed rules' warnings that steps stayed above the replica's
        tolerance are held back (each row's ``step error`` states its rule's error) and given as one
        warning naming them all (:func:`warn_inexact_rules`); ``False`` leaves that warning to the caller
        (it reads each row's ``warned``). The adaptive rule's warnings, and all of a single rule's, pass
        through as they are.
    memory_budget : int or str, optional
        The replica's ``memory_budget`` (:class:`~explaind.KernelReplica`; default: its own bounds).
    """
    import explaind

    X, _ = run.dataset.val
    if n_test is not None:
        X = X[:n_test]
    name = setup or f"{run.config.architecture} / {run.config.optimizer}"
    rows = []
    for rule in rules:
        start = time.perf_counter()
        tol = {} if rule.tol is None else {"tol": rule.tol}
        replica = explaind.KernelReplica(quadrature=rule.quadrature, nodes=rule.nodes, device=device,
                                         progress=progress, steps=steps, memory_budget=memory_budget, **tol)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = replica.fit(run.trajectory).fidelity_report(X)
        held = [w for w in caught if len(rules) > 1 and _fixed_rule_warning(w)]
        for w in caught:  # what the table does not state itself is warned about as it came
            if w not in held:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        rows.append({
            "setup": name,
            "rule": rule.label,
            "evals/step": float(np.mean(report["evals_per_step"])),
            "argmax agreement": float(report["argmax_agreement"]),
            "KL": float(report["kl_divergence"]),
            "max rel error": float(report["max_rel_error"]),
            "step error": float(np.max(report["relative_quadrature_error"], initial=0.0)),
            "seconds": round(time.perf_counter() - start, 2),
            "n_test": int(len(X)),
            "n_steps": int(len(report["steps"])),
            "warned": bool(held),
            "tol": float(replica.tol),
        })
    if warn:
        warn_inexact_rules(rows)
    return rows


def _fixed_rule_warning(w: warnings.WarningMessage) -> bool:
    """Whether ``w`` is a fixed rule's warning that (step, input) pairs stayed above the replica's tolerance."""
    return issubclass(w.category, ExplaindWarning) and str(w.message).startswith("quadrature=")


def inexact_rules_note(rows: list[dict[str, Any]]) -> str | None:
    """The sentence naming the table's fixed rules that left steps above tolerance (``None``: none did).

    ``rows`` are :func:`run_fidelity`'s (a row is counted when ``warned``). :func:`warn_inexact_rules`
    warns it; the command line prints it under the table instead, which states each rule's error.
    """
    inexact = [row for row in rows if row.get("warned")]
    if not inexact:
        return None
    labels = list(dict.fromkeys(f"{row['rule']}" + (f" ({row['setup']})" if len({r['setup'] for r in rows}) > 1
                                                    else "") for row in inexact))
    worst = max(row["step error"] for row in inexact)
    return (f"the fixed rules of the table ({', '.join(labels)}) left steps above the replica's tolerance "
            f"{inexact[0]['tol']:g} of their change, by up to {worst:.2g}: each row's 'step error' column is its "
            f"rule's largest, and the error is kept in the replica's quadrature error. Fixed rules do not "
            f"control their error; the adaptive rule does (quadrature='adaptive'), and more nodes shrink it.")


def warn_inexact_rules(rows: list[dict[str, Any]]) -> None:
    """One :class:`~explaind.exceptions.ExplaindWarning` naming the table's fixed rules that left steps above tolerance.

    ``rows`` are :func:`run_fidelity`'s; nothing is warned when no row is ``warned`` (:func:`inexact_rules_note`).
    """
    note = inexact_rules_note(rows)
    if note is not None:
        warn_at_caller(note)


#: size -> (steps of each setup, validation inputs compared)
_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"steps": 3, "n_test": 6},
    "small": {"steps": 40, "n_test": 64},
    "full": {"steps": 300, "n_test": 512},
}


def reference_setups(size: str = "small", device: str = "cpu") -> list[tuple[str, dict[str, Any]]]:
    """The three setups of the table as ``(name, TrainConfig dict)`` at a size preset."""
    if size not in _SIZES:
        raise ConfigError(f"Unknown size {size!r}. Choose one of: {', '.join(_SIZES)}.")
    steps = _SIZES[size]["steps"]
    tiny = size == "tiny"
    return [
        ("digits CNN, SGD momentum", {
            "architecture": "cnn", "dataset": "digits",
            "model": {"channels": (4, 8)} if tiny else {},
            "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 64, "steps": steps,
            "eval_every": max(1, steps // 4), "device": device,
        }),
        ("modular transformer, AdamW", {
            "architecture": "modular_transformer", "dataset": "modular",
            "data": {"p": 7 if tiny else 23, "n_train": 0.5, "n_val": None},
            "model": {"d_model": 8, "n_heads": 2, "d_mlp": 16} if tiny else {"d_model": 32, "n_heads": 4, "d_mlp": 128},
            "optimizer": "adamw", "lr": 1e-3, "betas": (0.9, 0.98), "weight_decay": 1.0, "steps": steps,
            "eval_every": max(1, steps // 4), "device": device,
        }),
        ("digits MLP, Adam", {
            "architecture": "mlp", "dataset": "digits",
            "model": {"hidden_sizes": (8,) if tiny else (32, 32)},
            "optimizer": "adam", "lr": 1e-3, "batch_size": 64, "steps": steps,
            "eval_every": max(1, steps // 4), "device": device,
        }),
    ]


def reference_table(size: str = "small", *, device: str = "cpu", progress: bool = False,
                    rules: list[Rule] | None = None, log: Any = None, warn: bool = True) -> list[dict[str, Any]]:
    """Train the three reference setups (in memory) and compare every rule on each.

    ``log`` (a callable taking a line) is told the cost first: the setups, their steps and the
    path-gradient evaluations of the rules (:func:`rules_cost`). ``warn=False`` leaves the warning
    about the fixed rules (:func:`warn_inexact_rules`) to the caller, as in :func:`run_fidelity`.

    Returns
    -------
    list of dict
        Rows with the :data:`TABLE_COLUMNS` (plus ``n_test`` and ``n_steps``).
    """
    from .runs import train_run

    rows: list[dict[str, Any]] = []
    n_test = _SIZES[size]["n_test"] if size in _SIZES else None
    setups = reference_setups(size, device)
    say = log or (lambda message: None)
    say(f"replicate --table ({size}): {len(setups)} reference setups, each trained for {_SIZES[size]['steps']} steps, "
        f"then {rules_cost(rules or all_rules(), _SIZES[size]['steps'], n_test)} per setup")
    for name, config in setups:
        run = train_run(config, None, progress=progress)
        rows += run_fidelity(run, rules or all_rules(), n_test=n_test, device=device, progress=progress, setup=name,
                             warn=False)
    if warn:
        warn_inexact_rules(rows)
    return rows
