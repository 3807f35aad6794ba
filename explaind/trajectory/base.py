"""The read-only interface of a recorded training run.

:class:`Trajectory` is what every estimator consumes. Two backends implement it: an
in-memory one (small runs, tests) and the on-disk store (streamed step by step). Both expose
exactly the methods below; estimators must not rely on anything else.

Conventions
-----------
* Steps are numbered ``s = 0 .. n_steps-1``; ``params(s)`` is ``theta_s`` for
  ``s = 0 .. n_steps`` (``params(n_steps)`` is the trained model).
* ``param_names`` lists the *trainable* parameters (``requires_grad=True``) in
  ``model.named_parameters()`` order; frozen parameters and buffers are in ``constants()``.
* ``updates(s)[name]`` is the :class:`~explaind.recurrence.LinearUpdate` of step ``s`` for every
  trainable parameter (a parameter that did not move has ``a=1, b=0, P=0``).
* ``batch(s)`` returns ``(indices, weights)``: dataset indices (int64, shape ``(n,)``, repeats
  allowed) and the weights ``w_{s,k}`` (shape ``(n,)``) so that the gradient the optimizer saw is
  ``grad_scale(s) * sum_k w_k * grad l_k(theta_s)``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError
from ..recurrence import LinearUpdate

if TYPE_CHECKING:
    from ._salvage import SalvageReport

__all__ = ["Trajectory"]


class Trajectory(abc.ABC):
    """A recorded training run (immutable).

    Obtain one from :attr:`explaind.TrajectoryRecorder.trajectory` or
    :meth:`Trajectory.load`.

    A backend that opens store directories declares itself with a class keyword,
    ``class DiskTrajectory(..., reads_stores=True)``; :meth:`load` then opens stores with it, so
    this module needs no import of its backends.
    """

    #: The subclass :meth:`load` opens stores with (the last one declared with ``reads_stores=True``).
    _store_reader: ClassVar[Callable[..., Trajectory] | None] = None
    #: The subclass :meth:`from_checkpoints` builds (declared with ``reads_checkpoints=True``).
    _checkpoint_reader: ClassVar[Callable[..., Trajectory] | None] = None

    def __init_subclass__(cls, *, reads_stores: bool = False, reads_checkpoints: bool = False,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if reads_stores:
            Trajectory._store_reader = cls
        if reads_checkpoints:
            Trajectory._checkpoint_reader = cls

    @property
    def has_updates(self) -> bool:
        """Whether each step's batches and optimizer coefficients are known (``False`` for checkpoint runs)."""
        return True

    # ----------------------------------------------------------------- structure
    @property
    @abc.abstractmethod
    def n_steps(self) -> int:
        """Number of recorded optimizer steps ``N``."""

    @property
    @abc.abstractmethod
    def param_names(self) -> tuple[str, ...]:
        """Names of the trainable parameter tensors, in ``model.named_parameters()`` order."""

    @property
    @abc.abstractmethod
    def model(self) -> nn.Module:
        """A module with the recorded architecture, used as a template for ``functional_call``."""

    @property
    @abc.abstractmethod
    def loss(self) -> Any:
        """The :class:`~explaind.records.LossRecord` training used (per-sample losses)."""

    @property
    @abc.abstractmethod
    def manifest(self) -> Any:
        """The pydantic manifest (schema version, names, shapes, adapter, hyperparameters, ...)."""

    # ----------------------------------------------------------------- per step
    @abc.abstractmethod
    def params(self, s: int) -> dict[str, Tensor]:
        """``theta_s`` as a name -> tensor dict, for ``0 <= s <= n_steps``."""

    @abc.abstractmethod
    def constants(self) -> dict[str, Tensor]:
        """Frozen parameters and buffers (constant over the run), name -> tensor."""

    @abc.abstractmethod
    def updates(self, s: int) -> dict[str, LinearUpdate]:
        """Optimizer coefficients of step ``s``, one :class:`LinearUpdate` per trainable parameter."""

    @abc.abstractmethod
    def batch(self, s: int) -> tuple[Tensor, Tensor]:
        """``(indices, weights)`` of step ``s`` (all micro-batches merged)."""

    @abc.abstractmethod
    def grad_scale(self, s: int) -> float:
        """The gradient scale ``c_s`` (1 unless gradients were clipped or scaled)."""

    @abc.abstractmethod
    def audit(self) -> np.ndarray:
        """Per-step relative residual ``||E_s|| / ||Delta theta_s||``, shape ``(n_steps,)``.

        ``E_s`` is the actual update minus the adapter's modelled update from the gradient the
        optimizer saw; the recorder measures it at every step. (The engine re-derives the residual
        with recomputed per-sample gradients, so completeness never depends on it.)
        """

    def micro_batches(self, s: int) -> list[Any]:
        """The micro-batches of step ``s`` in logging order, each a :class:`~explaind.trajectory._random.MicroBatch`.

        Their indices and weights concatenated are :meth:`batch`; a micro-batch whose training
        forward was captured carries the random state to replay it (docs/recording.md,
        "Dropout and batch norm"). This default (for trajectories that did not capture) is one
        uncaptured micro-batch.
        """
        from ._random import MicroBatch

        idx, w = self.batch(s)
        return [MicroBatch(idx, w)]

    @property
    def generators(self) -> tuple[torch.Generator, ...]:
        """The private generators passed to the recorder as ``generators=[...]`` (or to :meth:`load`), for replays.

        Generators held as attributes of the model's modules are found in the model by name and are
        not listed here (docs/recording.md, "Private generators").
        """
        return tuple(getattr(self, "_generators", ()))

    @property
    def buffer_names(self) -> tuple[str, ...]:
        """Buffers recorded per step because training changed them (running statistics); empty by default."""
        return ()

    def buffers(self, s: int) -> dict[str, Tensor]:
        r"""The buffers :math:`\beta_s` in effect along step ``s``'s segment (``0 <= s <= n_steps``), name -> tensor.

        Only the names of :attr:`buffer_names`; the others are in :meth:`constants`. ``buffers(n_steps)``
        are the trained model's. This default (no buffer changed) is the constants' values of those names.
        """
        constants = self.constants()
        return {n: constants[n] for n in self.buffer_names}

    def initial_state(self) -> dict[str, Tensor]:
        r"""The momentum buffers :math:`m_{-1}` the optimizer held before step 0, name -> tensor (parameter shape).

        Non-empty when recording started on an optimizer restored from a checkpoint or after unrecorded
        steps; a parameter not listed starts from :math:`m_{-1} = 0`. Its share of every update is the
        ``initial_state`` term of an :class:`~explaind.kernel.attribution.Attribution` (docs/maths.md §4,
        "Optimizer state at the start"). This default: none (every buffer starts at zero).
        """
        return {}

    def optimizer_start(self) -> Any:
        """The optimizer's whole state before step 0, an ``OptimizerStart``, or ``None``.

        ``None`` for a run recorded from a fresh optimizer (and for stores written before it was
        kept). What replays the optimizer from its state before step 0 needs it: the counterfactual
        of a run that started from optimizer state (docs/maths.md §9) and a sparse store's first
        segment. This default: ``None``.
        """
        return None

    def gradient_check(self) -> np.ndarray:
        """Per-step mismatch of the recorder's gradient check, shape ``(n_steps,)``; NaN where not checked.

        This default (for trajectories not made by the recorder) says that no step was checked.
        """
        return np.full(self.n_steps, np.nan, dtype=np.float64)

    @abc.abstractmethod
    def train_samples(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Training inputs and targets at ``indices`` (raises ``TrajectoryError`` without data)."""

    @property
    @abc.abstractmethod
    def n_train(self) -> int:
        """Number of training samples (``len(train_data)``)."""

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: Any, model: nn.Module | None = None, train_data: Any = None, **kwargs: Any) -> Trajectory:
        """Open a stored trajectory (a store directory written by ``TrajectoryRecorder(store=path)``).

        Parameters
        ----------
        path : str or Path
            The store directory.
        model : nn.Module, optional
            Template module; rebuilt with ``explaind.models.build_model`` when omitted and the run
            was recorded from a registry model. A parameter name/shape mismatch raises
            ``TrajectoryError`` listing the differences.
        train_data : (X, y) or Dataset, optional
            Training data (defaults to the copy stored with the run, if any). It must be the data the
            run was recorded with, in the same order: its length and fingerprint are checked
            (``TrajectoryError`` naming the difference).
        **kwargs
            ``loss=`` (needed for a run recorded with a custom loss callable), ``cache_steps=``,
            ``verify_train_data=False`` (skip the fingerprint check), ``max_parameters=`` (the size
            limit of a model rebuilt from the recorded architecture spec), ``generators=`` (the private
            generators the run was recorded with ``generators=[...]``, same order); for a sparse store
            (``checkpoint_every > 1``) ``replay_tolerance=`` and ``cache_segments=``.

        Returns
        -------
        Trajectory
            The store's reader, :class:`~explaind.trajectory.disk.DiskTrajectory` (the subclass
            declared with ``reads_stores=True``).
        """
        reader = Trajectory._store_reader
        if reader is None:  # pragma: no cover - importing explaind.trajectory imports the disk backend
            raise TrajectoryError("No trajectory backend reads stores; import explaind.trajectory first.")
        traj = reader(path, model=model, train_data=train_data, **kwargs)
        warn_uncommitted = getattr(traj, "warn_uncommitted", None)  # steps/ holds files the index does not list
        if callable(warn_uncommitted):
            warn_uncommitted()
        if model is not None:  # attributes edited after recording (docs/recording.md)
            from ._attribute_record import check_model

            check_model(traj, model, "Trajectory.load")
        return traj

    @staticmethod
    def salvage(path: Any, out: Any, *, replay: bool = False, model: Any = None, train_data: Any = None,
                loss: Any = None) -> SalvageReport:
        """Copy every step of a damaged store that can be proven intact into a new store ``out``.

        See docs/recording.md, "Salvaging a damaged store". The damaged store is only read. A step is kept
        when its step file matches the checksum its record holds, or, where no record of it parses (a
        journal line lost or corrupted), when the file itself holds the step, its record and the run's
        identity, start files and description; salvage stops at the first step proven in neither way.

        Parameters
        ----------
        path : str or Path
            The damaged store.
        out : str or Path
            The new store: a path that does not exist, or an empty directory, outside ``path``.
        replay : bool
            Also prove the steps of a store written before schema 3 whose journal lines were lost, by
            replaying their recorded updates from the model, the training data and the loss (to the
            recorder's gradient tolerance, not bit for bit).
        model, train_data, loss : optional
            As for :meth:`load`, for the replay (default: the store's own); only with ``replay=True``.

        Returns
        -------
        SalvageReport
            What was kept (and how), what was dropped and why, and the step a resume continues from;
            ``str(report)`` is a readable summary.

        Raises
        ------
        TrajectoryError
            When nothing can be proven (naming the file and the reason) or ``out`` is not allowed;
            nothing is written then.
        """
        from ._salvage import salvage_store

        return salvage_store(path, out, replay=replay, model=model, train_data=train_data, loss=loss,
                             reader=Trajectory._store_reader)

    @classmethod
    def from_checkpoints(cls, checkpoints: Any, model: nn.Module, *, loss: Any = None, train_data: Any = None,
                         **kwargs: Any) -> Trajectory:
        """A run that was not recorded, as macro-steps between checkpoints.

        See docs/recording.md, "Runs that were not recorded".


        Parameters
        ----------
        checkpoints : sequence
            ``.safetensors`` files, Hugging Face checkpoint folders or ``name -> tensor`` mappings,
            in training order (at least two).
        model : nn.Module
            A module with the run's architecture (template).
        loss : optional
            A registered loss name or callable, needed only for ``target="loss"``.
        train_data : optional
            Training data (for ``n_train`` only).

        Returns
        -------
        Trajectory
            A :class:`~explaind.trajectory.checkpoints.CheckpointTrajectory`: exact replicas and
            ``split=False`` decompositions along the straight segments; the ``train`` axis is refused.
        """
        reader = Trajectory._checkpoint_reader
        if reader is None:  # pragma: no cover - importing explaind.trajectory imports the backend
            raise TrajectoryError("No trajectory backend reads checkpoints; import explaind.trajectory first.")
        return reader(checkpoints, model, loss=loss, train_data=train_data, **kwargs)

    # ----------------------------------------------------------------- helpers
    def delta(self, s: int) -> dict[str, Tensor]:
        """``Delta theta_s = theta_{s+1} - theta_s``."""
        a, b = self.params(s), self.params(s + 1)
        return {k: b[k] - a[k] for k in self.param_names}

    def iter_steps(self, start: int = 0, stop: int | None = None) -> Iterator[int]:
        """Step numbers ``start .. stop-1`` (``stop`` defaults to ``n_steps``)."""
        return iter(range(start, self.n_steps if stop is None else stop))

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the recorded parameters."""
        return next(iter(self.params(0).values())).dtype

    def __len__(self) -> int:
        return self.n_steps
