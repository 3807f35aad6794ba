r"""ExPLAIND parameter-wise influence as a pruning score (Eichin et al., 2025).

With the influence atoms :math:`\psi(s, p, k, x, o) = \varphi_s(x)[o, p]\, D_{s,k}[p]` of the
recorded run (DESIGN §2), the score of coordinate :math:`p` over an evaluation set :math:`X` is

.. math::

    S_p = \sum_{x \in X} \sum_{o} \Big| \sum_{s} \sum_{k} \psi(s, p, k, x, o) \Big| ,

the absolute value taken after summing over training steps and samples and before summing over
inputs and outputs: the total contribution of :math:`p` to every output of every evaluation
input, counted whatever its sign.

Two backends compute it:

``"engine"``
    :class:`explaind.InfluenceEstimator` with ``keep=("param",)``: its attribution values of
    shape ``(T, D, O)`` are :math:`\sum_s\sum_k \psi`, the data part of the updates.
``"path"``
    a direct path integral over the whole update,
    :math:`\sum_s \big(\int_0^1 \nabla_\theta f(x; \theta_s + t\Delta\theta_s)\,dt\big)[o, p]\,
    \Delta\theta_s[p]`, with a Gauss–Legendre rule of ``quadrature_nodes`` nodes per step and
    per-example Jacobians (``torch.func``). It needs only the recorded parameters. Its sum over
    :math:`p` telescopes to :math:`f(x;\theta_N) - f(x;\theta_0)` up to the quadrature error. It
    counts the whole update :math:`\Delta\theta_s`, so it equals the engine's data-part score
    when the run has no weight decay and a zero residual (e.g. SGD with momentum, the paper's
    setting); otherwise the regularization and residual parts are included.

``"auto"`` (default) uses the path backend when both compute the same quantity: every step has
no weight decay (:math:`\lambda^c = \lambda^d = 0`) and an audited relative residual
(``trajectory.audit()``) of at most ``1e-4``; otherwise the engine (the path backend when the
engine is not installed). The fitted attribute ``backend_`` says which one ran.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import PositiveInt
from torch import Tensor, nn

from explaind.config import resolve_device, resolve_dtype
from explaind.exceptions import ConfigError, TrajectoryError
from explaind.pruning import PruningConfig, PruningStrategy, as_batch

from ._path import path_chunks

__all__ = ["ExplaindScoreConfig", "ExplaindPruning", "path_contributions", "scores_from_attribution_values"]


class ExplaindScoreConfig(PruningConfig):
    """Options of :class:`ExplaindPruning`.

    Attributes
    ----------
    backend : {"auto", "engine", "path"}
        Which computation to use (see the module documentation).
    quadrature_nodes : int
        Gauss–Legendre nodes per step of the path backend.
    jacobian : {"factored", "vmap"}
        How the path backend gets per-example gradients (see ``explaind_pruning._path``): factored
        ``nn.Linear`` gradients contracted in blocks of steps (fast), or ``torch.func`` Jacobians.
    batch_size : int or None
        Evaluation inputs per chunk; memory ``batch_size * O * D`` numbers. ``None``: as many as fit
        in :data:`explaind_pruning._path.CHUNK_ELEMENTS` numbers (the whole set for small models).
    device : str
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    dtype : {"float32", "float64"} or None
        Computation dtype (default: the trajectory's).
    engine_options : dict or None
        Extra keyword arguments for :class:`explaind.InfluenceEstimator` (engine backend).
    """

    backend: Literal["auto", "engine", "path"] = "auto"
    quadrature_nodes: PositiveInt = 4
    jacobian: Literal["factored", "vmap"] = "factored"
    batch_size: PositiveInt | None = None
    device: str = "auto"
    dtype: Literal["float32", "float64"] | None = None
    engine_options: dict[str, Any] | None = None


class ExplaindPruning(PruningStrategy):
    r"""Parameter-wise ExPLAIND influence :math:`\sum_x\sum_o|\sum_s\sum_k\psi(s,p,k,x,o)|`.

    ``fit(model, X_eval, trajectory)``: ``model`` is the trained model (the last state of
    ``trajectory``), ``X_eval`` the evaluation inputs (targets are ignored).

    Parameters
    ----------
    backend : {"auto", "engine", "path"}
    quadrature_nodes : int
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

    def __init__(self, *, backend: str = "auto", quadrature_nodes: int = 4, jacobian: str = "factored",
                 batch_size: int | None = None,
                 device: str = "auto", dtype: str | None = None, engine_options: dict[str, Any] | None = None,
                 sparsity: float = 0.9, scope: str = "global", exclude: Iterable[str] = (),
                 granularity: str = "unstructured", prune_biases: bool = False, random_state: int | None = None):
        self.backend = backend
        self.quadrature_nodes = quadrature_nodes
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
            backend = "path" if _engine() is None or _update_is_data(trajectory) else "engine"
        self.backend_ = backend
        if backend == "engine":
            return _engine_scores(cfg, trajectory, X)
        total = {n: torch.zeros(tuple(p.shape), dtype=torch.float64, device=device)
                 for n, p in trajectory.params(trajectory.n_steps).items()}
        chunks = path_chunks(trajectory, X, nodes=cfg.quadrature_nodes, batch_size=cfg.batch_size, device=device,
                             dtype=dtype, method=cfg.jacobian)
        for chunk in chunks:
            for name, a in chunk.items():
                total[name] += a.abs().sum(dim=(0, 1)).to(torch.float64)
        return total


# ---------------------------------------------------------------------- engine backend
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


def _engine() -> Any:
    """``explaind.InfluenceEstimator`` when the engine is installed, else ``None``."""
    import explaind

    try:
        return explaind.InfluenceEstimator
    except (ImportError, AttributeError):
        return None


def scores_from_attribution_values(values: Any, names: Iterable[str], shapes: Iterable[tuple[int, ...]]) -> dict:
    r"""Reduce parameter-wise attribution values ``(T, D, O)`` to per-tensor scores.

    ``values[x, p, o]`` is :math:`\sum_s\sum_k\psi(s,p,k,x,o)` with ``p`` the flat coordinate over
    the tensors ``names`` (concatenated in order, each flattened row-major). Returns
    ``{name: sum_x sum_o |values[x, p, o]|}`` reshaped to each tensor's shape (float64, CPU).
    """
    v = torch.as_tensor(np.asarray(values) if not isinstance(values, Tensor) else values)
    names, shapes = list(names), [tuple(s) for s in shapes]
    sizes = [int(np.prod(s)) for s in shapes]
    if v.dim() != 3 or v.shape[1] != sum(sizes):
        raise TrajectoryError(
            f"parameter-wise attribution values must have shape (T, D={sum(sizes)}, O); got {tuple(v.shape)}. "
            f"Use InfluenceEstimator(keep=('param',))."
        )
    flat = v.abs().sum(dim=(0, 2)).to(device="cpu", dtype=torch.float64)
    out, offset = {}, 0
    for name, shape, size in zip(names, shapes, sizes):
        out[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return out


def _engine_scores(cfg: ExplaindScoreConfig, trajectory: Any, X: Tensor) -> dict[str, Tensor]:
    estimator_cls = _engine()
    if estimator_cls is None:
        raise ConfigError(
            "ExplaindPruning(backend='engine') needs explaind.InfluenceEstimator, which is not available in this "
            "installation. Use backend='path' (or 'auto')."
        )
    options = dict(cfg.engine_options or {})
    options.setdefault("device", cfg.device)
    if cfg.dtype is not None:
        options.setdefault("dtype", cfg.dtype)
    estimator = estimator_cls(keep=("param",), **options).fit(trajectory)
    final = trajectory.params(trajectory.n_steps)
    names = list(trajectory.param_names)
    shapes = [tuple(final[n].shape) for n in names]
    total = {n: torch.zeros(s, dtype=torch.float64) for n, s in zip(names, shapes)}
    step = cfg.batch_size or X.shape[0]
    for start in range(0, X.shape[0], step):
        attribution = estimator.transform(X[start:start + step])
        if tuple(attribution.axes) != ("test", "param", "output"):
            raise TrajectoryError(
                f"InfluenceEstimator(keep=('param',)) returned axes {attribution.axes}; expected "
                f"('test', 'param', 'output')."
            )
        part = scores_from_attribution_values(attribution.torch(), names, shapes)
        for n in names:
            total[n] += part[n]
    return total


# ---------------------------------------------------------------------- path backend
def _check_model_matches(model: nn.Module, trajectory: Any) -> None:
    final = trajectory.params(trajectory.n_steps)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if list(named) != list(trajectory.param_names):
        raise TrajectoryError(
            f"the model's trainable parameters {list(named)} differ from the trajectory's "
            f"{list(trajectory.param_names)}; pass the model the trajectory was recorded from."
        )
    for name, p in named.items():
        ref = final[name].to(device=p.device, dtype=p.dtype)
        if p.shape != ref.shape or not torch.allclose(p.detach(), ref, rtol=1e-4, atol=1e-6):
            raise TrajectoryError(
                f"parameter {name!r} of the model differs from the trajectory's final state theta_N; pass the "
                f"trained model (e.g. load trajectory.params(trajectory.n_steps) into it)."
            )


def path_contributions(trajectory: Any, X: Tensor, *, quadrature_nodes: int = 4, batch_size: int | None = None,
                       device: str = "cpu", dtype: str | None = None, jacobian: str = "factored") -> dict[str, Tensor]:
    r"""Signed per-coordinate contributions of the path backend, ``(T, O, *param_shape)`` per tensor.

    ``A[x, o, p] = sum_s (int_0^1 grad_theta f(x; theta_s + t Delta theta_s) dt)[o, p] * Delta theta_s[p]``
    with a Gauss–Legendre rule; summing ``A`` over ``p`` gives ``f(x; theta_N) - f(x; theta_0)`` up
    to the quadrature error. Memory ``T * O * D`` numbers (for inspection and tests; the strategy
    reduces chunk by chunk).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, default=trajectory.dtype)
    X = X.to(device=dev, dtype=dt) if X.is_floating_point() else X.to(dev)
    parts = list(path_chunks(trajectory, X, nodes=quadrature_nodes, batch_size=batch_size, device=dev, dtype=dt,
                             method=jacobian))
    return {n: torch.cat([p[n] for p in parts]) for n in trajectory.param_names}
