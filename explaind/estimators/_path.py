"""Pieces shared by the path-kernel estimators (:class:`KernelReplica`, :class:`InfluenceEstimator`).

Config fields common to both, the resolution of the step window, device and dtype in ``fit``,
and the lazily built :class:`~explaind.kernel.engine.PathEngine` (dropped when pickling).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from ..config import DtypeName, StrictModel, resolve_dtype
from ..exceptions import ConfigError, ExplaindError, UnsupportedModelError
from ..kernel.budget import parse_bytes
from ..trajectory.base import Trajectory
from ._model_checks import check_recorded_model
from .base import ExplaindEstimator

__all__ = ["PathConfig", "PathEstimator", "QuadratureName", "budget_bytes"]

QuadratureName = Literal["adaptive", "gauss-legendre", "midpoint", "left"]


def budget_bytes(value: Any) -> Any:
    """A ``memory_budget`` in bytes for a config's field validator (``None`` kept); a bad value raises the
    ``ValueError`` whose text names it and the accepted forms."""
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ConfigError as exc:
        raise ValueError(str(exc).split(" — ", 1)[-1]) from None


class PathConfig(StrictModel):
    """Fields shared by the path-kernel estimators (see their docstrings)."""

    quadrature: QuadratureName = "adaptive"
    nodes: int | None = Field(default=None, ge=1, le=100_000)
    tol: float = Field(default=1e-7, gt=0.0, lt=1.0)
    steps: tuple[int, int | None] | None = None
    device: str = "auto"
    dtype: DtypeName = "float64"
    chunk_size: int | None = Field(default=256, ge=1)
    factored: Literal["auto", "always", "never"] = "auto"
    progress: bool = False
    distributed: Literal["auto", "off"] = "auto"
    casts: Literal["auto", "replay_dtype", "as_written"] = "auto"


class PathEstimator(ExplaindEstimator):
    """Base of the path-kernel estimators: ``fit`` validation and the engine."""

    def _fit_common(self, traj: Any) -> Any:
        name = type(self).__name__
        config = self._validated_config()
        if not isinstance(traj, Trajectory):
            raise ConfigError(
                f"{name}.fit expects an explaind.Trajectory (from TrajectoryRecorder(...).trajectory or "
                f"Trajectory.load(path)); got {type(traj).__name__}."
            )
        N = int(traj.n_steps)
        if N < 1:
            raise ConfigError(f"{name}.fit: the trajectory has no recorded steps; record at least one optimizer step.")
        start, stop = self._window(config.steps, N)
        device = self._device(config.device)
        check_recorded_model(traj, name)
        self.config_ = config
        self.trajectory_ = traj
        self.window_ = (start, stop)
        self.device_ = device
        self.dtype_ = resolve_dtype(config.dtype)
        self.param_names_ = tuple(traj.param_names)
        self.n_params_ = int(sum(int(np.prod(tuple(v.shape))) for v in traj.params(0).values()))
        self.n_steps_ = N
        self._engine_cache = None
        return config

    @property
    def engine_(self) -> Any:
        """The :class:`~explaind.kernel.engine.PathEngine` (built on first use after ``fit``)."""
        self._check_fitted()
        engine = getattr(self, "_engine_cache", None)
        if engine is None:
            from ..kernel.engine import PathEngine

            engine = PathEngine(self.trajectory_, device=self.device_, dtype=self.dtype_,
                                chunk_size=self.config_.chunk_size, progress=self.config_.progress,
                                factored=self.config_.factored, casts=self.config_.casts,
                                memory_budget=getattr(self.config_, "memory_budget", None))
            engine.max_evals = getattr(self.config_, "max_evals", None)
            self._engine_cache = engine
        return engine

    def _inputs(self, X: Any) -> torch.Tensor:
        if X is None:
            raise ConfigError(f"{type(self).__name__}: X is None; pass test inputs of shape (n, ...).")
        engine = self.engine_  # a model explaind cannot evaluate is refused here, not blamed on X
        try:
            Xt = engine.inputs(X)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{type(self).__name__}: X of type {type(X).__name__} cannot be turned into a tensor "
                              f"({exc}); pass a tensor or array of test inputs of shape (n, ...).") from None
        if Xt.dim() == 0 or Xt.shape[0] == 0:
            raise ConfigError(f"{type(self).__name__}: X must hold at least one input along its first axis; got "
                              f"shape {tuple(Xt.shape)}.")
        probe_inputs(type(self).__name__, engine.fm, engine.params(0), Xt, recorded=self.trajectory_.params(0))
        engine.settle_casts(Xt[:1], type(self).__name__)
        return Xt

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_engine_cache"] = None
        return state


def probe_inputs(name: str, fm: Any, params: Any, Xt: Any, recorded: Any = None) -> None:
    """Run the model on the first test input; a failure (wrong shape or dtype) becomes a :class:`ConfigError`, or
    an :class:`UnsupportedModelError` when the recorded parameters hold several floating dtypes (the replay casts
    them all to its own, which a forward that converts tensors to one layer's dtype does not expect).

    Parameters
    ----------
    name : str
        The estimator, for the message.
    fm : FunctionalModel
        ``fm(params, x)`` evaluates the model.
    params : mapping of str to Tensor
        Parameters to evaluate at (e.g. ``theta_0``).
    Xt : Tensor or Inputs
        Test inputs ``(n, ...)``.
    recorded : mapping of str to Tensor, optional
        The parameters as recorded (their own dtypes), for the message.
    """
    try:
        with torch.no_grad():
            fm(params, Xt[:1])
    except ExplaindError:
        raise  # a refusal that names its own cause (complex outputs), not a mismatch of X
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        mixed = mixed_dtypes(recorded or {})
        if len(mixed) > 1:
            raise UnsupportedModelError(
                f"{name}: the model fails ({str(exc).splitlines()[0]}), and it was trained with parameters of "
                f"several dtypes ({'; '.join(f'{d}: {names[:4]}' for d, names in mixed.items())}). explaind evaluates "
                f"every parameter in one dtype ({fm.dtype}, the estimator's dtype=), so a forward that converts a "
                f"tensor to a fixed dtype for one layer (x.float() before a float32 layer) meets {fm.dtype} weights. "
                f"Fix: convert to the layer's own dtype, x.to(self.layer.weight.dtype), which the replay follows "
                f"(the training gradients keep that layer's rounding), or train the whole model in one dtype "
                f"(model.to(torch.float64)).") from None
        what = f"X of shape {tuple(Xt.shape)} and dtype {Xt.dtype}" if isinstance(Xt, torch.Tensor) else f"X {Xt!r}"
        raise ConfigError(f"{name}: the model fails on {what} "
                          f"({str(exc).splitlines()[0]}). Pass test inputs shaped like the training inputs, with the "
                          f"test inputs along the first axis.") from None


def mixed_dtypes(params: Any) -> dict[str, list[str]]:
    """``{dtype name: parameter names}`` of the floating tensors in ``params`` (one entry when all share a dtype)."""
    out: dict[str, list[str]] = {}
    for n, v in params.items():
        if torch.is_tensor(v) and v.is_floating_point():
            out.setdefault(str(v.dtype).removeprefix("torch."), []).append(n)
    return out
