"""Training curves and the detection of grokking phases from them.

A grokking run goes through three phases (Nanda et al., 2023; the ExPLAIND paper studies the
same split):

* **memorisation** — the training accuracy climbs to (almost) 1 while validation accuracy
  stays near chance;
* **circuit formation** — both accuracies plateau; weight decay slowly reshapes the weights
  into the generalising circuit;
* **cleanup** — validation accuracy shoots up to 1 as the memorising components decay.

:func:`detect_phases` places the boundaries with explicit, documented rules on the recorded
curves, so a figure can always say where they came from. :func:`run_outcome` first says
whether the run generalised at all: phases are only labelled for a run that did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..exceptions import ConfigError

__all__ = ["History", "Phase", "Outcome", "detect_phases", "run_outcome", "PHASE_NAMES"]

PHASE_NAMES: tuple[str, ...] = ("memorisation", "circuit formation", "cleanup")


@dataclass
class History:
    """Training curves evaluated every few optimizer steps.

    Attributes
    ----------
    step : list of int
        Number of optimizer steps taken when the row was evaluated (0 = before training).
    train_loss, train_acc, val_loss, val_acc : list of float
        Mean cross-entropy and accuracy on the full training and validation sets.
    """

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)

    def append(self, step: int, train_loss: float, train_acc: float, val_loss: float, val_acc: float) -> None:
        """Add one evaluation row."""
        self.step.append(int(step))
        self.train_loss.append(float(train_loss))
        self.train_acc.append(float(train_acc))
        self.val_loss.append(float(val_loss))
        self.val_acc.append(float(val_acc))

    def __len__(self) -> int:
        return len(self.step)

    def until(self, step: int) -> History:
        """The rows evaluated at or before optimizer step ``step`` (a resumed run recomputes the later ones)."""
        keep = [i for i, s in enumerate(self.step) if s <= step]
        rows = {name: [getattr(self, name)[i] for i in keep] for name in self.to_dict()}
        return History(**rows)

    def to_dict(self) -> dict[str, list[Any]]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """Inverse of :meth:`to_dict`; checks the columns have equal length."""
        names = ("step", "train_loss", "train_acc", "val_loss", "val_acc")
        missing = [n for n in names if n not in data]
        if missing:
            raise ConfigError(f"Training history lacks the column(s) {missing}; expected {list(names)}.")
        lengths = {n: len(data[n]) for n in names}
        if len(set(lengths.values())) != 1:
            raise ConfigError(f"Training history columns differ in length: {lengths}.")
        return cls(**{n: list(data[n]) for n in names})


@dataclass(frozen=True)
class Phase:
    """One training phase as a half-open range of optimizer steps ``[start, stop)``."""

    name: str
    start: int
    stop: int

    def contains(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) belongs to the phase."""
        return self.start <= step < self.stop


def _first_at_least(steps: np.ndarray, values: np.ndarray, threshold: float, after: int = 0) -> int | None:
    hits = np.nonzero((values >= threshold) & (steps >= after))[0]
    return int(steps[hits[0]]) if hits.size else None


def detect_phases(
    history: History,
    *,
    n_steps: int | None = None,
    threshold: float = 0.99,
    rise: float = 0.1,
) -> list[Phase]:
    """Split a run into memorisation, circuit formation and cleanup.

    Rules, on the evaluated curves (``A_tr``, ``A_val`` = train/validation accuracy):

    * memorisation ends at ``t_m``, the first evaluation with ``A_tr >= threshold``;
    * cleanup starts at ``t_c``, the last evaluation before ``A_val`` has covered the fraction
      ``rise`` of the way from its value at ``t_m`` to 1 (searching after ``t_m``);
    * cleanup ends at the first evaluation with ``A_val >= threshold`` (or at ``n_steps``).

    Parameters
    ----------
    history : History
        The curves; at least two evaluations.
    n_steps : int, optional
        Number of optimizer steps of the run (default: the last evaluated step).
    threshold : float
        Accuracy counted as "reached" (0 < threshold <= 1).
    rise : float
        Fraction of the remaining gap to 1 that marks the start of cleanup (0 < rise < 1).

    Returns
    -------
    list of Phase
        The phases that occurred, in order, each non-empty. A run that never memorises yields
        only ``memorisation``; one that never generalises ends with ``circuit formation``.
    """
    if len(history) < 2:
        raise ConfigError(f"Phase detection needs at least two evaluations of the curves; got {len(history)}.")
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold={threshold!r} must lie in (0, 1], e.g. 0.99.")
    if not 0.0 < rise < 1.0:
        raise ConfigError(f"rise={rise!r} must lie strictly between 0 and 1, e.g. 0.1.")
    steps = np.asarray(history.step, dtype=np.int64)
    train_acc = np.asarray(history.train_acc, dtype=np.float64)
    val_acc = np.asarray(history.val_acc, dtype=np.float64)
    end = int(steps[-1]) if n_steps is None else int(n_steps)
    if end <= 0:
        raise ConfigError(f"n_steps={n_steps!r} must be positive.")

    t_m = _first_at_least(steps, train_acc, threshold)
    if t_m is None or t_m >= end:
        return [Phase(PHASE_NAMES[0], 0, end)]
    t_m = max(t_m, 1)
    base = float(val_acc[steps == t_m][0]) if np.any(steps == t_m) else float(val_acc[steps <= t_m][-1])
    t_c = _first_at_least(steps, val_acc, base + rise * (1.0 - base), after=t_m + 1)
    if t_c is not None:
        # cleanup starts at the evaluation *before* the rise became visible
        before = steps[(steps < t_c) & (steps >= t_m)]
        t_c = int(before[-1]) if before.size else t_c
    if t_c is None or t_c >= end:
        return [Phase(PHASE_NAMES[0], 0, t_m), Phase(PHASE_NAMES[1], t_m, end)]
    t_e = _first_at_least(steps, val_acc, threshold, after=t_c + 1)
    t_e = end if t_e is None else min(end, max(t_e, t_c + 1))
    phases = [Phase(PHASE_NAMES[0], 0, t_m)]
    if t_c > t_m:
        phases.append(Phase(PHASE_NAMES[1], t_m, t_c))
    phases.append(Phase(PHASE_NAMES[2], t_c, t_e))
    return phases


@dataclass(frozen=True)
class Outcome:
    """What a run did: whether, and when, it memorised and generalised.

    Attributes
    ----------
    threshold : float
        Accuracy counted as "reached".
    train_step, val_step : int or None
        First evaluated step with training / validation accuracy ``>= threshold``.
    best_val, best_val_step : float, int
        Highest validation accuracy and the first step it was evaluated at.
    final_train, final_val : float
        Accuracies at the last evaluation.
    """

    threshold: float
    train_step: int | None
    val_step: int | None
    best_val: float
    best_val_step: int
    final_train: float
    final_val: float

    @property
    def generalised(self) -> bool:
        """Validation accuracy reached the threshold (at or after training accuracy did)."""
        return self.train_step is not None and self.val_step is not None and self.val_step >= self.train_step

    @property
    def grokked(self) -> bool:
        """Generalised, and strictly later than it memorised (the grokking delay is positive)."""
        return self.generalised and self.val_step > self.train_step  # type: ignore[operator]

    def describe(self) -> str:
        """One or two sentences a report can print as they are."""
        if self.train_step is None:
            return (f"Training accuracy never reached {self.threshold:g} (final {self.final_train:.3f}); the run "
                    f"did not memorise its training set, so no phases are labelled.")
        head = f"Training accuracy reached {self.threshold:g} at step {self.train_step}"
        if not self.generalised:
            return (f"{head}, but validation accuracy never did: it peaked at {self.best_val:.3f} (step "
                    f"{self.best_val_step}) and ended at {self.final_val:.3f}. The run did not generalise, so no "
                    f"grokking phases are labelled.")
        if not self.grokked:
            return (f"{head} and validation accuracy at the same evaluation: the run generalised without a "
                    f"delay (no grokking).")
        return (f"{head}; validation accuracy reached it {self.val_step - self.train_step} steps later, at step "
                f"{self.val_step} (final validation accuracy {self.final_val:.3f}): the run grokked.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the derived flags."""
        return {**asdict(self), "generalised": self.generalised, "grokked": self.grokked}


def run_outcome(history: History, *, threshold: float = 0.99) -> Outcome:
    """Whether and when a run memorised and generalised (see :class:`Outcome`).

    Parameters
    ----------
    history : History
        The evaluated curves (at least one evaluation).
    threshold : float
        Accuracy counted as "reached" (0 < threshold <= 1).
    """
    if len(history) < 1:
        raise ConfigError("run_outcome needs at least one evaluation of the curves.")
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold={threshold!r} must lie in (0, 1], e.g. 0.99.")
    steps = np.asarray(history.step, dtype=np.int64)
    train_acc = np.asarray(history.train_acc, dtype=np.float64)
    val_acc = np.asarray(history.val_acc, dtype=np.float64)
    t_train = _first_at_least(steps, train_acc, threshold)
    t_val = _first_at_least(steps, val_acc, threshold, after=0 if t_train is None else t_train)
    best = int(np.argmax(val_acc))
    return Outcome(threshold, t_train, t_val, float(val_acc[best]), int(steps[best]), float(train_acc[-1]),
                   float(val_acc[-1]))
