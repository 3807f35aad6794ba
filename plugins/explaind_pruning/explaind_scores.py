r"""ExPLAIND parameter-wise influence as a pruning score (Eichin et al., 2025).

With the influence atoms :math:`\psi(s, p, k, x, o) = \varphi_s(x)[o, p]\, D_{s,k}[p]` of the
recorded run (docs/maths.md §5), the score of coordinate :math:`p` over an
evaluation set :math:`X` is

.. math::

    S_p = \sum_{x \in X} \sum_{o} \Big| \sum_{s} \sum_{k} \psi(s, p, k, x, o) \Big| ,

the absolute value taken after summing over training steps and samples and before summing over
inputs and outputs: the total contribution of :math:`p` to every output of every evaluation
input, counted whatever its sign. Both backends are :class:`explaind.InfluenceEstimator` with
``keep=("param",)``, reduced by :func:`explaind.scores.parameter_influence`:

``"engine"``
    the data part of the updates, :math:`\sum_s\sum_k \psi` (``split=True``; options from
    ``engine_options``).
``"path"``
    the whole update, :math:`\sum_s \varphi_s(x)[o, p]\,\Delta\theta_s[p]` (``split=False``), with the
    path-integral rule ``quadrature`` (default a Gauss–Legendre rule of ``quadrature_nodes`` nodes per
    step; ``"adaptive"``: panels of ``quadrature_nodes`` nodes refined until every step and input is
    within ``tol`` of its exact change, as ``explaind prune`` uses). It reads only the recorded
    parameters; its sum over :math:`p` telescopes to :math:`f(x;\theta_N) - f(x;\theta_0)` up to the
    quadrature error. It equals the engine's score when the run has no weight decay and a zero
    residual (e.g. SGD with momentum, the paper's setting); otherwise the regularization and
    residual parts are included.

``"auto"`` (default) uses the path backend when both compute the same quantity: every step has
no weight decay (:math:`\lambda^c = \lambda^d = 0`) and an audited relative residual
(``trajectory.audit()``) of at most ``1e-4``; otherwise the engine. The fitted attribute
``backend_`` says which one ran.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

import explaind
from explaind.config import resolve_device, resolve_dtype
from explaind.exceptions import TrajectoryError
from explaind.pruning import PruningConfig, PruningStrategy, as_batch
from explaind.scores import parameter_influence

__all__ = ["ExplaindScoreConfig", "ExplaindPruning", "path_contributions", "CHUNK_ELEMENTS"]

#: Default bound on ``B * O * D``, the signed contributions of one chunk of evaluation inputs (numbers).
CHUNK_ELEMENTS = 2**25


class ExplaindScoreConfig(PruningConfig):
    """Options of :class:`ExplaindPruning`.

    Attributes
    ----------
    backend : {"auto", "engine", "path"}
        Which computation to use (see the module documentation).
    quadrature : {"gauss-legendre", "adaptive", "midpoint", "left"}
        Path-integral rule of the path backend (:class:`explaind.InfluenceEstimator`'s ``quadrature``).
    quadrature_nodes : int
        Nodes per step of the path backend's rule (per panel for ``"adaptive"``).
    tol : float or None
        Relative tolerance per step and input of ``"adaptive"`` (``None``: the estimator's default);
        refused with another rule.
    jacobian : {"factored", "vmap"}
        How the path backend forms the Jacobians: the engine's layer-factored evaluator where it
        applies (``factored="auto"``), or ``torch.func`` only (``factored="never"``).
    batch_size : int or None
        Evaluation inputs per chunk; memory ``batch_size * O * D`` numbers. ``None``: as many as fit
        in :data:`CHUNK_ELEMENTS` numbers (the whole set for small models).
    device : str
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    dtype : {"float32", "float64"} or None
        Computation dtype (default: the trajectory's).
    engine_options : dict or None
        Extra keyword arguments for :class:`explaind.InfluenceEstimator` (engine backend).
    """

    backend: Literal["auto", "engine", "path"] = "auto"
    quadrature: Literal["gauss-legendre", "adaptive", "midpoint", "left"] = "gauss-legendre"
    quadrature_nodes: PositiveInt = 4
    tol: float | None = Field(default=None, gt=0.0, lt=1.0)
    jacobian: Literal["factored", "vmap"] = "factored"
    batch_size: PositiveInt | None = None
    device: str = "auto"
    dtype: Literal["float32", "float64"] | None = None
    engine_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _tol_needs_adaptive(self) -> ExplaindScoreConfig:
        if self.tol is not None and self.quadrature != "adaptive":
            raise ValueError(f"tol={self.tol:g} is the adaptive rule's tolerance, but quadrature={self.quadrature!r}; "
                             f"pass quadrature='adaptive' with it, or drop tol")
        return self


class ExplaindPruning(PruningStrategy):
    r"""Parameter-wise ExPLAIND influence :math:`\sum_x\sum_o|\sum_s\sum_k\psi(s,p,k,x,o)|`.

    ``fit(model, X_eval, trajectory)``: ``model`` is the trained model (the last state of
    ``trajectory``), ``X_eval`` the evaluation inputs (targets are ignored).

    Parameters
    ----------
    backend : {"auto", "engine", "path"}
    quadrature : {"gauss-legendre", "adaptive", "midpoint", "left"}
    quadrature_nodes : int
    tol : float or None
    jacobian : {"factored", "vmap"}
    batch_size : int
    device : str
    dtype : {"float32", "float64"} or None
    engine_options : dict or None
    sparsity, scope, exclude, granularity, prune_biases, random_state
        See :class:`explaind.pruning.PruningConfig` (``random_state`` is unused).
    """

    _config_model = ExplaindScoreConfig
    needs_data = True
    needs_trajectory = True

    def __init__(self, *, backend: str = "auto", quadrature: str = "gauss-legendre", quadrature_nodes: int = 4,
                 tol: float | None = None, jacobian: str = "factored", batch_size: int | None = None,
                 device: str = "auto", dtype: str | None = None, engine_options: dict[str, Any] | None = None,
                 sparsity: float = 0.9, scope: str = "global", exclude: Iterable[str] = (),
                 granularity: str = "unstructured", prune_biases: bool = False, random_state: int | None = None):
        self.backend = backend
        self.quadrature = quadrature
        self.quadrature_nodes = quadrature_nodes
        self.tol = tol
        self.jacobian = jacobian
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.engine_options = engine_options
        self.sparsity = sparsity
        self.scope = scope
        self.exclude = exclude
        self.granularity = granularity
        self.prune_biases = prune_biases
        self.random_state = random_state

    def _score(self, cfg: ExplaindScoreConfig, model: nn.Module, data: Any, trajectory: Any) -> dict[str, Tensor]:
        _check_model_matches(model, trajectory)
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, default=trajectory.dtype)
        X, _ = as_batch(data, needs_targets=False, owner="ExplaindPruning.fit", device=device, dtype=dtype)
        backend = cfg.backend
        if backend == "auto":
            backend = "path" if _update_is_data(trajectory) else "engine"
        self.backend_ = backend
        estimator = _estimator(cfg, backend, trajectory).fit(trajectory)
        total = {n: torch.zeros(tuple(p.shape), dtype=torch.float64)
                 for n, p in trajectory.params(trajectory.n_steps).items()}
        for lo, hi in _chunks(trajectory, X, cfg.batch_size):
            for name, score in parameter_influence(estimator.transform(X[lo:hi])).items():
                total[name] += score.to(torch.float64)
        return total


#: Largest audited relative residual for which ``backend="auto"`` treats the update as all data.
AUTO_RESIDUAL_TOL = 1e-4


def _update_is_data(trajectory: Any) -> bool:
    """Whether every update is its data part: no weight decay and a measured, negligible residual."""
    audit = np.asarray(trajectory.audit(), dtype=np.float64)
    if audit.size == 0 or not np.all(np.isfinite(audit)) or float(audit.max()) > AUTO_RESIDUAL_TOL:
        return False
    for s in range(trajectory.n_steps):
        for update in trajectory.updates(s).values():
            for value in (update.lambda_c, update.lambda_d):
                if float(torch.as_tensor(value).abs().max()) != 0.0:
                    return False
    return True


def _dtype_name(dtype: str | None, trajectory: Any) -> str:
    return str(resolve_dtype(dtype, default=trajectory.dtype)).replace("torch.", "")


def _estimator(cfg: ExplaindScoreConfig, backend: str, trajectory: Any) -> Any:
    """The :class:`explaind.InfluenceEstimator` of ``backend`` (``keep=("param",)``)."""
    if backend == "path":
        rule = {} if cfg.tol is None else {"tol": cfg.tol}
        return explaind.InfluenceEstimator(
            keep=("param",), split=False, quadrature=cfg.quadrature, nodes=cfg.quadrature_nodes, **rule,
            factored="auto" if cfg.jacobian == "factored" else "never", device=cfg.device,
            dtype=_dtype_name(cfg.dtype, trajectory))
    options = dict(cfg.engine_options or {})
    options.setdefault("device", cfg.device)
    if cfg.dtype is not None:
        options.setdefault("dtype", cfg.dtype)
    return explaind.InfluenceEstimator(keep=("param",), **options)


def _chunks(trajectory: Any, X: Tensor, batch_size: int | None) -> list[tuple[int, int]]:
    """``(lo, hi)`` chunks of the evaluation inputs: ``batch_size`` each, or ``B * O * D <= CHUNK_ELEMENTS``."""
    if batch_size is None:
        params = trajectory.params(0)
        with torch.no_grad():
            out = torch.func.functional_call(trajectory.model, {**trajectory.constants(), **params},
                                             (X[:1].to(trajectory.dtype) if X.is_floating_point() else X[:1],))
        size = sum(int(v.numel()) for v in params.values())
        batch_size = max(1, min(X.shape[0], CHUNK_ELEMENTS // max(1, int(out.numel()) * size)))
    return [(lo, min(X.shape[0], lo + batch_size)) for lo in range(0, X.shape[0], batch_size)]


# ---------------------------------------------------------------------- path backend
def _check_model_matches(model: nn.Module, trajectory: Any) -> None:
    final = trajectory.params(trajectory.n_steps)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(named) != set(trajectory.param_names):  # by name: torch's prune.remove re-registers in another order
        recorded = set(trajectory.param_names)
        missing, extra = sorted(recorded - set(named)), sorted(set(named) - recorded)
        raise TrajectoryError(
            f"the model's trainable parameters differ from the trajectory's: missing {missing}, not recorded "
            f"{extra}; pass the model the trajectory was recorded from."
        )
    for name, p in named.items():
        ref = final[name].to(device=p.device, dtype=p.dtype)
        if p.shape != ref.shape or not torch.allclose(p.detach(), ref, rtol=1e-4, atol=1e-6):
            raise TrajectoryError(
                f"parameter {name!r} of the model differs from the trajectory's final state theta_N; pass the "
                f"trained model (e.g. load trajectory.params(trajectory.n_steps) into it)."
            )


def path_contributions(trajectory: Any, X: Tensor, *, quadrature_nodes: int = 4, batch_size: int | None = None,
                       device: str = "cpu", dtype: str | None = None, jacobian: str = "factored",
                       quadrature: str = "gauss-legendre", tol: float | None = None) -> dict[str, Tensor]:
    r"""Signed per-coordinate contributions of the path backend, ``(T, O, *param_shape)`` per tensor.

    ``A[x, o, p] = sum_s (int_0^1 grad_theta f(x; theta_s + t Delta theta_s) dt)[o, p] * Delta theta_s[p]``
    with the rule ``quadrature`` (Gauss–Legendre by default; ``tol``: the adaptive rule's tolerance); summing ``A``
    over ``p`` gives ``f(x; theta_N) - f(x; theta_0)`` up
    to the quadrature error. Memory ``T * O * D`` numbers (for inspection and tests; the strategy
    reduces chunk by chunk).
    """
    cfg = ExplaindScoreConfig(quadrature=quadrature, quadrature_nodes=quadrature_nodes, tol=tol, jacobian=jacobian,
                              device=device, dtype=dtype)
    estimator = _estimator(cfg, "path", trajectory).fit(trajectory)
    parts = []
    for lo, hi in _chunks(trajectory, X, batch_size):
        att = estimator.transform(X[lo:hi])
        parts.append(att.unflatten(att.values.permute(0, 2, 1)))  # name -> (T_c, O, *shape)
    return {n: torch.cat([p[n] for p in parts]) for n in trajectory.param_names}
