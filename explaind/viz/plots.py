"""Figures of the report, drawn with matplotlib's Agg canvas (no pyplot, no global state).

Every function takes plain numpy data, writes one PNG and returns its path; nothing here knows
about trajectories or estimators, so the figures can be drawn from saved scores alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, TwoSlopeNorm
from matplotlib.figure import Figure

__all__ = [
    "group_colours",
    "training_curves",
    "step_group_heatmap",
    "balance_plot",
    "phase_influence",
    "top_samples",
    "kernel_matrices",
    "lds_bars",
]


class PhaseLike(Protocol):
    """Anything with a phase ``name`` and a step range ``[start, stop)`` (e.g. ``explaind.studies.phases.Phase``)."""

    name: str
    start: int
    stop: int


_PHASE_COLOURS = ("#f4d6a0", "#c8e0f4", "#cdebc5")
_DPI = 110


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _shade_phases(ax: Any, phases: Sequence[PhaseLike] | None, label: bool = True) -> None:
    for i, phase in enumerate(phases or ()):
        ax.axvspan(phase.start, max(phase.stop, phase.start + 1), color=_PHASE_COLOURS[i % 3], alpha=0.5, lw=0,
                   label=phase.name if label else None)


def training_curves(history: Any, path: str | Path, *, phases: Sequence[PhaseLike] | None = None,
                    title: str = "Training curves") -> Path:
    """Train/validation accuracy and loss over optimizer steps (the grokking curve).

    Parameters
    ----------
    history : explaind.studies.phases.History
        Columns ``step``, ``train_acc``, ``val_acc``, ``train_loss``, ``val_loss``.
    path : str or Path
        Output PNG.
    phases : sequence of Phase, optional
        Shaded behind the curves and named in the legend.
    """
    steps = np.asarray(history.step)
    fig = _figure(10, 3.8)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for ax in (ax_acc, ax_loss):
        _shade_phases(ax, phases, label=ax is ax_acc)
    ax_acc.plot(steps, history.train_acc, color="#1f77b4", label="train")
    ax_acc.plot(steps, history.val_acc, color="#d62728", label="validation")
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy", ylim=(-0.02, 1.02), title="Accuracy")
    ax_acc.legend(loc="lower right", fontsize=8)
    ax_loss.plot(steps, np.maximum(history.train_loss, 1e-12), color="#1f77b4", label="train")
    ax_loss.plot(steps, np.maximum(history.val_loss, 1e-12), color="#d62728", label="validation")
    ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy", yscale="log", title="Loss")
    ax_loss.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def step_group_heatmap(steps: np.ndarray, groups: Sequence[str], values: np.ndarray, path: str | Path, *,
                       phases: Sequence[PhaseLike] | None = None,
                       title: str = "Absolute influence on the validation set", units: str = "logit units") -> Path:
    """Heatmap of a (step, group) score matrix, steps along x and parameter groups along y.

    Parameters
    ----------
    steps : ndarray, shape (S,)
        Optimizer step of each column (the first step of its bin when steps are binned).
    groups : sequence of str, length G
    values : ndarray, shape (S, G)
        Non-negative scores; drawn on a logarithmic colour scale.
    phases : sequence of Phase, optional
        Boundaries drawn as dashed vertical lines, each phase named above the axes.
    title : str
    units : str
        Unit of the scores, shown on the colour bar.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(steps), len(groups)):
        raise ValueError(f"values has shape {values.shape}; expected (len(steps), len(groups)) = "
                         f"({len(steps)}, {len(groups)}).")
    fig = _figure(10, 0.9 + 0.32 * len(groups))
    ax = fig.subplots()
    positive = values[values > 0]
    norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-6), vmax=positive.max()) if positive.size else None
    edges = np.append(np.asarray(steps, dtype=np.float64), steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1))
    mesh = ax.pcolormesh(edges, np.arange(len(groups) + 1), np.where(values > 0, values, np.nan).T, norm=norm,
                         cmap="viridis", shading="flat")
    ax.set_yticks(np.arange(len(groups)) + 0.5, labels=list(groups), fontsize=7)
    ax.invert_yaxis()
    _label_phases(ax, phases)
    ax.set_xlabel("optimizer step")
    ax.set_title(title, pad=26 if phases else 6)
    fig.colorbar(mesh, ax=ax, label=f"|influence| ({units})", pad=0.01)
    return _save(fig, path)


def _label_phases(ax: Any, phases: Sequence[PhaseLike] | None) -> None:
    """Dashed boundaries between phases and each phase's name above the axes."""
    from matplotlib.transforms import blended_transform_factory

    on_top = blended_transform_factory(ax.transData, ax.transAxes)
    for i, phase in enumerate(phases or ()):
        if i:
            ax.axvline(phase.start, color="white", lw=1.2, ls="--")
        # alternate two rows of names so that the names of short neighbouring phases do not overlap
        ax.text((phase.start + phase.stop) / 2, 1.01 + 0.07 * (i % 2), phase.name, transform=on_top, ha="center",
                va="bottom", fontsize=7, color="#333333", clip_on=False)


def balance_plot(steps: np.ndarray, groups: Sequence[str], kernel: np.ndarray, regularization: np.ndarray,
                 path: str | Path, *, phases: Sequence[PhaseLike] | None = None,
                 title: str = "Kernel (data) versus regularization per layer group",
                 units: str = "logit units") -> Path:
    """Share of the data (kernel) part in each group's update contribution over training.

    Parameters
    ----------
    steps : ndarray, shape (S,)
    groups : sequence of str, length G
    kernel, regularization : ndarray, shape (S, G)
        Magnitudes of the data part and of the weight-decay part of each step's contribution.
        The left panel shows ``|K| / (|K| + |R|)``, the right panel both magnitudes.
    phases : sequence of Phase, optional
        Shaded behind the curves.
    title, units : str
        Figure title; unit of the magnitudes (right panel).

    Each group has its own colour (:func:`group_colours`), the same in both panels.
    """
    kernel = np.abs(np.asarray(kernel, dtype=np.float64))
    reg = np.abs(np.asarray(regularization, dtype=np.float64))
    if kernel.shape != reg.shape or kernel.shape != (len(steps), len(groups)):
        raise ValueError(f"kernel {kernel.shape} and regularization {reg.shape} must both have shape "
                         f"(len(steps), len(groups)) = ({len(steps)}, {len(groups)}).")
    fig = _figure(11, 4.2)
    ax_share, ax_abs = fig.subplots(1, 2)
    colours = group_colours(len(groups))
    share = kernel / np.maximum(kernel + reg, np.finfo(np.float64).tiny)
    for ax in (ax_share, ax_abs):
        _shade_phases(ax, phases, label=False)
    for g, name in enumerate(groups):
        ax_share.plot(steps, share[:, g], color=colours[g], lw=1.2, label=name)
        ax_abs.plot(steps, np.maximum(kernel[:, g], 1e-30), color=colours[g], lw=1.2)
        ax_abs.plot(steps, np.maximum(reg[:, g], 1e-30), color=colours[g], lw=1.0, ls=":")
    ax_share.set(xlabel="optimizer step", ylabel="|kernel| / (|kernel| + |regularization|)", ylim=(-0.02, 1.02),
                 title="Data share of each group's contribution")
    ax_abs.set(xlabel="optimizer step", ylabel=f"magnitude ({units})", yscale="log",
               title="kernel (solid) and regularization (dotted)")
    ax_share.legend(fontsize=6, ncol=2, loc="best", title="parameter tensor", title_fontsize=6)
    from matplotlib.lines import Line2D

    styles = [Line2D([], [], color="#444444", lw=1.2, label="kernel (data) part"),
              Line2D([], [], color="#444444", lw=1.0, ls=":", label="regularization part")]
    ax_abs.legend(handles=styles, fontsize=7, loc="best", title="line style; colours as left",
                  title_fontsize=6)
    fig.suptitle(title)
    return _save(fig, path)


def phase_influence(groups: Sequence[str], phase_names: Sequence[str], values: np.ndarray, path: str | Path, *,
                    phase_steps: Sequence[int] | None = None, units: str = "logit units",
                    title: str = "Layer-group influence per training phase (per step)") -> Path:
    """Grouped bars: for each phase, the influence per step carried by each layer group.

    Parameters
    ----------
    groups : sequence of str, length G
    phase_names : sequence of str, length P
    values : ndarray, shape (P, G)
        Non-negative influence of group ``g`` **per step** of phase ``p`` (the phase's sum divided
        by its number of steps, so that long and short phases compare). The left panel normalises
        each phase to sum to 1 (where the influence sits); the right one shows the per-step total
        of each phase (how much influence one step of the phase carries).
    path : str or Path
        Output PNG.
    phase_steps : sequence of int, optional
        Number of steps of each phase, shown under its bar.
    units, title : str
        Unit of the scores; figure title.
    """
    values = np.abs(np.asarray(values, dtype=np.float64))
    if values.shape != (len(phase_names), len(groups)):
        raise ValueError(f"values has shape {values.shape}; expected ({len(phase_names)}, {len(groups)}).")
    if phase_steps is not None and len(phase_steps) != len(phase_names):
        raise ValueError(f"Got {len(phase_steps)} phase lengths for {len(phase_names)} phases.")
    totals = values.sum(axis=1, keepdims=True)
    shares = values / np.maximum(totals, np.finfo(np.float64).tiny)
    fig = _figure(11, 4.2)
    ax, ax_tot = fig.subplots(1, 2, width_ratios=(3, 1))
    width = 0.8 / max(len(phase_names), 1)
    x = np.arange(len(groups))
    for p, name in enumerate(phase_names):
        ax.bar(x + (p - (len(phase_names) - 1) / 2) * width, shares[p], width, color=_PHASE_COLOURS[p % 3],
               edgecolor="#444444", lw=0.5, label=name)
    ax.set_xticks(x, labels=list(groups), rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="share of the phase's |influence| per step", title="Where the influence sits (shares)")
    ax.legend(fontsize=8, loc="best", title="phase", title_fontsize=7)
    colours = [_PHASE_COLOURS[i % 3] for i in range(len(phase_names))]
    labels = [name if phase_steps is None else f"{name}\n({phase_steps[i]} steps)"
              for i, name in enumerate(phase_names)]
    bars = ax_tot.bar(np.arange(len(phase_names)), totals[:, 0], color=colours, edgecolor="#444444", lw=0.5)
    for bar, name in zip(bars, phase_names):
        bar.set_label(name)
    ax_tot.set_xticks(np.arange(len(phase_names)), labels=labels, rotation=30, ha="right", fontsize=7)
    ax_tot.set(ylabel=f"|influence| per step ({units})", title="How much per step",
               yscale="log" if totals.min() > 0 and totals.max() > 100 * totals.min() else "linear")
    ax_tot.legend(fontsize=7, loc="best", title="phase", title_fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def top_samples(queries: Sequence[Mapping[str, Any]], path: str | Path, *,
                title: str = "Top proponents and opponents in the training set",
                units: str = "logit units") -> Path:
    """For a few validation inputs, the training samples that pushed their prediction most.

    Parameters
    ----------
    queries : sequence of mapping
        Each has ``"label"`` (str), optionally ``"image"`` (2-D or CHW array), and
        ``"proponents"`` / ``"opponents"``: sequences of mappings with ``"label"``, ``"score"`` and
        optionally ``"image"``. A query may also give ``"value"`` (the explained output, e.g. its
        correct-class logit) and ``"positive_total"`` / ``"negative_total"`` (the sums of all
        positive and all negative training-sample scores): they are printed in the query's cell,
        so that the reader sees the scale of the scores against the output and how much of them
        cancels.
    path : str or Path
        Output PNG.
    title, units : str
        Figure title; unit of the scores (named under the figure).
    """
    if not queries:
        raise ValueError("top_samples needs at least one query.")
    k = max(max(len(q["proponents"]), len(q["opponents"])) for q in queries)
    cols = 1 + 2 * k
    with_images = "image" in queries[0]
    fig = _figure(max(1.35 * cols, 7.0), (1.6 if with_images else 0.75) * len(queries) + 0.9)
    axes = np.atleast_2d(fig.subplots(len(queries), cols, squeeze=False))
    for r, query in enumerate(queries):
        cells = [(query, "query", "#222222")]
        cells += [(s, "pro", "#1a7f37") for s in query["proponents"]] + [None] * (k - len(query["proponents"]))
        cells += [(s, "con", "#b42318") for s in query["opponents"]] + [None] * (k - len(query["opponents"]))
        for c, cell in enumerate(cells):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if cell is None:
                ax.axis("off")
                continue
            item, kind, colour = cell
            caption = _query_caption(item) if kind == "query" else f"{item['label']}\n{item['score']:+.3g}"
            if with_images and "image" in item:
                image = np.asarray(item["image"], dtype=np.float64)
                image = np.moveaxis(image, 0, -1) if image.ndim == 3 and image.shape[0] in (1, 3) else image
                ax.imshow(image.squeeze(), cmap="gray_r" if image.squeeze().ndim == 2 else None)
                ax.set_title(caption, fontsize=7, color=colour)
            else:
                ax.text(0.5, 0.5, caption, ha="center", va="center", fontsize=8, color=colour,
                        transform=ax.transAxes)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(1.5 if kind == "query" else 0.8)
    axes[0, 0].set_title(axes[0, 0].get_title() or "validation input", fontsize=8)
    if k:
        axes[0, 1].annotate("proponents →", (0, 1.25), xycoords="axes fraction", fontsize=8, color="#1a7f37")
        axes[0, 1 + k].annotate("opponents →", (0, 1.25), xycoords="axes fraction", fontsize=8, color="#b42318")
    fig.suptitle(title)
    fig.supxlabel(f"score = the training sample's contribution to the explained output, summed over steps "
                  f"({units}); Σ+ / Σ− = sums of all positive / negative scores", fontsize=7)
    return _save(fig, path)


def _query_caption(query: Mapping[str, Any]) -> str:
    lines = [str(query["label"])]
    if "value" in query:
        lines.append(f"output {float(query['value']):.3g}")
    if "positive_total" in query and "negative_total" in query:
        lines.append(f"Σ+ {float(query['positive_total']):+.3g}  Σ− {float(query['negative_total']):+.3g}")
    return "\n".join(lines)


def kernel_matrices(matrices: Sequence[np.ndarray], steps: Sequence[int], path: str | Path, *,
                    row_boundaries: Sequence[int] = (), col_boundaries: Sequence[int] = (),
                    xlabel: str = "validation input", ylabel: str = "training sample",
                    title: str = "Train × validation kernel", units: str = "logit units") -> Path:
    """Side-by-side (train × validation) matrices at a few training steps, on one colour scale.

    Parameters
    ----------
    matrices : sequence of ndarray, each (n_train, n_val)
        Already ordered (e.g. by ``(a + b) mod p``). All panels share one symmetric colour scale
        (the largest magnitude of any panel) and one colour bar, so that they compare.
    steps : sequence of int
        The step (or step window start) of each panel, used in the titles.
    path : str or Path
        Output PNG.
    row_boundaries, col_boundaries : sequence of int
        Row / column positions where the ordering key changes, drawn as thin lines (only when
        there are at most 40 of them; more would hide the matrix).
    xlabel, ylabel, title, units : str
        Axis labels (on every panel), figure title and the unit named on the colour bar.
    """
    if len(matrices) != len(steps) or not matrices:
        raise ValueError(f"Got {len(matrices)} matrices for {len(steps)} steps; give one step per matrix (>= 1).")
    arrays = [np.asarray(mat, dtype=np.float64) for mat in matrices]
    scale = max(float(np.max(np.abs(mat))) if mat.size else 0.0 for mat in arrays) or 1.0
    norm = TwoSlopeNorm(0.0, -scale, scale)
    fig = _figure(3.6 * len(arrays) + 1.0, 3.9)
    axes = np.atleast_1d(fig.subplots(1, len(arrays), squeeze=False)[0])
    image = None
    for ax, mat, step in zip(axes, arrays, steps):
        image = ax.imshow(mat, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        for b in row_boundaries if len(row_boundaries) <= 40 else ():
            ax.axhline(b - 0.5, color="#555555", lw=0.3)
        for b in col_boundaries if len(col_boundaries) <= 40 else ():
            ax.axvline(b - 0.5, color="#555555", lw=0.3)
        ax.set(title=f"step {step}", xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(image, ax=list(axes), shrink=0.85, label=f"influence ({units}); one scale for all panels")
    fig.suptitle(title)
    return _save(fig, path)


def lds_bars(lds: Mapping[str, Mapping[float, tuple[float, float]]], fractions: Sequence[float], path: str | Path, *,
             title: str = "LDS") -> Path:
    """Grouped bars of the linear datamodeling score: one group per subset fraction, one bar per method.

    Parameters
    ----------
    lds : mapping
        ``lds[method][fraction] = (mean, std)``; the std is drawn as an error bar.
    fractions : sequence of float
        Fractions shown, in order.
    path : str or Path
        Output PNG.
    title : str
    """
    methods = list(lds)
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(methods))
    colours = group_colours(len(methods))
    x = np.arange(len(fractions))
    for i, method in enumerate(methods):
        means = np.array([lds[method][f][0] for f in fractions], dtype=float)
        stds = np.array([lds[method][f][1] for f in fractions], dtype=float)
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2, color=colours[i],
               label=method)
    ax.axhline(0.0, color="#444", lw=0.8)
    ax.set_xticks(x, [f"{100 * f:g}% kept" for f in fractions])
    ax.set_ylabel("LDS (Spearman)")
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.0)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the bars
    return _save(fig, path)


def group_colours(n: int) -> list[Any]:
    """``n`` pairwise different colours: matplotlib's ``tab20`` up to 20, evenly spaced hues beyond.

    Parameters
    ----------
    n : int
        Number of colours.

    Returns
    -------
    list
        RGBA tuples, one per group, no two equal.
    """
    from matplotlib import colormaps

    if n <= 20:
        table = colormaps["tab20"]
        # the saturated shades first (even indices), then the light ones
        return [table((2 * i) % 20 + (2 * i) // 20) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]
