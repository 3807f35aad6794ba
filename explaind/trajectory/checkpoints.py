r"""Runs that were not recorded: a list of checkpoints as a trajectory of macro-steps.

Checkpoints :math:`\theta_0, \dots, \theta_N` of a run (safetensors files, Hugging Face checkpoint
folders, or state dicts in memory) telescope exactly like recorded steps,

.. math:: g(x;\theta_N) = g(x;\theta_0) + \sum_s \varphi_s(x)\,(\theta_{s+1} - \theta_s),

with :math:`\varphi_s` the path integral along the *straight segment* between consecutive
checkpoints (docs/maths.md §2). So :class:`~explaind.KernelReplica` and the whole-update
decompositions of :class:`~explaind.InfluenceEstimator` (``split=False``: steps, parameter
tensors, coordinates) are exact along the segments, with their quadrature error measured from the
exact endpoint differences. What happened *between* checkpoints (which samples, which optimizer
state) is unknown, so the per-sample (``train``) axis and the data/regularization split are
refused with the reason. Only safetensors are read (no pickle).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..exceptions import TrajectoryError, warn_at_caller
from ..recurrence import LinearUpdate
from ._common import TrainData, resolve_loss_record
from .base import Trajectory
from .recorded import check_param_index, check_step

__all__ = ["CheckpointTrajectory"]


def _no_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    raise TrajectoryError("This trajectory was built from checkpoints without loss=; pass loss= (a registered name "
                          "or a callable) to Trajectory.from_checkpoints to explain a loss.")


def _files_of(source: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the file itself, or a folder's (sharded) model file(s)."""
    if source.is_file():
        if source.suffix != ".safetensors":
            raise TrajectoryError(f"Checkpoint {str(source)!r} is not a .safetensors file; explaind reads no pickle. "
                                  f"Save it with safetensors.torch.save_file(model.state_dict(), path).")
        return [source]
    if source.is_dir():
        index = source / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return [source / name for name in shards]
        if (source / "model.safetensors").is_file():
            return [source / "model.safetensors"]
        raise TrajectoryError(f"Checkpoint folder {str(source)!r} holds no model.safetensors (nor a sharded index); "
                              f"pass .safetensors files or Hugging Face checkpoint folders saved with safetensors.")
    raise TrajectoryError(f"Checkpoint {str(source)!r} does not exist.")


class CheckpointTrajectory(Trajectory, reads_checkpoints=True):
    """A trajectory of macro-steps between checkpoints (see the module docstring).

    Parameters
    ----------
    checkpoints : sequence
        At least two checkpoints, in training order: paths of ``.safetensors`` files, Hugging Face
        checkpoint folders (``model.safetensors`` or a sharded index), or ``name -> tensor``
        mappings. Each must hold every trainable parameter of ``model`` under its name in
        ``model.named_parameters()``.
    model : nn.Module
        Template with the run's architecture (its own weights are not used).
    loss : str, callable or LossRecord, optional
        Needed only to explain a loss (``target="loss"``).
    train_data : optional
        Unused by the macro-step decompositions; kept for ``n_train``.
    cache : int
        Checkpoints kept in memory (they are read one at a time, when needed).
    """

    def __init__(self, checkpoints: Sequence[Any], model: nn.Module, *, loss: Any = None, train_data: Any = None,
                 cache: int = 3):
        if not isinstance(model, nn.Module):
            raise TrajectoryError(f"Trajectory.from_checkpoints needs model=<an nn.Module with the run's "
                                  f"architecture>; got {type(model).__name__}.")
        if isinstance(checkpoints, str | Path) or len(checkpoints) < 2:
            raise TrajectoryError("Trajectory.from_checkpoints needs a list of at least two checkpoints (theta_0 "
                                  "... theta_N) in training order.")
        self._sources = list(checkpoints)
        self._model = model
        self._names = tuple(n for n, p in model.named_parameters() if p.requires_grad)
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self._loss = resolve_loss_record(_no_loss if loss is None else loss)
        self._data = TrainData(train_data) if train_data is not None else None
        self._cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._cache_size = max(1, int(cache))
        self._constants = self._read_constants()

    # ----------------------------------------------------------------- reading
    def _label(self, i: int) -> str:
        source = self._sources[i]
        return repr(str(source)) if isinstance(source, str | Path) else f"checkpoint {i} (a mapping)"

    def _state(self, i: int) -> dict[str, Tensor]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        source = self._sources[i]
        if isinstance(source, Mapping):
            state = {k: torch.as_tensor(v) for k, v in source.items()}
        else:
            state = {}
            for file in _files_of(Path(source)):
                state.update(load_file(str(file)))
        missing = [n for n in self._names if n not in state]
        wrong = [f"{n} {tuple(state[n].shape)} (model {self._shapes[n]})" for n in self._names
                 if n in state and tuple(state[n].shape) != self._shapes[n]]
        if missing or wrong:
            problems = ([f"missing {', '.join(missing[:5])}"] if missing else []) + (
                [f"shapes differ: {'; '.join(wrong[:5])}"] if wrong else [])
            raise TrajectoryError(f"Checkpoint {self._label(i)} does not fit the model: {'; '.join(problems)}. Pass "
                                  f"checkpoints of this architecture, keyed like model.named_parameters().")
        bad = [n for n in self._names if state[n].is_floating_point() and not bool(torch.isfinite(state[n]).all())]
        if bad:
            raise TrajectoryError(f"Checkpoint {self._label(i)} holds NaN or infinite values in {', '.join(bad[:5])}.")
        self._cache[i] = state
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return state

    def _read_constants(self) -> dict[str, Tensor]:
        """Frozen parameters and buffers of the final checkpoint (else the model's); warns when they changed."""
        template = {**dict(self._model.named_buffers()),
                    **{n: p for n, p in self._model.named_parameters() if not p.requires_grad}}
        first, last = self._state(0), self._state(len(self._sources) - 1)
        out = {n: last.get(n, v).detach().clone() for n, v in template.items()}
        changed = [n for n in out if n in first and n in last and not torch.equal(first[n], last[n])]
        if changed:
            warn_at_caller(f"Trajectory.from_checkpoints: {', '.join(changed[:5])} change between the first and the "
                           f"last checkpoint (buffers such as BatchNorm statistics, or frozen parameters); the "
                           f"decomposition holds them at their final values, so their own change is not "
                           f"attributed.")
        return out

    # ----------------------------------------------------------------- structure
    @property
    def n_steps(self) -> int:
        return len(self._sources) - 1

    @property
    def param_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def loss(self) -> Any:
        return self._loss

    @property
    def manifest(self) -> None:
        return None

    @property
    def has_updates(self) -> bool:
        return False

    @property
    def n_train(self) -> int:
        if self._data is None:
            raise TrajectoryError(self._refusal("the training data"))
        return len(self._data)

    # ----------------------------------------------------------------- per macro-step
    def params(self, s: int) -> dict[str, Tensor]:
        state = self._state(check_param_index(s, self.n_steps))
        return {n: state[n] for n in self._names}

    def constants(self) -> dict[str, Tensor]:
        return dict(self._constants)

    @staticmethod
    def _refusal(what: str) -> str:
        return (f"A run given by checkpoints has no record of {what} between them: KernelReplica and "
                f"InfluenceEstimator(split=False, keep within ('step', 'group', 'param')) are exact along the "
                f"segments, but the per-sample ('train') axis and the data/regularization split need each step's "
                f"batches and optimizer state — record the run with TrajectoryRecorder.")

    def updates(self, s: int) -> dict[str, LinearUpdate]:
        check_step(s, self.n_steps)
        raise TrajectoryError(self._refusal("the optimizer's updates"))

    def batch(self, s: int) -> tuple[Tensor, Tensor]:
        check_step(s, self.n_steps)
        raise TrajectoryError(self._refusal("the batches"))

    def grad_scale(self, s: int) -> float:
        check_step(s, self.n_steps)
        raise TrajectoryError(self._refusal("the gradient scale"))

    def audit(self) -> np.ndarray:
        return np.full(self.n_steps, np.nan, dtype=np.float64)

    def train_samples(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        if self._data is None:
            raise TrajectoryError(self._refusal("the training data"))
        return self._data.get(indices)

    def __repr__(self) -> str:
        return f"CheckpointTrajectory({len(self._sources)} checkpoints, {self.n_steps} macro-steps)"
