"""The report of a recorded run: figures computed from the trajectory, and the HTML page.

:func:`build_report` runs two influence queries on the run's validation set and draws:

* the training curves (the grokking curve on modular arithmetic, with detected phases);
* a step × layer-group heatmap of the absolute influence on the explained outputs;
* the balance of kernel (data) and regularization (weight decay) parts per layer group;
* the layer-group influence per training phase (modular arithmetic);
* the top proponent and opponent training samples of a few validation inputs;
* train × validation influence matrices at a few steps, ordered by class (``(a + b) mod p``);
* the pruning curve, when a pruning benchmark result is given;
* the LDS bars and tables of the validation benchmark, when its result folder is given;

then writes ``index.html`` with every figure embedded (:func:`explaind.viz.write_report`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import viz
from . import analysis, report_text
from .phases import detect_phases, run_outcome

__all__ = ["ReportOptions", "build_report", "phase_means", "phase_totals", "pick_kernel_inputs", "describe_sample"]


@dataclass
class ReportOptions:
    """Cost knobs of the report's influence queries.

    Attributes
    ----------
    n_test : int
        Validation inputs of the step × group query (heatmap, balance, phases).
    n_kernel : int
        Validation inputs of the data view (kernel matrices, proponents), picked spread over classes.
    n_queries, top_k : int
        Validation inputs shown with their top-``k`` proponents and opponents.
    kernel_steps : int
        Number of training steps at which the kernel matrix is drawn.
    data_steps : int or None
        The data view (per-sample influence) covers the first ``data_steps`` optimizer steps only
        (``None``: the whole run). Its cost grows with every step up to the last one shown —
        momentum carried from earlier steps is data of the samples that produced it, so a window
        later in the run still sweeps every step before it — hence a prefix, stated on the page.
    quadrature, nodes : str, int
        Path-integral rule of the report's queries (its error is reported on the page).
    tol : float
        Relative tolerance per step and input of the adaptive rule.
    device : str
    memory_budget : int or str
        Working-memory target of the influence queries; the data view keeps (step, train) in one
        sweep when that result fits in a quarter of it, else it runs one sweep per panel.
    chunk_size : int or None
        Samples or (input, node) pairs per vectorised call of the engine (larger is faster on a GPU).
    dtype : {"float64", "float32"}
        Compute dtype of the queries (float32 halves the cost of the data view; the page states
        the completeness gap it reaches).
    """

    n_test: int = 64
    n_kernel: int = 24
    n_queries: int = 3
    top_k: int = 3
    kernel_steps: int = 3
    data_steps: int | None = None
    quadrature: str = "gauss-legendre"
    nodes: int | None = 2
    tol: float = 1e-7
    device: str = "cpu"
    memory_budget: int | str = "2GB"
    chunk_size: int | None = 256
    dtype: str = "float64"


def describe_sample(dataset: Any, X: Any, y: Any) -> str:
    """Short caption of a sample: ``"3+5=8"`` for modular arithmetic, ``"cat"`` or ``"class 3"`` otherwise."""
    if dataset.name == "modular":
        return f"{int(X[0])}+{int(X[2])}={int(y)}"
    names = dataset.meta.get("class_names")
    if names:
        return str(names[int(y)])
    classes = dataset.meta.get("classes")
    return f"class {classes[int(y)] if classes else int(y)}"


def pick_kernel_inputs(y: np.ndarray, n: int) -> np.ndarray:
    """Indices of up to ``n`` inputs spread over the classes (round robin), sorted by class."""
    y = np.asarray(y)
    by_class = [list(np.nonzero(y == c)[0]) for c in np.unique(y)]
    chosen: list[int] = []
    while len(chosen) < min(n, len(y)):
        for members in by_class:
            if members and len(chosen) < n:
                chosen.append(int(members.pop(0)))
    chosen.sort(key=lambda i: (int(y[i]), i))
    return np.asarray(chosen, dtype=np.int64)


def phase_totals(scores: analysis.StepGroupScores, phases: list[Any]) -> np.ndarray:
    """Absolute influence of each group summed over the steps of each phase, shape ``(P, G)``."""
    means, counts = phase_means(scores, phases)
    return means * np.asarray(counts, dtype=np.float64)[:, None]


def phase_means(scores: analysis.StepGroupScores, phases: list[Any]) -> tuple[np.ndarray, list[int]]:
    """Absolute influence of each group per step of each phase, and the number of scored steps per phase.

    Returns
    -------
    means : ndarray, shape (P, G)
        The phase's sum divided by its number of scored steps (0 for a phase without any).
    counts : list of int
        Scored steps in each phase.
    """
    out = np.zeros((len(phases), len(scores.groups)))
    counts = []
    for p, phase in enumerate(phases):
        mask = (scores.steps >= phase.start) & (scores.steps < phase.stop)
        counts.append(int(mask.sum()))
        out[p] = scores.influence[mask].sum(0) / max(counts[-1], 1)
    return out, counts


def _kernel_steps(n_steps: int, phases: list[Any] | None, count: int) -> list[int]:
    if phases and len(phases) >= 2:
        steps = [(ph.start + ph.stop - 1) // 2 for ph in phases]
    else:
        steps = [int(round(f * (n_steps - 1))) for f in np.linspace(0.1, 1.0, count)]
    return sorted(dict.fromkeys(min(max(s, 0), n_steps - 1) for s in steps))[:max(count, 1)]


def _cost(opts: ReportOptions, n_steps: int, n_test: int) -> str:
    """The path-gradient evaluations of one view, said before it is computed (a lower bound for ``adaptive``)."""
    from .fidelity import Rule, estimated_evals, evals_text

    rule = Rule(opts.quadrature, opts.nodes)
    return f" ({rule.label}: {evals_text(rule, estimated_evals(rule, n_steps, n_test))} path-gradient evaluations)"


def build_report(run: Any, out_dir: str | Path, *, n_test: int | None = None, device: str = "cpu",
                 pruning_dir: str | Path | None = None, validation_dir: str | Path | None = None,
                 progress: bool = False,
                 options: ReportOptions | None = None, fidelity_rows: list[dict[str, Any]] | None = None,
                 title: str | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Compute the figures of a run and write its HTML report.

    Parameters
    ----------
    run : explaind.studies.runs.Run
    out_dir : str or Path
        Report folder (PNG files, ``scores.json`` and ``index.html``).
    n_test : int, optional
        Overrides ``options.n_test``.
    device : str
        Compute device when ``options`` is not given.
    pruning_dir : str or Path, optional
        Output folder of a pruning benchmark (``explaind prune``) whose curve is included.
    validation_dir : str or Path, optional
        Output folder of the validation benchmark (``explaind validate --out DIR``) whose LDS
        tables and bars are included.
    progress : bool
        Progress bars of the influence queries.
    options : ReportOptions, optional
    fidelity_rows : list of dict, optional
        A fidelity table to show (see :mod:`explaind.studies.fidelity`).
    title : str, optional
    log : callable, optional
        Receives one line per stage (the command line shows them unless ``-q``).

    Returns
    -------
    Path
        ``out_dir / "index.html"``.
    """
    opts = options or ReportOptions(device=device)
    if n_test is not None:
        opts.n_test = n_test
    say = log or (lambda message: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    traj, ds = run.trajectory, run.dataset
    modular = ds.name == "modular"
    outcome = run_outcome(run.history)
    # phases are only labelled on a run that generalised (validation reached the threshold after training did)
    phases = detect_phases(run.history, n_steps=traj.n_steps) if modular and outcome.generalised else None
    setup = report_text.describe_setup(run)
    sections: list[viz.ReportSection] = []

    curves = viz.training_curves(run.history, out / "training_curves.png", phases=phases,
                                 title="Training curves" + (" (grokking)" if modular and outcome.grokked else ""))
    phase_text = "" if not phases else " Detected phases: " + "; ".join(
        f"{p.name} steps {p.start}–{p.stop}" for p in phases) + " (rules: docs/guide_reports.md, Phases)."
    sections.append(viz.ReportSection(
        "Training", f"Model and data: {setup}. {traj.n_steps} optimizer steps were recorded. "
                    f"{outcome.describe()}{phase_text}", [curves],
        [f"Training curves of the {run.config.architecture} on {ds.name}."],
        notes=[report_text.HOW_TO_READ["training_curves.png"]]))

    if fidelity_rows:
        sections.append(viz.ReportSection(
            "Fidelity of the kernel replica",
            f"The replica f(x; θ_0) + Σ_s φ_s(x) Δθ_s of the same run ({run.config.architecture} on {ds.name}) "
            f"against the trained model on validation inputs, for each quadrature rule: argmax agreement, mean KL "
            f"between the two softmax outputs, the largest error relative to the largest output, and the cost in "
            f"gradient evaluations per step and input.", table=fidelity_rows))

    say(f"step x group influence on {min(opts.n_test, ds.n_val)} validation inputs"
        f"{_cost(opts, traj.n_steps, min(opts.n_test, ds.n_val))}")
    start = time.perf_counter()
    att = analysis.influence(run, keep=("step", "group"), target="label", n_test=opts.n_test, device=opts.device,
                             quadrature=opts.quadrature, nodes=opts.nodes, tol=opts.tol,
                             memory_budget=opts.memory_budget, chunk_size=opts.chunk_size, dtype=opts.dtype,
                             progress=progress)
    scores = analysis.step_group_scores(att)
    timings["step_group_seconds"] = round(time.perf_counter() - start, 2)
    heat = viz.step_group_heatmap(scores.steps, scores.groups, scores.influence, out / "step_group_influence.png",
                                  phases=phases, title="Absolute influence on the correct-class logit")
    balance = viz.balance_plot(scores.steps, scores.groups, scores.kernel, scores.regularization,
                               out / "kernel_vs_regularization.png", phases=phases)
    exact = report_text.exactness_note(att, quadrature=opts.quadrature, nodes=opts.nodes, dtype=opts.dtype)
    images = [heat, balance]
    captions = [f"Σ over {att.shape[0]} validation inputs of |data part| per step and parameter tensor.",
                "Data (kernel) part versus weight-decay part of each tensor's updates."]
    if phases:
        means, counts = phase_means(scores, phases)
        images.append(viz.phase_influence(scores.groups, [p.name for p in phases], means,
                                          out / "phase_influence.png", phase_steps=counts))
        captions.append("Absolute influence per step of each parameter tensor within each detected phase.")
    sections.append(viz.ReportSection(
        "Which layers, and when",
        f"Model and data: {setup}. Influence of every (step, parameter tensor) on the correct-class logit of "
        f"{att.shape[0]} validation inputs ({opts.quadrature} quadrature, {opts.nodes or 'default'} nodes, "
        f"{opts.dtype}).\n\n{exact['text']}", images, captions,
        notes=[report_text.HOW_TO_READ[Path(i).name] for i in images]))

    data_stop = traj.n_steps if opts.data_steps is None else min(traj.n_steps, int(opts.data_steps))
    say(f"data view: {opts.n_kernel} validation inputs x {ds.n_train} training samples, per step, over steps "
        f"0-{data_stop - 1} of {traj.n_steps}{_cost(opts, data_stop, min(opts.n_kernel, ds.n_val))}")
    start = time.perf_counter()
    pick = pick_kernel_inputs(ds.y_val.numpy(), opts.n_kernel)
    data_images, data_captions, data_summary = _data_view(run, pick, phases, opts, out, progress)
    timings["data_view_seconds"] = round(time.perf_counter() - start, 2)
    prefix = "" if data_stop == traj.n_steps else (
        f" Only the first {data_stop} of the {traj.n_steps} steps are split over training samples here (the cost "
        f"of this view grows with every step it covers; 'explaind report RUN --data-steps all' covers the run).")
    sections.append(viz.ReportSection(
        "Which training samples",
        f"Model and data: {setup}.{prefix} Influence of each training sample on the correct-class logit of validation "
        f"inputs, summed over steps (proponents push the logit up, opponents down), and the train × validation "
        f"influence matrix of single steps, rows and columns ordered by class"
        + (" (a + b) mod p." if modular else "."), data_images, data_captions,
        notes=[report_text.HOW_TO_READ[Path(i).name] for i in data_images]))

    if pruning_dir is not None:
        sections.append(report_text.pruning_section(pruning_dir, out))
    if validation_dir is not None:
        sections.append(report_text.validation_section(validation_dir, out))

    (out / "scores.json").write_text(json.dumps({"step_group": scores.to_dict(), "data_view": data_summary,
                                                 "phases": [vars(p) for p in phases or []],
                                                 "outcome": outcome.to_dict(),
                                                 "exactness": {k: v for k, v in exact.items() if k != "text"},
                                                 "timings": timings}, indent=1))
    meta = {"architecture": run.config.architecture, "dataset": ds.name, "steps": traj.n_steps,
            "final train acc": f"{run.history.train_acc[-1]:.3f}", "final val acc": f"{run.history.val_acc[-1]:.3f}"}
    return viz.write_report(out, sections, title=title or f"explaind report: {run.config.architecture} on {ds.name}",
                            meta=meta)


def _train_scores(run: Any, X: Any, y: Any, opts: ReportOptions, progress: bool, keep: tuple[str, ...],
                  steps: tuple[int, int] | None = None) -> Any:
    import explaind

    est = explaind.InfluenceEstimator(keep=keep, target=[int(v) for v in y], steps=steps, device=opts.device,
                                      quadrature=opts.quadrature, nodes=opts.nodes, tol=opts.tol,
                                      memory_budget=opts.memory_budget, chunk_size=opts.chunk_size,
                                      dtype=opts.dtype, progress=progress)
    return est.fit(run.trajectory).transform(X)


def _data_view(run: Any, pick: np.ndarray, phases: list[Any] | None, opts: ReportOptions, out: Path,
               progress: bool) -> tuple[list[Path], list[str], dict[str, Any]]:
    from ..kernel.budget import parse_bytes

    ds, traj = run.dataset, run.trajectory
    X, y = ds.X_val[pick], ds.y_val[pick]
    show = np.linspace(0, len(pick) - 1, min(opts.n_queries, len(pick))).round().astype(int)
    n_steps = traj.n_steps if opts.data_steps is None else min(traj.n_steps, int(opts.data_steps))
    window = None if n_steps == traj.n_steps else (0, n_steps)
    steps = _kernel_steps(n_steps, phases if window is None else None, opts.kernel_steps)
    # one sweep keeping (step, train) when it fits in a quarter of the budget, else one sweep per figure panel
    combined = len(pick) * n_steps * ds.n_train * 8 <= parse_bytes(opts.memory_budget) // 4
    per_step: list[np.ndarray] = []
    if combined:
        att = _train_scores(run, X, y, opts, progress, ("step", "train"), steps=window)
        values = att.values.detach().double().sum(-1)  # (T, S, M)
        step_coords = list(np.asarray(att.coords["step"]))
        per_step = [values[:, step_coords.index(s), :].cpu().numpy() for s in steps]
        over_steps = att.sum("step")
        tops_all = analysis.top_train_samples(over_steps, k=opts.top_k)
        tops = [tops_all[q] for q in show]
        sums = _score_sums(over_steps, show)
        gap = float(att.completeness_error())
    else:
        att = _train_scores(run, X[show], y[show], opts, progress, ("train",), steps=window)
        tops = analysis.top_train_samples(att, k=opts.top_k)
        sums = _score_sums(att, np.arange(len(show)))
        gap = float(att.completeness_error())
        for s in steps:
            single = _train_scores(run, X, y, opts, progress, ("train",), steps=(s, s + 1))
            per_step.append(single.values.detach().double().sum(-1).cpu().numpy())
    queries = []
    images = ds.name != "modular"
    for q, top, totals in zip(show, tops, sums):
        entry: dict[str, Any] = {"label": describe_sample(ds, X[q], y[q]), **totals}
        if images:
            entry["image"] = _image(X[q])
        for side in ("proponents", "opponents"):
            entry[side] = []
            for index, score in top[side]:
                Xk, yk = ds.X_train[index], ds.y_train[index]
                item = {"label": describe_sample(ds, Xk, yk) + (f" #{index}" if images else ""), "score": score}
                if images:
                    item["image"] = _image(Xk)
                entry[side].append(item)
        queries.append(entry)
    top_png = viz.top_samples(queries, out / "top_samples.png")
    matrices: list[np.ndarray] = []
    rows: list[int] = []
    cols: list[int] = []
    # rows: the training samples of the classes shown in the columns
    shown = np.isin(ds.y_train.numpy(), y.numpy())
    for scores in per_step:
        matrix, rows, cols = analysis.train_val_kernel(scores[:, shown], ds.y_train.numpy()[shown], y.numpy())
        matrices.append(matrix)
    kernel_png = viz.kernel_matrices(matrices, steps, out / "kernel_matrices.png", row_boundaries=rows,
                                     col_boundaries=cols, units="logit units",
                                     title="Train × validation influence of single steps (ordered by class)")
    summary = {"validation_indices": pick.tolist(), "kernel_steps": steps, "data_steps": [0, n_steps], "top": tops,
               "completeness_gap": gap,
               "single_sweep": combined, "score_sums": sums}
    return ([top_png, kernel_png],
            [f"Top proponents (green) and opponents (red) among the {ds.n_train} training samples, for "
             f"{len(show)} validation inputs" + ("." if window is None else f", over steps 0-{n_steps - 1}."),
             f"Influence of each training sample (rows, the {int(shown.sum())} of the shown classes) on each "
             f"validation input (columns) at steps {steps}."],
            summary)


def _score_sums(att: Any, rows: np.ndarray) -> list[dict[str, float]]:
    """Per shown input: its explained output and the sums of its positive and negative training scores."""
    scores = att.values.detach().double().sum(-1).cpu().numpy()  # (T, M)
    final = att.final.detach().double().sum(-1).cpu().numpy()  # (T,)
    return [{"value": float(final[r]), "positive_total": float(scores[r][scores[r] > 0].sum()),
             "negative_total": float(scores[r][scores[r] < 0].sum())} for r in rows]


def _image(x: Any) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        side = int(round(np.sqrt(arr.size)))
        if side * side == arr.size:
            return arr.reshape(side, side)
        if arr.size % 3 == 0:
            side = int(round(np.sqrt(arr.size // 3)))
            return arr.reshape(3, side, side)
    return arr
