r"""The exact path-kernel replica of a trained model.

.. math::

    \hat f(x) = f(x; \theta_{start}) + \sum_{s=start}^{stop-1} \varphi_s(x)\,\Delta\theta_s,
    \qquad \varphi_s(x) = \int_0^1 \nabla_\theta f(x; \theta_s + t\Delta\theta_s)\,dt

(docs/maths.md §2). The telescoping sum is exact; only the 1-D integral is approximated, and each
:math:`\varphi_s(x)\Delta\theta_s` is computed with forward-mode JVPs at the quadrature nodes, so a
prediction costs about (nodes per step) x (steps) forward passes: no per-sample gradients, no
Jacobians.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..exceptions import ConfigError, ExplaindWarning
from ..kernel.planning import window_plans
from ..kernel.shard import gather_rows, shard_rows, world
from ..outputs import model_output
from ._path import PathConfig, PathEstimator
from .base import batching_errors

__all__ = ["KernelReplica", "KernelReplicaConfig"]


class KernelReplicaConfig(PathConfig):
    """Validated parameters of :class:`KernelReplica` (same fields as its ``__init__``)."""


class KernelReplica(PathEstimator):
    r"""Kernel-machine replica of a recorded training run.

    Parameters
    ----------
    quadrature : {"adaptive", "gauss-legendre", "midpoint", "left"}
        Rule for the path integral (see :mod:`explaind.kernel.quadrature`); ``"left"`` with one
        node is the TracIn limit (the gradient at :math:`\theta_s` only; docs/maths.md §2).
    nodes : int, optional
        Nodes per step (``"gauss-legendre"``: default 4; ``"midpoint"``: default 100; ``"left"``:
        default 1) or per panel (``"adaptive"``: default 4).
    tol : float
        Relative error target of the adaptive rule per step and test input.
    steps : (int, int or None), optional
        Window ``(start, stop)`` of steps; the replica starts from :math:`f(x;\theta_{start})`
        and approximates :math:`f(x;\theta_{stop})`. Default: the whole run.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    dtype : {"float64", "float32"}
        Compute dtype.
    chunk_size : int or None
        (input, node) pairs per ``vmap`` call (16 times as many rows per batch on the factored path).
    factored : {"auto", "always", "never"}
        When every trainable parameter lies in an ``nn.Linear`` or ``nn.Embedding``, evaluate all
        (step, input, node) rows of many steps as one batch through layers that are affine in their
        parameters, with no parameter copy per row (:mod:`explaind.kernel.layers`), after a start-up
        check against the generic path. ``"auto"``: when it applies; ``"always"``: raise
        :class:`~explaind.exceptions.ConfigError` when it does not; ``"never"``: ``vmap`` over
        per-row parameters. Same results to rounding.
    progress : bool
        Progress bar over steps.
    distributed : {"auto", "off"}
        ``"auto"``: inside an initialised ``torch.distributed`` process group of several processes,
        ``predict`` and ``score`` split the test inputs over them and gather the replica (the same
        numbers as one process); ``fidelity_report`` always runs on all inputs.

    Attributes
    ----------
    trajectory_ : Trajectory
        The fitted run (a reference, not a copy).
    window_ : (int, int)
        Resolved ``(start, stop)``.
    n_steps_, n_params_ : int
        Steps recorded and trainable coordinates ``D``.
    """

    _config_model: ClassVar[type[KernelReplicaConfig]] = KernelReplicaConfig

    def __init__(self, *, quadrature: str = "adaptive", nodes: int | None = None, tol: float = 1e-7,
                 steps: tuple[int, int | None] | None = None, device: str = "auto", dtype: str = "float64",
                 chunk_size: int | None = 256, factored: str = "auto", progress: bool = False,
                 distributed: str = "auto"):
        self.quadrature = quadrature
        self.nodes = nodes
        self.tol = tol
        self.steps = steps
        self.device = device
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.factored = factored
        self.progress = progress
        self.distributed = distributed

    def fit(self, traj: Any, y: Any = None) -> KernelReplica:
        """Validate the parameters and attach the trajectory ``traj``; returns ``self``."""
        self._fit_common(traj)
        return self

    # ------------------------------------------------------------------ evaluation
    def _run(self, X: Any) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
        self._check_fitted()
        return self._replicate(self._inputs(X))

    def _sharded(self, X: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Replica and ``g(theta_stop)`` of all inputs, each process computing its shard (``distributed="auto"``)."""
        self._check_fitted()
        Xt = self._inputs(X)
        rank, size = world() if self.config_.distributed == "auto" else (0, 1)
        if size == 1:
            replica, g_stop, _ = self._replicate(Xt)
            return replica, g_stop
        rows, counts = shard_rows(Xt.shape[0], rank, size)
        replica, g_stop, _ = self._replicate(Xt[rows])
        return gather_rows(replica, counts), gather_rows(g_stop, counts)

    def _replicate(self, Xt: Any) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
        engine = self.engine_
        explained = engine.explained(Xt, None, None, type(self).__name__)
        cfg = self.config_
        with batching_errors(type(self).__name__, self.trajectory_.model):
            g_start, g_stop, plans, buffers = window_plans(engine, Xt, explained, self.window_, cfg.quadrature,
                                                           cfg.nodes, cfg.tol, with_estimate=True)
        replica = g_start + sum(p.estimate for p in plans) + (0 if buffers is None else buffers.sum(1))
        return replica, g_stop, plans

    def predict(self, X: Any) -> np.ndarray:
        r"""Replica outputs :math:`f(x;\theta_{start}) + \sum_s \varphi_s(x)\Delta\theta_s`, shape ``(n, O)``."""
        replica, _ = self._sharded(X)
        return replica.detach().cpu().numpy()

    def score(self, X: Any, y: Any = None) -> float:
        r"""Agreement of the replica with the model.

        Without ``y``: the fraction of inputs whose replica arg-max output equals the arg-max of
        the trained model :math:`f(x;\theta_{stop})`. With ``y``: the replica's accuracy on ``y``.
        """
        replica, g_stop = self._sharded(X)
        pred = replica.argmax(-1).cpu()
        ref = g_stop.argmax(-1).cpu() if y is None else torch.as_tensor(np.asarray(y)).reshape(-1).cpu()
        return float((pred == ref).double().mean())

    def fidelity_report(self, X: Any, model: nn.Module | None = None) -> dict[str, Any]:
        r"""How faithful the replica is on ``X``.

        Returns
        -------
        dict
            ``steps`` (S,): step numbers; ``quadrature_error`` (S,): max over inputs and outputs of
            ``|exact - estimate|`` per step; ``relative_quadrature_error`` (S,): the same divided
            by the largest ``|g(theta_{s+1}) - g(theta_s)|`` of the step; ``evals_per_step`` (S,):
            mean evaluations per input; ``total_evals``; ``max_abs_error`` and ``max_rel_error``
            of the replica against :math:`f(x;\theta_{stop})` (relative to ``max |f|``);
            ``argmax_agreement``; ``kl_divergence``: mean
            ``KL(softmax(f(x;theta_stop)) || softmax(replica))``. With ``model`` (the user's
            trained model, run in evaluation mode with its own buffers, e.g. final BatchNorm
            statistics): ``model_max_rel_error`` and ``model_argmax_agreement`` of the replica
            against it, and ``model_vs_recorded``, the largest relative difference between it and
            :math:`f(x;\theta_{stop})` — above rounding level (a warning says so) the recorded run
            does not end in that model, and the replica explains the recorded one.
        """
        replica, g_stop, plans = self._run(X)
        errs = torch.stack([(p.exact - p.estimate).abs().amax() for p in plans])
        scale = torch.stack([p.exact.abs().amax() for p in plans])
        evals = torch.stack([p.evals.double().mean() for p in plans])
        diff = (replica - g_stop).abs()
        log_p = torch.log_softmax(g_stop.double(), -1)
        log_q = torch.log_softmax(replica.double(), -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        start, stop = self.window_
        report = {
            "steps": np.arange(start, stop),
            "quadrature_error": errs.cpu().numpy(),
            "relative_quadrature_error": (errs / scale.clamp_min(torch.finfo(scale.dtype).tiny)).cpu().numpy(),
            "evals_per_step": evals.cpu().numpy(),
            "total_evals": int(sum(int(p.evals.sum()) for p in plans)),
            "max_abs_error": float(diff.max()),
            "max_rel_error": _rel(replica, g_stop),
            "argmax_agreement": float((replica.argmax(-1) == g_stop.argmax(-1)).double().mean()),
            "kl_divergence": max(float(kl), 0.0),
        }
        if model is not None:
            report.update(self._against_model(model, X, replica, g_stop))
        return report

    def _against_model(self, model: nn.Module, X: Any, replica: torch.Tensor,
                       g_stop: torch.Tensor) -> dict[str, float]:
        """The replica against the user's model in evaluation mode (its mode is restored)."""
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        Xt = torch.as_tensor(X).to(device)
        if Xt.is_floating_point() and first is not None:
            Xt = Xt.to(first.dtype)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model_output(model(Xt))
        finally:
            model.train(was_training)
        out = out.reshape(out.shape[0], -1).to(device=replica.device, dtype=replica.dtype)
        if out.shape != replica.shape:
            raise ConfigError(f"{type(self).__name__}.fidelity_report: the model returns {tuple(out.shape)} outputs "
                              f"for X, the replica {tuple(replica.shape)}; pass the model the trajectory was recorded "
                              f"from.")
        drift = _rel(out, g_stop)
        if drift > (1e-6 if replica.dtype == torch.float64 else 1e-3):
            warnings.warn(f"{type(self).__name__}.fidelity_report: the model differs from the recorded final state by "
                          f"{drift:.3g} (relative) on X: its buffers or parameters are not those of the recorded run's "
                          f"last step (the model was changed after recording, or the run was recorded before "
                          f"buffers such as BatchNorm running statistics were recorded per step). The replica "
                          f"reproduces the recorded run.", ExplaindWarning,
                          stacklevel=3)
        return {"model_max_rel_error": _rel(replica, out), "model_argmax_agreement":
                float((replica.argmax(-1) == out.argmax(-1)).double().mean()), "model_vs_recorded": drift}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(b.dtype).tiny))
