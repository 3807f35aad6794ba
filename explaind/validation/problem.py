r"""The validation problem: a small digits MLP whose recorded training loop can be re-run on any sample weights.

The run is fixed by a :class:`ValidationConfig`: ``n_train`` training and ``n_test`` test images
of scikit-learn's 8x8 digits (:func:`explaind.datasets.digits`, flattened, float64), an MLP
``64 - hidden - 10`` with a tanh or ReLU hidden layer, and SGD with momentum (torch semantics,
no dampening, no weight decay) over a batch schedule drawn once: each epoch is a seeded
permutation of the training set cut into batches of ``batch_size``.

:meth:`ValidationProblem.train` runs that loop for a vector of sample weights :math:`w_k`: the
loss of batch :math:`B_s` is

.. math::

    L_s = \frac{1}{|B_s|} \sum_{k \in B_s} w_k \, \ell_k(\theta_s),

always divided by the *recorded* batch size :math:`|B_s|`. With every :math:`w_k = 1` this is the
recorded run (the mean loss of each batch); removing the samples outside a subset :math:`S` sets
their :math:`w_k = 0`, i.e. the same loop from the same :math:`\theta_0`, with the same batches in
the same order, in which those samples contribute nothing. This is exactly the retraining that
:class:`~explaind.CounterfactualEstimator` differentiates: its :math:`\epsilon_k` scales
:math:`w_k = 1 + \epsilon_k`, so removing sample ``k`` is :math:`\epsilon_k = -1`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError

__all__ = ["SETTINGS", "ValidationConfig", "ValidationProblem"]

#: The training runs the benchmark validates on: the SGD MLP of this module, then those of the settings module.
SETTINGS: tuple[str, ...] = ("sgd_mlp", "adamw", "dropout", "batchnorm", "contrastive", "relu_untuned", "tiny_lm")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationConfig:
    """Settings of the validation benchmark (:func:`explaind.validation.run_validation`).

    Attributes
    ----------
    activation : {"tanh", "relu"}
        Hidden-layer nonlinearity of the MLP.
    n_train, n_test : int
        Training and test images taken from the digits split (first ``n_train`` of its training
        part, first ``n_test`` of its validation part).
    hidden : int
        Width of the hidden layer.
    epochs, batch_size : int
        ``epochs * ceil(n_train / batch_size)`` optimizer steps.
    lr, momentum : float
        SGD with momentum (torch semantics).
    seed : int
        Seeds the initialisation, the batch schedule, the random subsets, the random scores and
        the bootstrap.
    fractions : tuple of float
        Fractions of the training set kept in the LDS subsets.
    n_subsets : int
        ``M``: random subsets per fraction.
    top_k : int
        Proponents removed per test point in the top-k removal test.
    n_bootstrap : int
        Bootstrap resamples for the error bars (of the seeds, then of the test points within each).
    seeds : int
        Independent runs ``seed, seed + 1, ...``: each draws its own data split, initialisation,
        batch schedule and subsets, and the tables pool them.
    damping : float
        :math:`\\lambda` of the explicit influence functions (``influence``, ``captum_influence``).
    trak_models : int
        Models in TRAK's ensemble.
    trak_proj_dim : int, optional
        TRAK's projection dimension, below ``n_train`` (default ``n_train // 5``).
    setting : str
        The training run: ``"sgd_mlp"`` (this module's MLP with SGD and momentum) or one of the
        settings of :mod:`explaind.validation.settings` (``"adamw"``, ``"dropout"``, ``"batchnorm"``,
        ``"contrastive"``, ``"relu_untuned"``) or the token model ``"tiny_lm"`` of
        :mod:`explaind.validation.token_lm`; :func:`~explaind.validation.settings.setting_config` gives each its
        measured size.
    weight_decay : float
        AdamW's decoupled weight decay (settings ``"adamw"`` and ``"tiny_lm"``).
    dropout : float
        Dropout probability after the hidden layer (setting ``"dropout"``).
    temperature : float
        InfoNCE temperature (setting ``"contrastive"``).
    leave_out : bool
        Also retrain every subset and top-k removal with the removed samples taken out of their batches
        (:mod:`explaind.validation.leave_out`), and report how well each method predicts that too.
    """

    activation: Literal["tanh", "relu"] = "tanh"
    n_train: int = 500
    n_test: int = 50
    hidden: int = 32
    epochs: int = 10
    batch_size: int = 25
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    fractions: tuple[float, ...] = (0.5, 0.9, 0.99)
    n_subsets: int = 200
    top_k: int = 25
    n_bootstrap: int = 1000
    seeds: int = 5
    damping: float = 0.1
    trak_models: int = 5
    trak_proj_dim: int | None = None
    setting: str = "sgd_mlp"
    weight_decay: float = 0.05
    dropout: float = 0.2
    temperature: float = 0.5
    leave_out: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ("tanh", "relu"):
            raise ConfigError(f"ValidationConfig: invalid value for 'activation': {self.activation!r}. Allowed: "
                              f"'tanh', 'relu'.")
        for name in ("n_train", "n_test", "hidden", "epochs", "batch_size", "n_subsets", "top_k", "n_bootstrap",
                     "seeds", "trak_models"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"ValidationConfig: {name} must be a positive integer; got {getattr(self, name)!r}.")
        if self.setting not in SETTINGS:
            raise ConfigError(f"ValidationConfig: invalid value for 'setting': {self.setting!r}. Allowed: "
                              f"{', '.join(repr(n) for n in SETTINGS)}.")
        if not 0.0 <= float(self.dropout) < 1.0 or not float(self.temperature) > 0 or float(self.weight_decay) < 0:
            raise ConfigError(f"ValidationConfig: need 0 <= dropout < 1, temperature > 0 and weight_decay >= 0; got "
                              f"dropout={self.dropout!r}, temperature={self.temperature!r}, "
                              f"weight_decay={self.weight_decay!r}.")
        if self.setting == "relu_untuned" and self.activation != "relu":
            raise ConfigError(f"ValidationConfig: the setting 'relu_untuned' is a ReLU MLP; got activation="
                              f"{self.activation!r}. Pass activation='relu' (the CLI's default for it), or use "
                              f"'sgd_mlp' with lr for a tanh MLP.")
        if self.trak_proj_dim is None:
            object.__setattr__(self, "trak_proj_dim", max(1, int(self.n_train) // 5))
        if not 1 <= int(self.trak_proj_dim) < self.n_train:
            raise ConfigError(f"ValidationConfig: trak_proj_dim ({self.trak_proj_dim}) must lie in [1, n_train = "
                              f"{self.n_train}); TRAK's Gram matrix of projected gradients is singular otherwise.")
        if self.top_k > self.n_train:
            raise ConfigError(f"ValidationConfig: top_k ({self.top_k}) exceeds n_train ({self.n_train}).")
        if not float(self.damping) > 0.0:
            raise ConfigError(f"ValidationConfig: damping must be positive; got {self.damping!r}.")
        bad = [f for f in self.fractions if not 0.0 < float(f) < 1.0]
        if bad or not self.fractions:
            raise ConfigError(f"ValidationConfig: fractions must lie strictly between 0 and 1; got "
                              f"{self.fractions!r}.")

    @classmethod
    def quick(cls, **changes: Any) -> ValidationConfig:
        """A tiny configuration for smoke tests (60 train, 10 test, 20 steps, 8 subsets, top-5, one seed)."""
        base = cls(n_train=60, n_test=10, hidden=16, epochs=5, batch_size=15, n_subsets=8, top_k=5,
                   n_bootstrap=200, seeds=1, trak_models=2)
        return replace(base, **changes)

    @property
    def n_steps(self) -> int:
        """Optimizer steps of the run."""
        return self.epochs * -(-self.n_train // self.batch_size)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings."""
        return {"activation": self.activation, "n_train": self.n_train, "n_test": self.n_test,
                "hidden": self.hidden, "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "momentum": self.momentum, "seed": self.seed, "fractions": list(self.fractions),
                "n_subsets": self.n_subsets, "top_k": self.top_k, "n_bootstrap": self.n_bootstrap,
                "seeds": self.seeds, "damping": self.damping, "trak_models": self.trak_models,
                "trak_proj_dim": self.trak_proj_dim, "n_steps": self.n_steps, "setting": self.setting,
                "weight_decay": self.weight_decay, "dropout": self.dropout, "temperature": self.temperature,
                "leave_out": self.leave_out}


def _cross_entropy_terms(outputs: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def batch_schedule(config: ValidationConfig) -> list[Tensor]:
    """The batch schedule of a run: each epoch a permutation seeded by ``config.seed``, cut into batches."""
    gen = torch.Generator().manual_seed(config.seed)
    batches: list[Tensor] = []
    for _ in range(config.epochs):
        order = torch.randperm(config.n_train, generator=gen)
        batches += [order[lo:lo + config.batch_size] for lo in range(0, config.n_train, config.batch_size)]
    return batches


class ValidationProblem:
    """The data, the initialisation and the batch schedule of one validation run.

    Parameters
    ----------
    config : ValidationConfig
        The settings.

    Attributes
    ----------
    X_train, y_train, X_test, y_test : Tensor
        float64 inputs of shape ``(n, 64)`` and int64 class labels.
    batches : list of Tensor
        The batch schedule: sample indices of every step, in order.
    """

    def __init__(self, config: ValidationConfig):
        from ..datasets import digits

        data = digits(flatten=True, dtype=torch.float64, seed=config.seed)
        if config.n_train > data.n_train or config.n_test > data.n_val:
            raise ConfigError(f"ValidationConfig: at most {data.n_train} training and {data.n_val} test digits are "
                              f"available; got n_train={config.n_train}, n_test={config.n_test}.")
        self.config = config
        self.X_train, self.y_train = data.X_train[:config.n_train], data.y_train[:config.n_train]
        self.X_test, self.y_test = data.X_val[:config.n_test], data.y_val[:config.n_test]
        self.batches: list[Tensor] = batch_schedule(config)

    def build_model(self) -> nn.Module:
        """The MLP at its initialisation :math:`\\theta_0` (the same tensors on every call)."""
        torch.manual_seed(self.config.seed)
        act: nn.Module = nn.Tanh() if self.config.activation == "tanh" else nn.ReLU()
        return nn.Sequential(nn.Linear(64, self.config.hidden), act, nn.Linear(self.config.hidden, 10)).double()

    def train(self, weights: Tensor | None = None, *, record: bool = False) -> tuple[nn.Module, Any]:
        r"""Run the training loop with sample weights ``weights`` (default: all ones, the recorded run).

        Parameters
        ----------
        weights : Tensor, shape (n_train,), optional
            :math:`w_k`; step ``s`` minimises :math:`\frac{1}{|B_s|}\sum_{k \in B_s} w_k \ell_k`.
        record : bool
            Record the run with :class:`~explaind.TrajectoryRecorder` (each batch logged with its
            default weights ``1/|B_s|``; only valid for all-ones ``weights``).

        Returns
        -------
        model : torch.nn.Module
            The trained model.
        trajectory : Trajectory or None
            The recorded run when ``record`` is true.
        """
        w = self.checked_weights(weights, record)
        model = self.build_model()
        opt = self.optimizer(model)[0]
        recorder = None
        if record:
            from ..trajectory import TrajectoryRecorder

            recorder = TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(self.X_train, self.y_train))
        return self.run_loop(model, opt, w, recorder, self.terms)

    def optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """The run's optimizer over ``model``'s parameters and its learning-rate schedule (``None``: constant)."""
        return torch.optim.SGD(model.parameters(), lr=self.config.lr, momentum=self.config.momentum), None

    def terms(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss terms :math:`\\ell_k` of a batch, ``(n,)``: the cross-entropy of each sample."""
        return _cross_entropy_terms(outputs, targets)

    def checked_weights(self, weights: Tensor | None, record: bool) -> Tensor:
        """The sample weights as a float64 ``(n_train,)`` tensor (all ones when ``None``), checked."""
        n = self.config.n_train
        w = torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (n,):
            raise ConfigError(f"ValidationProblem.train: weights must have shape ({n},); got {tuple(w.shape)}.")
        if record and not bool((w == 1).all()):
            raise ConfigError("ValidationProblem.train: record=True records the unweighted run; pass weights=None.")
        return w

    def run_loop(self, model: nn.Module, opt: torch.optim.Optimizer, w: Tensor, recorder: Any,
                 terms: Callable[[Tensor, Tensor], Tensor], schedule: Any = None,
                 seed: int | None = None) -> tuple[nn.Module, Any]:
        r"""The recorded loop over :attr:`batches`: step ``s`` minimises :math:`\frac{1}{|B_s|}\sum_k w_k \ell_k`.

        ``terms(outputs, targets)`` gives the ``(|B_s|,)`` loss terms of a batch; ``recorder`` (or ``None``)
        logs every batch; ``schedule`` is stepped after every optimizer step; ``seed`` seeds the global
        generator right before the loop. Returns the trained model (in evaluation mode) and the trajectory.
        """
        if recorder is not None:
            recorder.__enter__()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            for idx in self.batches:
                opt.zero_grad()
                ((terms(model(self.X_train[idx]), self.y_train[idx]) * w[idx]).sum() / len(idx)).backward()
                if recorder is not None:
                    recorder.log_batch(idx)
                opt.step()
                if schedule is not None:
                    schedule.step()
        finally:
            if recorder is not None:
                recorder.__exit__(None, None, None)
        model.eval()
        return model, (recorder.trajectory if recorder is not None else None)

    def targets(self) -> list[int]:
        """The explained output of each test point, as the estimators' ``target``: its true class."""
        return self.y_test.tolist()

    def true_logits(self, model: nn.Module, rows: Sequence[int] | None = None) -> Tensor:
        """The true-class logit of each test point (or of the test points ``rows``), shape ``(T,)``."""
        X, y = (self.X_test, self.y_test) if rows is None else (self.X_test[list(rows)], self.y_test[list(rows)])
        with torch.no_grad():
            return model(X).gather(1, y[:, None])[:, 0]

    def retrain_logits(self, weights: Tensor | None = None) -> Tensor:
        """True-class test logits after :meth:`train` with ``weights``, shape ``(n_test,)``."""
        return self.true_logits(self.train(weights)[0])
