r"""The base class of pruning strategies.

A pruning strategy is a scikit-learn style estimator. :meth:`PruningStrategy.fit` scores every
coordinate ``p`` of every trainable parameter tensor of a model (higher score = more important,
kept longer); :meth:`PruningStrategy.masks` turns the scores into one boolean mask per
parameter tensor (``True`` = kept) at a requested sparsity, with the thresholding options of
:func:`explaind.pruning.masks.scores_to_masks` (global or per-layer, excluded layers,
unstructured or whole neurons/channels).

Strategies are registered by plugins as :class:`explaind.records.PruningStrategyRecord`
entries (kind ``"pruning_strategy"``) and looked up with
``explaind.get_entry("pruning_strategy", name)``.

Writing a strategy
------------------
Subclass :class:`PruningStrategy`, declare ``_config_model`` (a subclass of
:class:`PruningConfig` whose fields are exactly the ``__init__`` keyword parameters), store
every parameter verbatim in a keyword-only ``__init__`` and implement
:meth:`PruningStrategy._score`. A strategy whose result depends on the target sparsity
(iterative pruning such as SynFlow) also overrides :meth:`PruningStrategy._masks_at`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import StrictModel
from ..estimators.base import ExplaindEstimator
from ..exceptions import ConfigError, NotFittedError
from .masks import Granularity, Scope, check_exclude, prunable_names, scores_to_masks

__all__ = ["PruningConfig", "PruningStrategy", "as_batch", "check_sparsity", "copy_model", "resolve_loss"]


class PruningConfig(StrictModel):
    """Options shared by every pruning strategy.

    Attributes
    ----------
    sparsity : float
        Fraction of the prunable coordinates set to zero by :meth:`PruningStrategy.masks` when
        no sparsity is passed there, ``0 <= sparsity < 1``.
    scope : {"global", "layer"}
        One threshold across all prunable tensors, or the same sparsity in every tensor.
    exclude : tuple of str
        Parameters never pruned: exact names (``"fc3.weight"``), module prefixes (``"fc3"``) or
        shell-style patterns (``"*.bias"``). Each entry must match at least one parameter.
    granularity : {"unstructured", "neuron"}
        Individual coordinates, or whole output neurons / channels (rows along dimension 0).
    prune_biases : bool
        Whether one-dimensional tensors (biases, norm scales) are prunable in unstructured mode.
    random_state : int or None
        Seed of every random choice the strategy makes (``None``: fresh randomness).
    """

    sparsity: float = Field(0.9, ge=0.0, lt=1.0)
    scope: Scope = "global"
    exclude: tuple[str, ...] = ()
    granularity: Granularity = "unstructured"
    prune_biases: bool = False
    random_state: int | None = None


class PruningStrategy(ExplaindEstimator):
    """Base class: scores per parameter coordinate, masks per parameter tensor.

    Fitted attributes
    -----------------
    scores_ : dict of str to Tensor
        One float64 CPU tensor per trainable parameter, same shape as the parameter, in
        ``model.named_parameters()`` order. Excluded parameters are scored too.
    param_names_ : tuple of str
        Names of the trainable parameters.
    prunable_ : tuple of str
        The parameters the masks may prune (after ``exclude`` and ``prune_biases``).
    masks_ : dict of str to Tensor
        Boolean masks at the configured ``sparsity`` (``True`` = kept).
    """

    _config_model: ClassVar[type[PruningConfig]] = PruningConfig
    _fitted_marker: ClassVar[str] = "scores_"
    #: Whether ``fit`` needs ``data`` (a scoring or evaluation batch).
    needs_data: ClassVar[bool] = False
    #: Whether ``fit`` needs the recorded trajectory of the model.
    needs_trajectory: ClassVar[bool] = False
    #: Whether ``fit`` needs targets in ``data`` (``(X, y)`` rather than ``X``).
    needs_targets: ClassVar[bool] = False

    # ------------------------------------------------------------------ public API
    def fit(self, model: nn.Module, data: Any = None, trajectory: Any = None) -> PruningStrategy:
        """Score every coordinate of every trainable parameter of ``model``.

        Parameters
        ----------
        model : torch.nn.Module
            The trained model; it is not modified.
        data : tuple (X, y) or Tensor, optional
            Scoring / evaluation inputs (and targets for loss-based strategies). Tensors or
            numpy arrays; ``X`` has shape ``(n, *input_shape)``.
        trajectory : explaind.Trajectory, optional
            The recorded training run of ``model`` (strategies that explain training).

        Returns
        -------
        self
        """
        cfg = self._validated_config()
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"{type(self).__name__}.fit: 'model' must be a torch.nn.Module, got {type(model).__name__}. "
                f"Pass the trained model as the first argument."
            )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError(f"{type(self).__name__}.fit: the model has no trainable parameters to prune.")
        shapes = {n: tuple(p.shape) for n, p in named}
        check_exclude(shapes, cfg.exclude)
        if self.needs_data and data is None:
            what = "(X, y) with targets" if self.needs_targets else "X (or (X, y))"
            raise ConfigError(
                f"{type(self).__name__}.fit needs data: pass {what} as the second argument (a scoring batch)."
            )
        if self.needs_trajectory and trajectory is None:
            raise ConfigError(
                f"{type(self).__name__}.fit needs the recorded trajectory of the model: "
                f"fit(model, data, trajectory=explaind.Trajectory.load(path)) or rec.trajectory."
            )
        scores = self._score(cfg, model, data, trajectory)
        self.param_names_ = tuple(n for n, _ in named)
        self.scores_ = self._checked_scores(scores, shapes)
        self.prunable_ = tuple(prunable_names(shapes, cfg.exclude, cfg.prune_biases, cfg.granularity))
        self._fit_config = cfg
        self.masks_ = self._masks_at(cfg.sparsity)
        return self

    def masks(self, sparsity: float | None = None) -> dict[str, Tensor]:
        """Boolean masks (``True`` = kept), one per trainable parameter, at ``sparsity``.

        Parameters
        ----------
        sparsity : float, optional
            Fraction of prunable coordinates removed, ``0 <= sparsity < 1``; defaults to the
            ``sparsity`` the strategy was configured with.

        Returns
        -------
        dict of str to Tensor
            Boolean CPU tensors shaped like the parameters; excluded parameters are all ``True``.
        """
        self._check_fitted()
        if sparsity is None:
            return {k: v.clone() for k, v in self.masks_.items()}
        sparsity = check_sparsity(sparsity, f"{type(self).__name__}.masks")
        return self._masks_at(sparsity)

    def transform(self, model: nn.Module, sparsity: float | None = None) -> nn.Module:
        """A pruned copy of ``model`` (masked coordinates set to zero); ``model`` is not modified."""
        from .apply import apply_masks

        return apply_masks(model, self.masks(sparsity), inplace=False)

    def fit_transform(self, model: nn.Module, data: Any = None, trajectory: Any = None) -> nn.Module:
        """``fit`` then ``transform`` the same model at the configured sparsity."""
        return self.fit(model, data, trajectory).transform(model)

    # ------------------------------------------------------------------ for subclasses
    def _score(self, cfg: Any, model: nn.Module, data: Any, trajectory: Any) -> dict[str, Tensor]:
        """Return one score tensor per trainable parameter (same shape); higher = more important."""
        raise NotImplementedError

    def _masks_at(self, sparsity: float) -> dict[str, Tensor]:
        """Masks at ``sparsity`` from ``scores_`` (iterative strategies override this)."""
        cfg = self._fit_config
        return scores_to_masks(
            self.scores_,
            sparsity,
            scope=cfg.scope,
            exclude=cfg.exclude,
            granularity=cfg.granularity,
            prune_biases=cfg.prune_biases,
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, self._fitted_marker):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit(model, data, trajectory)' "
                f"before asking for masks."
            )

    def _checked_scores(self, scores: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
        missing = [n for n in shapes if n not in scores]
        if missing:
            raise ConfigError(f"{type(self).__name__} produced no scores for {missing}; every parameter needs one.")
        out: dict[str, Tensor] = {}
        for name, shape in shapes.items():
            s = torch.as_tensor(scores[name]).detach()
            if tuple(s.shape) != shape:
                raise ConfigError(
                    f"{type(self).__name__} produced scores of shape {tuple(s.shape)} for {name!r}; "
                    f"expected the parameter's shape {shape}."
                )
            out[name] = s.to(device="cpu", dtype=torch.float64).clone()
        return out


def check_sparsity(sparsity: Any, owner: str) -> float:
    """Validate a sparsity value: a float with ``0 <= sparsity < 1``."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        value = float("nan")
    if not (0.0 <= value < 1.0):
        raise ConfigError(
            f"{owner}: invalid sparsity {sparsity!r}; it is the fraction of prunable coordinates removed and "
            f"must satisfy 0 <= sparsity < 1 (e.g. 0.9 keeps 10%)."
        )
    return value


def as_batch(data: Any, *, needs_targets: bool, owner: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """Turn ``X``, ``(X,)`` or ``(X, y)`` (tensors or numpy arrays) into tensors on ``device``.

    Returns
    -------
    X : Tensor
        Inputs cast to ``dtype`` when floating, shape ``(n, ...)``.
    y : Tensor or None
        Targets (``None`` when absent).
    """
    if isinstance(data, (tuple, list)):
        if len(data) not in (1, 2):
            raise ConfigError(f"{owner}: data must be X or (X, y); got a sequence of length {len(data)}.")
        X, y = data[0], (data[1] if len(data) == 2 else None)
    else:
        X, y = data, None

    def _tensor(v: Any, what: str) -> Tensor:
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        if not isinstance(v, Tensor):
            raise ConfigError(f"{owner}: {what} must be a torch.Tensor or numpy array, got {type(v).__name__}.")
        return v

    X = _tensor(X, "X")
    if X.dim() < 1 or X.shape[0] == 0:
        raise ConfigError(f"{owner}: X must hold at least one sample (shape (n, ...)); got shape {tuple(X.shape)}.")
    X = X.to(device=device, dtype=dtype) if X.is_floating_point() else X.to(device)
    if y is not None:
        y = _tensor(y, "y").to(device)
        if y.shape[0] != X.shape[0]:
            raise ConfigError(f"{owner}: X has {X.shape[0]} samples but y has {y.shape[0]}; they must match.")
    elif needs_targets:
        raise ConfigError(f"{owner}: this strategy needs targets; pass data=(X, y).")
    return X, y


def resolve_loss(loss: Any, owner: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Return ``loss(outputs, targets) -> mean loss`` for a registered loss name, record or callable.

    A registered loss (:class:`explaind.records.LossRecord`, see :func:`explaind.losses.resolve_loss`)
    returns per-sample losses; their mean is used. A plain callable is used as given and must
    return the mean loss over the batch.
    """
    from ..records import LossRecord

    if isinstance(loss, (str, LossRecord)):
        from ..losses import resolve_loss as resolve_record

        per_sample = resolve_record(loss).implementation

        def mean_loss(outputs: Tensor, targets: Tensor) -> Tensor:
            return per_sample(outputs, targets).mean()

        return mean_loss
    if callable(loss):
        return loss
    raise ConfigError(
        f"{owner}: loss={loss!r} is neither a registered loss name nor a callable. Pass e.g. 'cross_entropy' or a "
        f"function (outputs, targets) -> mean loss."
    )


def copy_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``model`` in eval mode (optionally cast), so scoring never touches the original."""
    clone = copy.deepcopy(model)
    if dtype is not None:
        clone = clone.to(dtype)
    clone.eval()
    return clone

