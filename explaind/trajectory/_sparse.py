r"""What a sparse store keeps per step so that a step can be replayed (docs/recording.md, "Sparse checkpoints").

A store recorded with ``checkpoint_every=k > 1`` writes :math:`\theta_{s+1}` only at checkpoints
and the optimizer state only at some of them (:class:`SparseLayout`: at most ``1/k`` of the dense
bytes), and both at the last step; every step keeps its batch, its scalars (``c_s``, the scalar
:class:`~explaind.recurrence.LinearUpdate` coefficients), the buffers that changed, the random
states of its micro-batches and a :class:`StepReplay`: the optimizer's parameter groups with the
hyperparameters this step used (learning-rate schedules), which parameters it stepped and which of
them had no gradient input. With these and the training data, :mod:`explaind.trajectory.replay`
re-runs the optimizer from the nearest checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..exceptions import ConfigError, TrajectoryError
from ._io import tensor_bytes

__all__ = ["REPLAY_KEY", "SparseLayout", "StepReplay", "apply_groups", "group_snapshot", "relative_gap",
           "state_bytes", "validate_checkpoint_every"]

#: Key of the replay record in a step file's safetensors metadata.
REPLAY_KEY = "replay"


def _plain(value: Any) -> bool:
    """A hyperparameter value stored as JSON: a number, flag, string, ``None`` or a tuple/list of numbers."""
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return True
    if isinstance(value, tuple | list):
        return all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    return False


def group_snapshot(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[dict[str, Any]]:
    """The optimizer's parameter groups as JSON-ready dicts: ``"params"`` (parameter names) and the hyperparameters.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The live optimizer, at the moment of a step.
    names : dict of int to str
        ``id(parameter) -> name`` over the model's parameters.
    """
    out = []
    for group in optimizer.param_groups:
        entry: dict[str, Any] = {"params": [names[id(p)] for p in group["params"]]}
        for key, value in group.items():
            if key != "params" and _plain(value):
                entry[key] = list(value) if isinstance(value, tuple) else value
        out.append(entry)
    return out


def apply_groups(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], where: str) -> None:
    """Set the recorded hyperparameters of one step on a replay optimizer built with the same groups.

    Raises
    ------
    TrajectoryError
        When the recorded groups hold other parameters than the replay optimizer's (``add_param_group``
        inside a segment).
    """
    live = optimizer.param_groups
    layout = [list(g["params"]) for g in groups]
    if len(live) != len(groups) or any(len(g["params"]) != len(names) for g, names in zip(live, layout)):
        raise TrajectoryError(
            f"{where}: the optimizer's parameter groups changed between two checkpoints (add_param_group), which "
            f"the replay cannot follow. Re-record with checkpoint_every=1, or add parameter groups only right after "
            f"a checkpoint step."
        )
    for group, recorded in zip(live, groups):
        for key, value in recorded.items():
            if key != "params":
                group[key] = tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class StepReplay:
    """The replay record of one step.

    Attributes
    ----------
    groups : list of dict
        :func:`group_snapshot` of the optimizer at the step.
    stepped : tuple of str
        Recorded parameters the step updated (they held a gradient).
    no_input : tuple of str
        Stepped parameters no backward reached (their gradient was an exact zero).
    """

    groups: list[dict[str, Any]]
    stepped: tuple[str, ...]
    no_input: tuple[str, ...]

    def encode(self) -> dict[str, str]:
        """The step file's metadata entry."""
        body = {"groups": self.groups, "stepped": list(self.stepped), "no_input": list(self.no_input)}
        return {REPLAY_KEY: json.dumps(body)}

    @classmethod
    def decode(cls, metadata: dict[str, str], where: str) -> StepReplay:
        """Inverse of :meth:`encode`; a missing or malformed record raises :class:`TrajectoryError`."""
        try:
            body = json.loads(metadata[REPLAY_KEY])
            return cls(groups=list(body["groups"]), stepped=tuple(body["stepped"]), no_input=tuple(body["no_input"]))
        except (KeyError, TypeError, ValueError, RecursionError):  # RecursionError: nested deeper than json goes
            raise TrajectoryError(
                f"{where} lacks a valid replay record (parameter groups, stepped parameters): it was not written by a "
                f"sparse recording or the store is corrupted. Re-record the run."
            ) from None


def validate_checkpoint_every(value: Any, *, store: Any, stochastic: list[str]) -> int:
    """``checkpoint_every`` as a positive int; ``> 1`` (sparse) needs a store directory and a deterministic model.

    Raises
    ------
    ConfigError
        Naming the value, what is allowed and the fix.
    """
    if type(value) is not int or value < 1:
        raise ConfigError(
            f"checkpoint_every={value!r} is not allowed. Choose a positive int k: store theta and the optimizer state "
            f"every k steps (1, the default, stores every step)."
        )
    if value > 1 and store is None:
        raise ConfigError(
            f"checkpoint_every={value} needs a store directory: sparse checkpoints save disk space of a stored run. "
            f"Pass store=<path>, or checkpoint_every=1 for an in-memory trajectory."
        )
    if value > 1 and stochastic:
        raise ConfigError(
            f"checkpoint_every={value}: the model has active dropout or batch norm ({', '.join(stochastic)}) and "
            f"capture_random=False, so the steps between checkpoints cannot be replayed (their masks and batch "
            f"statistics are not kept). Pass capture_random='auto' (the default) or True, or use checkpoint_every=1."
        )
    return value


def relative_gap(replayed: dict[str, Tensor], stored: dict[str, Tensor], start: dict[str, Tensor]) -> float:
    r""":math:`\|\hat\theta_{hi} - \theta_{hi}\| / \|\theta_{hi} - \theta_{lo}\|` in float64.

    Absolute (the numerator alone) when the segment did not move.
    """
    gap = math.sqrt(sum(float((replayed[n].double() - stored[n].double()).pow(2).sum()) for n in stored))
    moved = math.sqrt(sum(float((stored[n].double() - start[n].double()).pow(2).sum()) for n in stored))
    return gap / moved if moved > 0 else gap


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's per-parameter state (what a checkpoint's state file holds)."""
    return tensor_bytes(v for entry in optimizer.state.values() for v in entry.values() if isinstance(v, Tensor))


#: Largest number of ``k``-step slots between two stored optimizer states the layout considers.
MAX_SLOTS = 8


@dataclass(frozen=True)
class SparseLayout:
    r"""Which steps of a sparse store keep :math:`\theta` and which keep the optimizer state too.

    With ``checkpoint_every=k`` the steps fall into slots of ``k``; a *window* is ``m`` slots. The
    optimizer state is stored at the end of every window (a full checkpoint: :math:`\theta` and the
    state); :math:`\theta` alone at the end of the window's first ``m - 1 - d`` slots; the last
    ``d + 1`` slots of a window form one replayed segment. Per window the store then keeps
    ``(m - d) T + S`` bytes against ``m k (T + P)`` of a dense store (``T``: the bytes of
    :math:`\theta`, ``S``: of the optimizer state, ``P``: of a dense step's tensor coefficients such
    as Adam's preconditioner), and :meth:`choose` picks the layout with ``(m - d) T + S <= m (T + P)``,
    at most ``1/k`` of the dense bytes (docs/recording.md, "Sparse checkpoints").

    Attributes
    ----------
    k : int
        ``checkpoint_every``.
    m : int
        Slots per window (the optimizer state every ``m * k`` steps).
    d : int
        Slots without a stored :math:`\theta` before each window's end, ``0 <= d < m``.
    """

    k: int
    m: int = 1
    d: int = 0

    @classmethod
    def choose(cls, k: int, theta: int, state: int, extra: int) -> SparseLayout:
        """The layout of the fewest dropped slots ``d``, then the shortest window ``m``, within ``1/k`` of dense.

        Parameters
        ----------
        k : int
            ``checkpoint_every``.
        theta, state, extra : int
            ``T``, ``S`` and ``P`` of the class docstring, in bytes.
        """
        for d in range(MAX_SLOTS):
            for m in range(d + 1, MAX_SLOTS + 1):
                if (m - d) * theta + state <= m * (theta + extra):
                    return cls(k, m, d)
        m = max(1, math.ceil((theta + state) / max(theta + extra, 1)))  # one theta and the state per window
        return cls(k, m, m - 1)

    def stores_params(self, s: int) -> bool:
        r"""Whether step ``s`` keeps :math:`\theta_{s+1}` (before the end of recording)."""
        if (s + 1) % self.k:
            return False
        slot = ((s + 1) // self.k) % self.m
        return slot == 0 or slot < self.m - self.d

    def stores_state(self, s: int) -> bool:
        """Whether step ``s`` keeps the optimizer state (a full checkpoint)."""
        return (s + 1) % (self.k * self.m) == 0
