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
    "training_curves",
    "step_group_heatmap",
    "balance_plot",
    "phase_influence",
    "top_samples",
    "kernel_matrices",
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
                       title: str = "Absolute influence on the validation set") -> Path:
    """Heatmap of a (step, group) score matrix, steps along x and parameter groups along y.

    Parameters
    ----------
    steps : ndarray, shape (S,)
        Optimizer step of each column (the first step of its bin when steps are binned).
    groups : sequence of str, length G
    values : ndarray, shape (S, G)
        Non-negative scores; drawn on a logarithmic colour scale.
    phases : sequence of Phase, optional
        Boundaries drawn as vertical lines.
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
    for phase in (phases or ())[1:]:
        ax.axvline(phase.start, color="white", lw=1.2, ls="--")
    ax.set(xlabel="optimizer step", title=title)
    fig.colorbar(mesh, ax=ax, label="|influence|", pad=0.01)
    return _save(fig, path)


def balance_plot(steps: np.ndarray, groups: Sequence[str], kernel: np.ndarray, regularization: np.ndarray,
                 path: str | Path, *, phases: Sequence[PhaseLike] | None = None,
                 title: str = "Kernel (data) versus regularization per layer group") -> Path:
    """Share of the data (kernel) part in each group's update contribution over training.

    Parameters
    ----------
    steps : ndarray, shape (S,)
    groups : sequence of str, length G
    kernel, regularization : ndarray, shape (S, G)
        Magnitudes of the data part and of the weight-decay part of each step's contribution.
        The left panel shows ``|K| / (|K| + |R|)``, the right panel both magnitudes.
    """
    kernel = np.abs(np.asarray(kernel, dtype=np.float64))
    reg = np.abs(np.asarray(regularization, dtype=np.float64))
    if kernel.shape != reg.shape or kernel.shape != (len(steps), len(groups)):
        raise ValueError(f"kernel {kernel.shape} and regularization {reg.shape} must both have shape "
                         f"(len(steps), len(groups)) = ({len(steps)}, {len(groups)}).")
    fig = _figure(11, 4.2)
    ax_share, ax_abs = fig.subplots(1, 2)
    colours = [_colour(i) for i in range(len(groups))]
    share = kernel / np.maximum(kernel + reg, np.finfo(np.float64).tiny)
    for ax in (ax_share, ax_abs):
        _shade_phases(ax, phases, label=False)
    for g, name in enumerate(groups):
        ax_share.plot(steps, share[:, g], color=colours[g], lw=1.2, label=name)
        ax_abs.plot(steps, np.maximum(kernel[:, g], 1e-30), color=colours[g], lw=1.2)
        ax_abs.plot(steps, np.maximum(reg[:, g], 1e-30), color=colours[g], lw=1.0, ls=":")
    ax_share.set(xlabel="optimizer step", ylabel="|kernel| / (|kernel| + |regularization|)", ylim=(-0.02, 1.02),
                 title="Data share of each group's contribution")
    ax_abs.set(xlabel="optimizer step", ylabel="magnitude", yscale="log",
               title="kernel (solid) and regularization (dotted)")
    ax_share.legend(fontsize=6, ncol=2, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


def phase_influence(groups: Sequence[str], phase_names: Sequence[str], values: np.ndarray, path: str | Path, *,
                    title: str = "Layer-group influence per training phase") -> Path:
    """Grouped bars: for each phase, the share of absolute influence carried by each layer group.

    Parameters
    ----------
    values : ndarray, shape (P, G)
        Non-negative influence of group ``g`` summed over the steps of phase ``p``. Each phase is
        normalised to sum to 1 (left) and the absolute totals are shown on the right.
    """
    values = np.abs(np.asarray(values, dtype=np.float64))
    if values.shape != (len(phase_names), len(groups)):
        raise ValueError(f"values has shape {values.shape}; expected ({len(phase_names)}, {len(groups)}).")
    totals = values.sum(axis=1, keepdims=True)
    shares = values / np.maximum(totals, np.finfo(np.float64).tiny)
    fig = _figure(11, 4.0)
    ax, ax_tot = fig.subplots(1, 2, width_ratios=(3, 1))
    width = 0.8 / max(len(phase_names), 1)
    x = np.arange(len(groups))
    for p, name in enumerate(phase_names):
        ax.bar(x + (p - (len(phase_names) - 1) / 2) * width, shares[p], width, color=_PHASE_COLOURS[p % 3],
               edgecolor="#444444", lw=0.5, label=name)
    ax.set_xticks(x, labels=list(groups), rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="share of the phase's |influence|", title="Where the influence sits")
    ax.legend(fontsize=8, loc="best")
    colours = [_PHASE_COLOURS[i % 3] for i in range(len(phase_names))]
    ax_tot.bar(np.arange(len(phase_names)), totals[:, 0], color=colours, edgecolor="#444444", lw=0.5)
    ax_tot.set_xticks(np.arange(len(phase_names)), labels=list(phase_names), rotation=30, ha="right", fontsize=8)
    ax_tot.set(ylabel="total |influence|", title="How much", yscale="log" if totals.min() > 0 else "linear")
    fig.suptitle(title)
    return _save(fig, path)


def top_samples(queries: Sequence[Mapping[str, Any]], path: str | Path, *,
                title: str = "Top proponents and opponents in the training set") -> Path:
    """For a few validation inputs, the training samples that pushed their prediction most.

    Parameters
    ----------
    queries : sequence of mapping
        Each has ``"label"`` (str), optionally ``"image"`` (2-D or CHW array), and
        ``"proponents"`` / ``"opponents"``: sequences of mappings with ``"label"``, ``"score"`` and
        optionally ``"image"``.
    """
    if not queries:
        raise ValueError("top_samples needs at least one query.")
    k = max(max(len(q["proponents"]), len(q["opponents"])) for q in queries)
    cols = 1 + 2 * k
    with_images = "image" in queries[0]
    fig = _figure(1.35 * cols, (1.6 if with_images else 0.55) * len(queries) + 0.6)
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
            caption = item["label"] if kind == "query" else f"{item['label']}\n{item['score']:+.2g}"
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
    return _save(fig, path)


def kernel_matrices(matrices: Sequence[np.ndarray], steps: Sequence[int], path: str | Path, *,
                    row_boundaries: Sequence[int] = (), col_boundaries: Sequence[int] = (),
                    xlabel: str = "validation input",
                    ylabel: str = "training sample", title: str = "Train × validation kernel") -> Path:
    """Side-by-side (train × validation) matrices at a few training steps.

    Parameters
    ----------
    matrices : sequence of ndarray, each (n_train, n_val)
        Already ordered (e.g. by ``(a + b) mod p``); drawn on a symmetric colour scale per panel.
    steps : sequence of int
        The step (or step window start) of each panel, used in the titles.
    row_boundaries, col_boundaries : sequence of int
        Row / column positions where the ordering key changes, drawn as thin lines (only when
        there are at most 40 of them; more would hide the matrix).
    """
    if len(matrices) != len(steps) or not matrices:
        raise ValueError(f"Got {len(matrices)} matrices for {len(steps)} steps; give one step per matrix (>= 1).")
    fig = _figure(3.6 * len(matrices) + 0.6, 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(matrices), squeeze=False)[0])
    for ax, mat, step in zip(axes, matrices, steps):
        mat = np.asarray(mat, dtype=np.float64)
        scale = float(np.max(np.abs(mat))) or 1.0
        image = ax.imshow(mat, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -scale, scale), aspect="auto",
                          interpolation="nearest")
        for b in row_boundaries if len(row_boundaries) <= 40 else ():
            ax.axhline(b - 0.5, color="#555555", lw=0.3)
        for b in col_boundaries if len(col_boundaries) <= 40 else ():
            ax.axvline(b - 0.5, color="#555555", lw=0.3)
        ax.set(title=f"step {step}", xlabel=xlabel, ylabel=ylabel if ax is axes[0] else None)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title)
    return _save(fig, path)


def _colour(i: int) -> str:
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf")
    return palette[i % len(palette)]
