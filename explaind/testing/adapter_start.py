r"""Conformance check of recordings that start from optimizer state, and the adapter checks of the plugin suite.

A recording may open on an optimizer that already holds state (restored from a checkpoint, or after
unrecorded steps); the adapter's optional ``start_state(optimizer)`` then returns the buffers
:math:`m_{-1}` the recurrence continues from (docs/maths.md §4, "Optimizer state at the start").
:func:`check_adapter_start_state` trains a small float64 MLP for ``before`` unrecorded steps with the
options of every default scenario (:func:`~explaind.testing.adapters.default_scenarios`, group options
only), opens a :class:`~explaind.TrajectoryRecorder` and records ``steps`` more. The recorder's update
audit replays every recorded step with the adapter's coefficients from :math:`m_{-1}` and the gradient
the optimizer saw, so its per-step relative residual :math:`\|E_s\| / \|\Delta\theta_s\|` is the
measure (at most ``tol``). An adapter without ``start_state`` must instead be refused with a
:class:`~explaind.exceptions.ConfigError` whenever the optimizer holds state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..exceptions import ConfigError, ExplaindError
from ..plugins import adapter_optimizer_classes
from .adapters import check_optimizer_adapter, default_scenarios

logger = logging.getLogger(__name__)

__all__ = ["check_adapter_start_state", "optimizer_adapter_checks"]


def _run(optimizer_class: type, kwargs: dict[str, Any], dtype: torch.dtype, before: int, steps: int,
         seed: int) -> tuple[float | None, bool]:
    """``(largest audit residual or None when refused, whether the optimizer held state)`` of one run."""
    import explaind

    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(24, 4, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (24,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    optimizer = optimizer_class(model.parameters(), **kwargs)

    def step(s: int, rec: Any = None) -> None:
        idx = torch.arange(8 * (s % 3), 8 * (s % 3) + 8)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        if rec is not None:
            rec.log_batch(idx)
        optimizer.step()

    for s in range(before):
        step(s)
    held = any(len(state) > 0 for state in optimizer.state.values())
    rec = explaind.TrajectoryRecorder(model, optimizer, loss="cross_entropy", train_data=(X, y))
    try:
        with rec:
            for s in range(before, before + steps):
                step(s, rec)
    except ConfigError:
        return None, held
    return float(rec.trajectory.audit().max()), held


def check_adapter_start_state(record: Any, *, dtype: torch.dtype = torch.float64, tol: float = 1e-12,
                              before: int = 3, steps: int = 4, seed: int = 0) -> dict[str, float]:
    """Record runs opened after ``before`` unrecorded steps; raise unless each is exact or rightly refused.

    Parameters
    ----------
    record : OptimizerAdapterRecord
        The adapter under test (every class of ``record.optimizer_classes``).
    dtype : torch.dtype
        Parameter dtype of the runs.
    tol : float
        Largest accepted per-step audit residual.
    before, steps : int
        Unrecorded and recorded optimizer steps.
    seed : int

    Returns
    -------
    dict of str to float
        Scenario name -> largest audit residual of the recorded steps (runs the adapter refused are left out).

    Raises
    ------
    explaind.exceptions.ExplaindError
        A residual above ``tol``, an adapter with ``start_state`` that refused a run, or one without it that
        recorded from held state.
    """
    has_start = callable(getattr(record.implementation, "start_state", None))
    out: dict[str, float] = {}
    problems: list[str] = []
    for cls in adapter_optimizer_classes(record):
        seen: list[dict[str, Any]] = []
        for scenario in default_scenarios(cls):
            kwargs = dict(scenario.optimizer_kwargs)
            if kwargs in seen:
                continue
            seen.append(kwargs)
            name = f"{cls.__name__}:{scenario.name}"
            worst, held = _run(cls, kwargs, dtype, before, steps, seed)
            if worst is None:
                if has_start or not held:
                    problems.append(f"{name}: the recorder refused the run (ConfigError), although "
                                    f"{'the adapter has start_state' if has_start else 'the optimizer held no state'}")
                continue
            if held and not has_start:
                problems.append(f"{name}: the optimizer held state and the adapter has no start_state, yet the run "
                                f"was recorded")
            elif not worst <= tol:
                problems.append(f"{name}: audit residual {worst:.3g} > tol {tol:.1e}")
            out[name] = worst
    if problems:
        raise ExplaindError(f"Optimizer adapter {record.name!r} from optimizer state ({dtype}):\n  - "
                            + "\n  - ".join(problems))
    return out


def optimizer_adapter_checks(record: Any, inspected: Any = None) -> Iterable[tuple[str, Callable[[], None]]]:
    """Checks of one :class:`~explaind.records.OptimizerAdapterRecord` for the plugin suite.

    Yields ``("replay_float64", ...)`` (``tol=1e-12``) and ``("replay_float32", ...)`` (``tol=1e-5``), each
    running :func:`~explaind.testing.adapters.check_optimizer_adapter` on the default scenarios, and
    ``("start_state", ...)``, :func:`check_adapter_start_state` in float64 (``tol=1e-12``). A record that names its
    classes only by ``optimizer_class_names`` whose modules are not installed (an optional dependency) yields
    nothing: there is no optimizer to run.
    """
    if not adapter_optimizer_classes(record) and record.optimizer_class_names:
        logger.info("optimizer adapter %r not checked: none of %s imports", record.name, record.optimizer_class_names)
        return

    def float64() -> None:
        check_optimizer_adapter(record, dtype=torch.float64, tol=1e-12)

    def float32() -> None:
        check_optimizer_adapter(record, dtype=torch.float32, tol=1e-5)

    def start_state() -> None:
        check_adapter_start_state(record)

    yield "replay_float64", float64
    yield "replay_float32", float32
    yield "start_state", start_state
