"""The words of the report: what each section is about, how to read each figure, how exact it is.

:func:`build_report <explaind.studies.report.build_report>` draws the figures; this module
writes what the page says about them, from the run and the attribution themselves (nothing
here is typed in advance):

* :func:`describe_setup` — the model, the optimizer and the data of a run, in one sentence;
* :func:`exactness_note` — the completeness gap and the quadrature error of a query, and what
  they mean for the figures drawn from it;
* :func:`pruning_section` — the pruning benchmark's figure, its table (as rows of an HTML
  table) and the model and data it was measured on;
* :func:`validation_section` — the validation benchmark's LDS bars and tables (``explaind validate --out DIR``);
* :data:`HOW_TO_READ` — the "how to read this" note under each figure.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .. import viz
from ..exceptions import ConfigError

__all__ = ["HOW_TO_READ", "describe_setup", "exactness_note", "pruning_section", "validation_section"]

#: figure file -> the note shown under it
HOW_TO_READ: dict[str, str] = {
    "training_curves.png": (
        "Blue is the training set, red the validation set; accuracy left, cross-entropy (log scale) right. "
        "Shaded bands are the detected phases (only drawn when the run generalised). Grokking shows as a long "
        "gap between the step where the blue accuracy reaches 1 and the step where the red one does."),
    "step_group_influence.png": (
        "One row per parameter tensor, one column per optimizer step. The colour is the absolute influence of "
        "that tensor's update at that step on the correct-class logit, summed over the validation inputs "
        "(log colour scale, logit units). Bright columns are steps that moved the predictions; dashed lines "
        "and the names above the plot mark the phases."),
    "kernel_vs_regularization.png": (
        "Left: the share of each tensor's update that comes from the data (the kernel part) rather than from "
        "weight decay; 1 means all data, 0 all weight decay. Right: both magnitudes on a log scale, solid for "
        "the data part and dotted for weight decay, one colour per tensor (the same in both panels)."),
    "phase_influence.png": (
        "Every bar is divided by the number of steps of its phase, so phases of different length compare. "
        "Left: within a phase, which tensors carry the influence (the bars of one colour add up to 1). Right: "
        "how much influence one step of each phase carries in total (logit units)."),
    "top_samples.png": (
        "Each row is one validation input, its correct-class logit ('output') and the sums of all positive "
        "(Σ+) and all negative (Σ−) training-sample scores. Then the training samples with the largest "
        "positive scores (proponents, green) and the most negative ones (opponents, red), scores in logit "
        "units summed over steps. When Σ+ and Σ− are much larger than the logit, the individual scores "
        "mostly cancel: a large score alone does not mean a large net effect."),
    "kernel_matrices.png": (
        "Rows are training samples, columns validation inputs, both ordered by their class (a + b) mod p; "
        "thin lines separate the classes. Red: the training sample's gradient step raised the validation "
        "input's correct-class logit at that step, blue: lowered it. All panels share one colour scale, so "
        "a paler panel is a step with less influence."),
    "pruning_curve.png": (
        "Left: test accuracy after removing weights by each criterion (no retraining), against the fraction "
        "of weights kept (log scale, fewer weights to the right); the dashed line is the unpruned model. "
        "Right: KL divergence from the unpruned model's predictions (lower is better)."),
    "validation": (
        "One group of bars per subset size, one bar per method: the Spearman correlation, across random "
        "training subsets, between the output the method predicts for the subset and the output of actually "
        "retraining on it (1: the method ranks the subsets exactly as retraining does; 0: no better than "
        "chance). Error bars: bootstrap std over seeds and test points."),
}


def describe_setup(run: Any) -> str:
    """One sentence naming the model, its size, the optimizer and the data of a run.

    Parameters
    ----------
    run : explaind.studies.runs.Run

    Returns
    -------
    str
        E.g. ``"modular_transformer (d_model 48, ...; 5,000 parameters) trained with adamw
        (lr 0.01, weight decay 1, full batch) on modular (p = 23): 317 training and 212
        validation samples"``.
    """
    cfg, ds = run.config, run.dataset
    shown = {k: v for k, v in run.model_config.items() if k in ("d_model", "n_heads", "d_mlp", "hidden_sizes",
                                                                 "channels", "activation")}
    model = ", ".join(f"{k} {v}" for k, v in shown.items())
    n_params = run.info.get("n_params")
    size = f"; {n_params:,} parameters" if n_params else ""
    batch = "full batch" if cfg.batch_size is None else f"batches of {cfg.batch_size}"
    data = f"{ds.name} (p = {ds.meta['p']}, targets (a + b) mod p)" if ds.name == "modular" else ds.name
    return (f"{cfg.architecture} ({model}{size}) trained with {cfg.optimizer} (lr {cfg.lr:g}, weight decay "
            f"{cfg.weight_decay:g}, {batch}) on {data}: {ds.n_train} training and {ds.n_val} validation samples")


def exactness_note(att: Any, *, quadrature: str, nodes: int | None, dtype: str) -> dict[str, Any]:
    """The completeness gap and the quadrature error of a ``keep=("step", "group")`` query, explained.

    Parameters
    ----------
    att : explaind.Attribution
        The query behind the step × group figures.
    quadrature, nodes, dtype
        The rule and dtype of the query (named in the text).

    Returns
    -------
    dict
        ``text`` (a paragraph for the page) and the numbers in it: ``completeness_gap``,
        ``quadrature_error`` (the largest over inputs of the quadrature error summed over steps,
        in the units of the output), ``output`` (that input's explained output),
        ``drawn`` (that input's absolute influence summed over the drawn cells) and the ratios
        ``relative_to_output`` and ``relative_to_drawn``.
    """
    gap = float(att.completeness_error())
    quad = att.quadrature_error.detach().double().abs()
    per_input = quad.reshape(quad.shape[0], -1).sum(1) if quad.dim() > 1 else quad
    worst = int(per_input.argmax())
    q = float(per_input[worst])
    output = float(att.final[worst].detach().double().abs().max())
    drawn = float(att.values[worst].detach().double().abs().sum())
    tiny = 1e-300
    rel_out, rel_drawn = q / max(output, tiny), q / max(drawn, tiny)
    rule = f"{quadrature} rule with {nodes} nodes per step" if nodes else f"{quadrature} rule"
    text = (
        f"How exact these figures are. The scores are additive: for every input, the initial logit plus all "
        f"(step, tensor) data parts, the weight-decay parts, the residual and the quadrature error equal the "
        f"trained model's logit; the largest relative mismatch is {gap:.1e}, rounding in {dtype}. The "
        f"quadrature error is the part of a step's change that the {rule} did not assign to a parameter "
        f"tensor: it is measured exactly per step and input (from the known values of the model before and "
        f"after the step) and kept as a term of its own, so the figures do not contain it. For the worst input "
        f"it adds up to {q:.3g} logit units over all steps, {rel_out:.1%} of that input's logit ({output:.3g}) "
        f"and {rel_drawn:.2%} of the absolute influence drawn for it; single cells of the figures are accurate "
        f"to about that share. 'explaind report --quadrature adaptive' makes it smaller at a few times the cost.")
    return {"text": text, "completeness_gap": gap, "quadrature_error": q, "output": output, "drawn": drawn,
            "relative_to_output": rel_out, "relative_to_drawn": rel_drawn}


def pruning_section(pruning_dir: str | Path, out: Path) -> viz.ReportSection:
    """The report section of a pruning benchmark folder (``explaind prune --out DIR``).

    Parameters
    ----------
    pruning_dir : str or Path
        Holds ``pruning.png`` and ``results.json``.
    out : Path
        Report folder; the figure is copied there as ``pruning_curve.png``.

    Raises
    ------
    ConfigError
        When ``pruning.png`` or ``results.json`` is missing.
    """
    from ..pruning import PruningBenchmarkResult

    folder = Path(pruning_dir)
    plot, results = folder / "pruning.png", folder / "results.json"
    for needed in (plot, results):
        if not needed.is_file():
            raise ConfigError(f"No {needed.name} in {str(folder)!r}; run 'explaind prune --out {folder}' first.")
    result = PruningBenchmarkResult.from_json(results)
    copy = out / "pruning_curve.png"
    shutil.copyfile(plot, copy)
    cfg = result.config
    widths = cfg.get("hidden_sizes") if cfg.get("architecture") == "mlp" else cfg.get("channels")
    seeds = cfg.get("seeds") or sorted({int(r["seed"]) for r in result.rows})
    model = (f"a digits {cfg.get('architecture', 'model')} (widths {widths}) trained with SGD (lr {cfg.get('lr')}, "
             f"momentum {cfg.get('momentum')}, {cfg.get('epochs')} epochs) on {cfg.get('dataset', 'digits')}, "
             f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})")
    rows = [{"sparsity": e["sparsity"], "strategy": e["strategy"], "accuracy (mean)": e["accuracy_mean"],
             "accuracy (std)": e["accuracy_std"], "KL (mean)": e["kl_mean"]}
            for e in sorted(result.summary(), key=lambda e: (e["sparsity"], e["strategy"]))]
    base = [float(b["accuracy"]) for b in result.baseline]
    unpruned = f" The unpruned model's test accuracy is {sum(base) / len(base):.4f}." if base else ""
    text = (f"This section is about a different model from the rest of the page: {model}. Its weights are removed "
            f"by each criterion (the ExPLAIND scores of its own recorded run among them) without retraining; the "
            f"table lists the test accuracy and the KL divergence from the unpruned model." + unpruned
            + (" With one seed there is no spread: the std column is 0." if len(seeds) == 1 else ""))
    return viz.ReportSection("Pruning (a digits model)", text, [copy],
                             [f"Pruning without retraining: {model}."], table=rows,
                             notes=[HOW_TO_READ["pruning_curve.png"]])


def validation_section(validation_dir: str | Path, out: Path) -> viz.ReportSection:
    """The report section of a validation benchmark folder (``explaind validate --out DIR``).

    Parameters
    ----------
    validation_dir : str or Path
        Holds ``validation_<activation>.json`` (``validation_<setting>_<activation>.json`` for the settings
        beyond the SGD MLP) and, for each, the ``.png`` of the same name (drawn from the JSON when missing).
    out : Path
        Report folder; the figures are copied there.

    Raises
    ------
    ConfigError
        When the folder holds no ``validation_*.json``.
    """
    from ..validation import ValidationResult
    from ..validation.settings import describe

    folder = Path(validation_dir)
    results = sorted(folder.glob("validation_*.json"))
    if not results:
        raise ConfigError(f"No validation_*.json in {str(folder)!r}; run 'explaind validate --out {folder}' first.")
    rows: list[dict[str, Any]] = []
    images, captions, removal = [], [], []
    for path in results:
        result = ValidationResult.from_json(path)
        c = result.config
        name = path.stem
        plot = folder / f"{name}.png"
        copy = out / f"{name}.png"
        if plot.is_file():
            shutil.copyfile(plot, copy)
        else:
            result.plot(copy)
        images.append(copy)
        setting = c.get("setting", "sgd_mlp")
        label = c["activation"] if setting == "sgd_mlp" else f"{setting} ({c['activation']})"
        run = (f"digits {c['n_train']} train / {c['n_test']} test, MLP 64-{c['hidden']}-10, {c['n_steps']} SGD steps"
               if setting == "sgd_mlp" else describe(c))
        captions.append(f"LDS of each method, {label}: {run}, M = {c['n_subsets']} subsets per fraction, "
                        f"{c['seeds']} seed(s).")
        for method, by_fraction in result.lds.items():
            row: dict[str, Any] = {"activation": label, "method": method,
                                   "score time (s)": round(float(result.seconds[method]), 2)}
            for fraction, (mean, std) in by_fraction.items():
                row[f"LDS {100 * fraction:g}%"] = f"{mean:+.3f} ± {std:.3f}"
            # against leave-out retraining (--leave-out), beside the weighted columns
            for fraction, (mean, std) in result.lds_leave_out.get(method, {}).items():
                row[f"left out: LDS {100 * fraction:g}%"] = f"{mean:+.3f} ± {std:.3f}"
            rows.append(row)
        for method, package in result.unavailable.items():
            rows.append({"activation": label, "method": method,
                         "score time (s)": f"not installed ({package})"})
        removal += [f"{label}, {method}: removing each test point's top-{c['top_k']} proponents lowered "
                    f"its logit for {100 * r['fraction_lowered']:.1f}% of test points (mean change "
                    f"{r['mean_change']:+.3f}, first-order prediction {r['mean_predicted_change']:+.3f})"
                    for method, r in result.removal.items()]
        removal += [f"{label}, {method}, removed samples left out of their batches: its top-{c['top_k']} lowered "
                    f"the logit for {100 * r['fraction_lowered']:.1f}% of test points (mean change "
                    f"{r['mean_change']:+.3f})" for method, r in result.removal_leave_out.items()]
    columns = list(dict.fromkeys(key for row in rows for key in row))  # every row gets every column
    rows = [{key: row.get(key, "—") for key in columns} for row in rows]
    text = ("This section is about a separate benchmark model, not the run above: small digits MLPs retrained on "
            "random subsets of their training set (docs/scores_meaning.md; the other settings: its 'Beyond SGD on an "
            "MLP'). Each method's scores predict the retrained true-class logit (the contrastive setting: the "
            "similarity of a test digit's two views); the table gives the linear datamodeling score (LDS, mean ± "
            "bootstrap std); 'left out' columns, where measured (--leave-out), give it against retraining with the "
            "removed samples taken out of their batches. "
            "The counterfactual predicts retraining; the ExPLAIND decomposition accounts for the recorded run "
            "and is not a removal prediction.\n\n" + "; ".join(removal) + ".")
    return viz.ReportSection("Validation against retraining", text, images, captions, table=rows,
                             notes=[HOW_TO_READ["validation"]] * len(images))
