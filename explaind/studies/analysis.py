"""Influence queries on a recorded run, in the shapes the command line and the report need.

* :func:`influence` — an :class:`~explaind.InfluenceEstimator` query on the run's validation set
  with a target chosen by name (``label``, ``predicted``, ``all``, ``loss``);
* :func:`save_attribution` — the result as ``attribution.safetensors`` + ``.json`` and a
  long-format ``scores.csv``;
* :func:`step_group_scores` — per (step, layer group): absolute influence on the validation
  set, and the magnitudes of the data (kernel) and weight-decay (regularization) parts;
* :func:`top_train_samples` and :func:`train_val_kernel` — the data views of the report.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..exceptions import ConfigError
from ..kernel.attribution import AXES

__all__ = [
    "TARGETS",
    "AXES",
    "parse_keep",
    "parse_steps",
    "check_target",
    "resolve_target",
    "influence",
    "save_attribution",
    "CSV_LIMIT",
    "csv_rows",
    "check_csv_rows",
    "summarise",
    "StepGroupScores",
    "step_group_scores",
    "top_train_samples",
    "train_val_kernel",
]

#: Explained quantity, by name: the correct class, the model's predicted class, every output, the loss.
TARGETS = ("label", "predicted", "all", "loss")
#: Largest ``scores.csv`` written (rows).
CSV_LIMIT = 5_000_000


def parse_keep(text: str) -> tuple[str, ...]:
    """``"step,group"`` -> ``("step", "group")``; an empty string keeps no axis.

    Raises
    ------
    ConfigError
        For an unknown axis (with the allowed ones) or a repeated one.
    """
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [n for n in names if n not in AXES]
    if bad:
        raise ConfigError(f"--keep {text!r}: unknown axis {bad[0]!r}. Choose a comma-separated subset of "
                          f"{', '.join(AXES)} (e.g. --keep step,group).")
    if len(set(names)) != len(names):
        raise ConfigError(f"--keep {text!r} repeats an axis; list each axis once.")
    return names


def parse_steps(text: str | None) -> tuple[int, int | None] | None:
    """``"10:50"`` -> ``(10, 50)``; ``"10:"`` -> ``(10, None)``; ``None`` -> whole run."""
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        lo = int(start) if start.strip() else 0
        hi = int(stop) if stop.strip() else None
    except ValueError:
        raise ConfigError(f"--steps {text!r} is not START:STOP with integers (e.g. 0:100 or 200:).") from None
    return lo, hi


def check_target(name: str) -> str:
    """Validate a target name (see :data:`TARGETS`)."""
    if name not in TARGETS:
        raise ConfigError(f"Unknown target {name!r}. Choose one of: {', '.join(TARGETS)}.")
    return name


def resolve_target(name: str, model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> Any:
    """The ``target=`` argument of :class:`~explaind.InfluenceEstimator` for a named target."""
    check_target(name)
    if name == "all":
        return None
    if name == "loss":
        return "loss"
    if name == "label":
        return [int(v) for v in y]
    with torch.no_grad():
        return [int(v) for v in model(X).argmax(-1)]


def _validation(run: Any, n_test: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = run.dataset.val
    if n_test is not None:
        if n_test < 1:
            raise ConfigError(f"n_test={n_test} must be at least 1.")
        X, y = X[:n_test], y[:n_test]
    return X, y


def influence(run: Any, *, keep: Sequence[str] = ("step", "group"), target: str = "label",
              steps: tuple[int, int | None] | None = None, n_test: int | None = None, device: str = "cpu",
              quadrature: str = "adaptive", nodes: int | None = None, tol: float = 1e-7,
              memory_budget: int | str = "2GB",
              chunk_size: int | None = 256, dtype: str = "float64", progress: bool = False) -> Any:
    """Influence scores of a run on (the first ``n_test`` inputs of) its validation set.

    ``quadrature``, ``nodes`` and ``tol`` are the path-integral rule of :class:`~explaind.InfluenceEstimator`
    (``tol``: the adaptive rule's relative tolerance per step and input); ``memory_budget`` its working memory.

    Returns
    -------
    explaind.Attribution
        Axes ``("test", *keep, "output")``.
    """
    import explaind

    X, y = _validation(run, n_test)
    tgt = resolve_target(target, run.final_model(), X, y)
    est = explaind.InfluenceEstimator(keep=tuple(keep), target=tgt, steps=steps, device=device,
                                      quadrature=quadrature, nodes=nodes, tol=tol, memory_budget=memory_budget,
                                      chunk_size=chunk_size, dtype=dtype, progress=progress)
    return est.fit(run.trajectory).transform(X, y if target == "loss" else None)


def csv_rows(run: Any, keep: Sequence[str], target: str, n_steps: int, n_test: int) -> int:
    """Rows of the ``scores.csv`` of an :func:`influence` query, from the axis sizes alone (nothing computed).

    ``n_test x prod(kept axis sizes) x outputs``: ``step`` has ``n_steps`` entries (the window),
    ``group`` one per parameter tensor, ``param`` one per coordinate, ``train`` one per training
    sample; the output axis has one entry per class for ``target="all"``, else one.
    """
    traj = run.trajectory
    params = traj.params(0)
    sizes = {"step": n_steps, "group": len(traj.param_names), "param": sum(int(t.numel()) for t in params.values()),
             "train": int(traj.n_train)}
    rows = n_test * (int(run.dataset.n_classes) if target == "all" else 1)
    for axis in keep:
        rows *= sizes[axis]
    return rows


def check_csv_rows(rows: int, keep: Sequence[str], n_test: int) -> None:
    """Refuse a query whose CSV would exceed :data:`CSV_LIMIT` rows, before anything is computed."""
    if rows > CSV_LIMIT:
        raise ConfigError(f"--keep {','.join(keep) or '(none)'} on {n_test} inputs would write a CSV of {rows:,} rows "
                          f"(limit {CSV_LIMIT:,}); nothing was computed. Use --no-csv (the safetensors file holds "
                          f"every score), or fewer --n-test, a --steps window or fewer kept axes.")


#: Rows of ``scores.csv`` formatted at a time.
_CSV_ROWS = 100_000


def _csv_field(value: Any) -> str:
    """``value`` as ``csv.writer`` writes one field (quoted when it holds a comma, a quote or a line break)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([value])
    return buffer.getvalue()


def save_attribution(att: Any, out_dir: str | Path, *, csv_file: bool = True) -> list[Path]:
    """Write ``att`` to ``out_dir``: ``attribution.safetensors``/``.json`` and ``scores.csv``.

    The CSV is long format: one row per entry of ``values`` with a column per axis (coordinates,
    e.g. the step number and the group name) and the column ``value``; when no ``train`` axis is
    kept, the columns ``regularization`` and ``residual`` hold the side terms of the same cell.

    Raises
    ------
    ConfigError
        When the CSV would exceed 5 million rows (write without it, or keep fewer axes).
    """
    root = Path(out_dir)
    att.save(root)
    written = [root / "attribution.safetensors", root / "attribution.json"]
    if not csv_file:
        return written
    values = att.values.detach().cpu().numpy()
    if values.size > CSV_LIMIT:
        raise ConfigError(f"The CSV would have {values.size} rows (limit {CSV_LIMIT}). Use --no-csv (the "
                          f"safetensors file holds everything) or keep fewer axes / test inputs.")
    side = "train" not in att.axes
    reg = att.regularization.detach().cpu().numpy() if side else None
    res = att.residual.detach().cpu().numpy() if side else None
    coords = [list(att.coords[a]) if a != "param" else [att.param_label(i) for i in range(values.shape[k])]
              for k, a in enumerate(att.axes)]
    path = root / "scores.csv"
    labels = [np.array([_csv_field(c) for c in axis], dtype=object) for axis in coords]
    columns = [values] + ([reg, res] if side else [])
    with path.open("w", newline="") as handle:
        handle.write(",".join(_csv_field(c) for c in [*att.axes, "value",
                                                      *(["regularization", "residual"] if side else [])]) + "\r\n")
        for lo in range(0, values.size, _CSV_ROWS):  # rows as csv.writer writes them, a block at a time
            cells = np.unravel_index(np.arange(lo, min(lo + _CSV_ROWS, values.size)), values.shape)
            fields = [labels[k][i] for k, i in enumerate(cells)]
            fields += [[repr(v) for v in c.reshape(-1)[lo:lo + _CSV_ROWS].tolist()] for c in columns]
            handle.write("".join(",".join(row) + "\r\n" for row in zip(*fields)))
    written.append(path)
    return written


def summarise(att: Any) -> dict[str, Any]:
    """Axes, shape, completeness gap, the size of every term and the evaluations per step (JSON-ready)."""
    return {
        "axes": list(att.axes),
        "shape": list(att.shape),
        "completeness_gap": float(att.completeness_error()),
        "data_total": float(att.values.sum()),
        "regularization_total": float(att.regularization.sum()),
        "residual_total": float(att.residual.sum()),
        "quadrature_error_total": float(att.quadrature_error.sum()),
        "quadrature_error_max": float(att.quadrature_error.sum(1).abs().max()) if att.quadrature_error.dim() > 2
        else float(att.quadrature_error.abs().max()),
        "meta": {k: v for k, v in att.meta.items() if k != "evals_per_step"},
        # path-gradient evaluations per step and input, averaged over the steps (None: not counted)
        "evals_per_step_mean": (float(np.mean(att.meta["evals_per_step"])) if att.meta.get("evals_per_step")
                                else None),
    }


@dataclass
class StepGroupScores:
    """Per-step, per-group magnitudes over a set of test inputs (see :mod:`explaind.scores`).

    Attributes
    ----------
    steps : ndarray, shape (S,)
    groups : list of str, length G
    kernel : ndarray, shape (S, G)
        ``sum_{x,o} |data part|`` of each (step, parameter tensor): the absolute influence drawn
        in the heatmap (also :attr:`influence`).
    regularization : ndarray, shape (S, G)
        ``sum_{x,o} |weight-decay part|``.
    completeness_gap : float
        Relative completeness error of the attribution the scores came from.
    """

    steps: np.ndarray
    groups: list[str]
    kernel: np.ndarray
    regularization: np.ndarray
    completeness_gap: float

    @property
    def influence(self) -> np.ndarray:
        """Absolute influence per (step, group): the kernel part, shape ``(S, G)``."""
        return self.kernel

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"steps": self.steps.tolist(), "groups": self.groups, "kernel": self.kernel.tolist(),
                "regularization": self.regularization.tolist(), "completeness_gap": self.completeness_gap}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepGroupScores:
        """Inverse of :meth:`to_dict`."""
        return cls(np.asarray(data["steps"]), list(data["groups"]), np.asarray(data["kernel"]),
                   np.asarray(data["regularization"]), float(data["completeness_gap"]))


def step_group_scores(att: Any) -> StepGroupScores:
    """Reduce a ``keep=("step", "group")`` attribution to :class:`StepGroupScores`.

    Uses :func:`explaind.scores.kernel_regularization_balance`: the absolute values are
    taken per test input and output, then summed.
    """
    from ..scores import kernel_regularization_balance

    if tuple(att.kept) != ("step", "group"):
        raise ConfigError(f"step_group_scores needs an attribution with kept axes ('step', 'group'); got {att.kept}.")
    balance = kernel_regularization_balance(att)
    return StepGroupScores(
        steps=np.asarray(balance["steps"]),
        groups=list(balance["groups"]),
        kernel=balance["kernel"].detach().double().cpu().numpy(),
        regularization=balance["regularization"].detach().double().cpu().numpy(),
        completeness_gap=float(att.completeness_error()),
    )


def top_train_samples(att: Any, k: int = 3) -> list[dict[str, Any]]:
    """Top-``k`` proponents and opponents per test input of a ``keep=("train",)`` attribution.

    Returns
    -------
    list of dict
        Per test input: ``proponents`` and ``opponents``, lists of ``(train index, score)``
        sorted by decreasing ``|score|`` (outputs summed).
    """
    if tuple(att.kept) != ("train",):
        raise ConfigError(f"top_train_samples needs an attribution with kept axis ('train',); got {att.kept}.")
    scores = att.values.detach().double().sum(-1).cpu().numpy()  # (T, M)
    out = []
    for row in scores:
        order = np.argsort(row)
        pro = [(int(i), float(row[i])) for i in order[::-1][:k] if row[i] > 0]
        con = [(int(i), float(row[i])) for i in order[:k] if row[i] < 0]
        out.append({"proponents": pro, "opponents": con})
    return out


def train_val_kernel(scores: np.ndarray, train_key: np.ndarray,
                     val_key: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    """A (train × validation) influence matrix ordered by a key (e.g. ``(a + b) mod p``).

    Parameters
    ----------
    scores : ndarray, shape (T, M)
        Influence of training sample ``m`` on test input ``t`` (one output, or outputs summed).
    train_key, val_key : ndarray
        Sort keys of the training samples (length ``n_train``) and of the test inputs.

    Returns
    -------
    matrix : ndarray, shape (n_train, T)
        ``matrix[i, j]`` = influence of training sample ``order_train[i]`` on test input
        ``order_val[j]``.
    row_boundaries, col_boundaries : list of int
        Positions where the sorted training / validation key changes.
    """
    scores = np.asarray(scores)
    tr_order = np.argsort(np.asarray(train_key), kind="stable")
    va_order = np.argsort(np.asarray(val_key), kind="stable")
    matrix = scores[va_order][:, tr_order].T
    rows = [int(i) for i in np.nonzero(np.diff(np.asarray(train_key)[tr_order]))[0] + 1]
    cols = [int(i) for i in np.nonzero(np.diff(np.asarray(val_key)[va_order]))[0] + 1]
    return matrix, rows, cols
