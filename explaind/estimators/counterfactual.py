r"""Exact counterfactual metagradients: how the trained model's output moves when a sample's weight moves.

``CounterfactualEstimator().fit(traj).transform(X)`` returns an
:class:`~explaind.kernel.attribution.Attribution` with axes ``("test", "train", "output")`` whose
values are

.. math::

    \tau_k(x) = \frac{\partial g(x; \theta_N)}{\partial \epsilon_k}\Big|_{\epsilon = 0},

where :math:`\epsilon_k` scales sample ``k``'s weight :math:`w_{s,k} \to (1 + \epsilon_k) w_{s,k}` in
every batch that holds it, and the run is re-trained from the same :math:`\theta_0` with the same
batches, hyperparameters and schedule. It is computed exactly (to rounding) by reverse mode
through the recorded updates (:mod:`explaind.kernel.metagrad`, docs/maths.md §9). Unlike the
ExPLAIND decomposition the values are *not* additive: they predict the first-order effect of
re-weighting (``-tau_k`` estimates removing a sample that appears once per epoch with weight
``w``), not a split of :math:`g(x;\theta_N)` (docs/scores_meaning.md). ``steps=(start, stop)``
explains :math:`g(x;\theta_{stop})` with the weights scaled in that window only, the run restarted
from its recorded state at ``start`` (docs/maths.md §9, "A window of steps").
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from ..config import DtypeName, StrictModel, resolve_dtype
from ..exceptions import ConfigError, UnknownEntryError
from ..kernel.adjoint import reversed_backward
from ..kernel.attribution import Attribution
from ..kernel.explained import Explained, FunctionalModel
from ..kernel.jumps import find_jumps
from ..kernel.layout import ParamLayout
from ..kernel.metagrad import Replay, counterfactual_sweep, output_cotangents, start_state
from ..kernel.metagrad_forward import output_jacobian
from ..trajectory.base import Trajectory
from ._model_checks import check_recorded_model
from ._path import probe_inputs
from .base import ExplaindEstimator
from .residual import METAGRADIENT_TERMS, check_finite

__all__ = ["CounterfactualEstimator", "CounterfactualConfig"]

logger = logging.getLogger(__name__)


class CounterfactualConfig(StrictModel):
    """Validated parameters of :class:`CounterfactualEstimator` (same fields as its ``__init__``)."""

    target: Any = None
    checkpoint_every: int | None = Field(default=None, ge=1)
    steps: tuple[int, int | None] | None = None
    test_chunk_size: int | None = Field(default=None, ge=1)
    chunk_size: int | None = Field(default=256, ge=1)
    device: str = "auto"
    dtype: DtypeName = "float64"


class CounterfactualEstimator(ExplaindEstimator):
    r"""Exact derivatives of test outputs with respect to training-sample weights (metagradients).

    Parameters
    ----------
    target : None, int, sequence of int or "loss"
        Explained quantity, as in :class:`~explaind.InfluenceEstimator`: all outputs, one output
        per test input, or the per-sample loss of ``(f(x), y)`` (``transform`` then needs ``y``).
    checkpoint_every : int, optional
        ``K``: the optimizer state is kept every ``K`` steps and each segment is recomputed during
        the reverse sweep (default ``ceil(sqrt(N))``; ``1`` keeps every step). Memory about
        ``(N / K + K) |opt state| + 2 T O (|theta| + |opt state|)`` values.
    steps : (int, int or None), optional
        Window ``(start, stop)`` (``None`` stop: the last step). The values are then
        :math:`\partial g(x;\theta_{stop}) / \partial\epsilon_k` where :math:`\epsilon_k` scales sample
        ``k``'s weight in the steps ``start <= s < stop`` only, and the run is retrained from the
        recorded state at ``start`` (parameters and optimizer state held fixed) up to ``stop``
        (docs/maths.md §9, "A window of steps"). ``initial`` is :math:`g(\theta_{start})`, ``final``
        :math:`g(\theta_{stop})`; the reverse sweep covers the window only.
    test_chunk_size : int, optional
        Test inputs per reverse sweep (default: all at once); each chunk repeats the sweep.
    chunk_size : int or None
        Training samples whose per-sample gradients are held at once in a step of the reverse sweep
        (as in :class:`~explaind.InfluenceEstimator`; ``None``: a step's whole batch), so that step holds
        ``chunk_size * |theta|`` gradient values; the result does not depend on it.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    dtype : {"float64", "float32"}
        Compute dtype.

    Attributes
    ----------
    trajectory_ : Trajectory
    n_steps_, n_train_ : int
    window_ : (int, int)
        The resolved ``(start, stop)``.
    adapter_ : str
        Registry name of the run's optimizer adapter.
    update_fn_ : PureUpdate
        The adapter's pure update (``record.update_fn(hyperparameters)``).
    replay_residual_ : float
        After ``transform``: the largest ``||U_s(z_s, g_s) - theta_{s+1}|| / ||Delta theta_s||`` of
        the replay (round-off for a faithful replay; large when the run had anything ``U_s`` does
        not model, and then the metagradient is that of the modelled run). Dropout and batch norm
        in training mode are modelled: their steps are replayed through the batched training
        forward at the recorded random states, and the trained model's running statistics are
        differentiated too (docs/maths.md §9, "Dropout and batch norm").

    Notes
    -----
    The run is re-trained as recorded: same ``theta_0``, batches, weights ``w_{s,k}``, gradient
    scales ``c_s`` (held fixed, so gradient clipping is differentiated as a constant scale) and
    per-step coefficients of the schedule.
    """

    _config_model: ClassVar[type[CounterfactualConfig]] = CounterfactualConfig

    def __init__(self, *, target: Any = None, checkpoint_every: int | None = None, steps: Any = None,
                 test_chunk_size: int | None = None, chunk_size: int | None = 256, device: str = "auto",
                 dtype: str = "float64"):
        self.target = target
        self.checkpoint_every = checkpoint_every
        self.steps = steps
        self.test_chunk_size = test_chunk_size
        self.chunk_size = chunk_size
        self.device = device
        self.dtype = dtype

    def fit(self, traj: Any, y: Any = None) -> CounterfactualEstimator:
        """Validate the parameters, the trajectory and its adapter's pure update; returns ``self``."""
        from ..plugins import get_entry, list_entries

        name = type(self).__name__
        config = self._validated_config()
        if not isinstance(traj, Trajectory):
            raise ConfigError(f"{name}.fit expects an explaind.Trajectory (from TrajectoryRecorder(...).trajectory "
                              f"or Trajectory.load(path)); got {type(traj).__name__}.")
        if int(traj.n_steps) < 1:
            raise ConfigError(f"{name}.fit: the trajectory has no recorded steps; record at least one optimizer step.")
        if not traj.has_updates:
            raise ConfigError(f"{name}.fit: {traj!r} has no record of each step's batches and optimizer state, which "
                              f"the metagradient replays; record the run with TrajectoryRecorder.")
        check_recorded_model(traj, name)
        adapter = traj.manifest.adapter
        try:
            record = get_entry("optimizer_adapter", str(adapter))
        except UnknownEntryError as exc:
            raise ConfigError(f"{name}.fit: the run's optimizer adapter {adapter!r} is not registered: {exc}") from None
        if getattr(record, "update_fn", None) is None:
            pure = [n for n in list_entries("optimizer_adapter")
                    if getattr(get_entry("optimizer_adapter", n), "update_fn", None) is not None]
            raise ConfigError(
                f"{name}.fit: the optimizer adapter {adapter!r} has no update_fn (its update as a pure function of "
                f"the optimizer state and the gradient), which the reverse sweep differentiates. Allowed: adapters "
                f"with update_fn (registered now: {', '.join(pure)}). Fix: add update_fn to the "
                f"adapter's OptimizerAdapterRecord (docs/optimizers.md, 'Pure updates'), or use InfluenceEstimator."
            )
        try:
            pure = record.update_fn(traj.manifest.adapter_hyperparameters)
        except ConfigError as exc:
            raise ConfigError(f"{name}.fit: {exc}") from None
        try:
            start_state(traj, pure, traj.params(0))  # a run recorded from optimizer state: can it start there?
        except ConfigError as exc:
            raise ConfigError(f"{name}.fit: {exc}") from None
        try:
            n_train = int(traj.n_train)
        except Exception as exc:
            raise ConfigError(f"{name}.fit: the counterfactual needs the training data: {exc}") from None
        window = self._window(config.steps, int(traj.n_steps))
        device = self._device(config.device)
        self.window_ = window
        self.config_ = config
        self.trajectory_ = traj
        self.adapter_ = str(adapter)
        self.update_fn_ = pure
        self.device_ = device
        self.dtype_ = resolve_dtype(config.dtype)
        self.n_train_ = n_train
        self.n_steps_ = int(traj.n_steps)
        return self

    def transform(self, X: Any, y: Any = None) -> Attribution:
        r""":math:`\tau_k(x)` for inputs ``X`` (``y`` for ``target="loss"``), axes ``("test", "train", "output")``."""
        self._check_fitted()
        cfg, traj, name = self.config_, self.trajectory_, type(self).__name__
        fm = FunctionalModel(traj.model, traj.constants(), traj.loss.implementation, self.device_, self.dtype_,
                             traj.generators)
        if X is None:
            raise ConfigError(f"{name}: X is None; pass test inputs of shape (n, ...).")
        try:
            Xt = fm.cast(torch.as_tensor(X))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{name}: X of type {type(X).__name__} cannot be turned into a tensor ({exc}); pass a "
                              f"tensor or array of test inputs of shape (n, ...).") from None
        if Xt.dim() == 0 or Xt.shape[0] == 0:
            raise ConfigError(f"{name}: X must hold at least one input along its first axis; got shape "
                              f"{tuple(Xt.shape)}.")
        if cfg.target == "loss" and y is None:
            raise ConfigError(f"{name}: target='loss' explains the test loss and needs the test targets: call "
                              f"transform(X, y).")
        names = tuple(traj.param_names)
        replay = Replay(traj, fm, self.update_fn_, cfg.chunk_size)
        start, stop = self.window_
        # (theta_s, beta_s): the buffers the run changed (batch-norm running statistics) at the window's ends
        beta_stop, theta_stop = replay.buffers(stop), replay.theta(stop)
        at_start, at_stop = {**replay.buffers(start), **replay.theta(start)}, {**beta_stop, **theta_stop}
        probe_inputs(name, fm, at_start, Xt)
        replay.reversed_sites = reversed_sites(name, fm, at_start, names, Xt[:1])
        jacobian = output_jacobian(replay.reversed_sites)
        explained = Explained.build(fm, at_start, Xt, cfg.target, y, name)
        T, O = Xt.shape[0], explained.n_outputs
        chunk = T if cfg.test_chunk_size is None else cfg.test_chunk_size
        parts = []
        for lo in range(0, T, chunk):
            sl = slice(lo, min(T, lo + chunk))
            lam, lam_beta = output_cotangents(fm, explained.take(sl), theta_stop, Xt[sl], beta_stop, replay.stats,
                                              replay.spectral, jacobian)
            tau = counterfactual_sweep(replay, lam, self.n_train_, cfg.checkpoint_every, start, stop, lam_beta)
            parts.append(tau.reshape(-1, O, self.n_train_).permute(0, 2, 1))
        values = torch.cat(parts).detach().cpu()
        self.replay_residual_ = float(replay.max_residual)
        logger.info("%s: replay residual %.2e over steps %d-%d", name, self.replay_residual_, start, stop - 1)
        with torch.no_grad():
            initial = explained(fm, at_start, Xt, explained.aux).detach().cpu()
            final = explained(fm, at_stop, Xt, explained.aux).detach().cpu()
        zeros = torch.zeros(T, O, dtype=values.dtype)
        coords = {"test": np.arange(T), "train": np.arange(self.n_train_),
                  "output": np.arange(O) if explained.kind == "outputs" else [explained.kind]}
        meta = {"estimator": name, "kind": "counterfactual", "additive": False, "target_kind": explained.kind,
                "window": [start, stop], "adapter": self.adapter_, "replay_residual": self.replay_residual_,
                "checkpoint_every": cfg.checkpoint_every, "chunk_size": cfg.chunk_size}
        layout = ParamLayout.from_tensors(traj.params(0), names)
        att = Attribution(axes=("test", "train", "output"), values=values, initial=initial, final=final,
                          regularization=zeros, residual=zeros.clone(), quadrature_error=zeros.clone(),
                          coords=coords, layout=layout, meta=meta)
        check_finite(att, name, METAGRADIENT_TERMS)
        return att


def reversed_sites(name: str, fm: FunctionalModel, point: dict[str, torch.Tensor], names: tuple[str, ...],
                   x: torch.Tensor) -> tuple[str, ...]:
    """The custom Functions and gradient hooks of a model whose backward is not the derivative of its forward (the
    dot-product test of explaind/kernel/adjoint.py at ``point`` and ``x``; ``()`` for an ordinary model). On such a
    model (a gradient reversal layer) the counterfactual takes its test gradients and curvature terms in forward
    mode (:mod:`explaind.kernel.metagrad_forward`) and says so in a log line."""
    sites = find_jumps(fm.module, lambda p: fm(p, x), point, names)
    found, gap = reversed_backward(lambda p: fm(p, x), point, names, sites, fm.dtype)
    if found:
        logger.warning(
            "%s: the model's backward is not the derivative of its forward (%s; the dot-product test u.(Jv) = (u'J).v "
            "misses by %.2g of its size), as for a gradient reversal layer: the test gradients are taken in forward "
            "mode (torch.func.jacfwd) and each step's curvature term J_s^T g from forward-mode columns of its "
            "gradient (one JVP per parameter entry and step, so the cost grows with the parameters); the training "
            "samples' gradients keep the backward, which the optimizer applied (docs/maths.md §9).", name,
            "; ".join(found[:4]), gap)
    return tuple(found)
