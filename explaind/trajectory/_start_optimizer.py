r"""The optimizer's whole state when a recording opens on one that already holds state.

The recurrence needs only the first moment :math:`m_{-1}` from before step 0
(:mod:`explaind.trajectory._start_state`), but what replays the optimizer itself from its state
before step 0 needs all of it: the counterfactual metagradient (Adam's second moment :math:`v_{-1}`,
AMSGrad's maximum and the step count :math:`t_{start}`; docs/maths.md §9, "A run that started from
optimizer state") and the first segment of a sparse store (:mod:`explaind.trajectory.replay`); a resumed
recording compares the optimizer it is given with the state it continues (:func:`state_differences`).
:class:`OptimizerStart` is ``optimizer.state_dict()`` at that moment, encoded as the
optimizer-state files are (:func:`~explaind.trajectory._io.encode_optimizer_state`), with the name of
the parameter at every state index. In a store it goes into the same start file as :math:`m_{-1}`
(``initial_state.safetensors``): tensors ``opt.state.<i>.<key>`` and ``opt.group.<g>.<key>``, and two
metadata entries (``"optimizer"``, the JSON description; ``"params"``, the names). A store written
before this file held them has none: such a run's counterfactual is refused unless ``m_{-1}`` is all
its pure update needs (SGD).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError
from ._io import _optimizer_description, _state_key, decode_optimizer_state, encode_optimizer_state

__all__ = ["OPT_PREFIX", "OptimizerStart", "capture_optimizer_start", "optimizer_start_file",
           "optimizer_start_from_file", "state_differences"]

#: Key prefix of the optimizer's start state in the start file.
OPT_PREFIX = "opt."
#: Metadata entry of the start file naming the parameter at every state index (JSON list).
NAMES_KEY = "params"


@dataclass(frozen=True)
class OptimizerStart:
    """``optimizer.state_dict()`` when recording opened, encoded, and the parameter name at each state index.

    Attributes
    ----------
    tensors : dict of str to Tensor
        CPU copies, ``state.<i>.<key>`` and ``group.<g>.<key>``
        (:func:`~explaind.trajectory._io.encode_optimizer_state`).
    metadata : dict of str to str
        ``{"optimizer": <JSON description>}``.
    names : tuple of str
        ``names[i]``: the model's name of the parameter at state index ``i``.
    """

    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    names: tuple[str, ...]

    def state_dict(self, live: Mapping[str, Any], where: str) -> dict[str, Any]:
        """A ``state_dict`` (new tensors) for an optimizer with the same parameters and groups (``live``: its own)."""
        n_live = sum(len(g["params"]) for g in live.get("param_groups", []))
        if n_live != len(self.names):
            raise TrajectoryError(f"{where}: the optimizer's start state covers {len(self.names)} parameters "
                                  f"{list(self.names)[:6]}, the replay optimizer holds {n_live}. The store is "
                                  f"corrupted; re-record the run.")
        # copies: load_state_dict keeps tensors of the right dtype and device, and step() updates them in place
        tensors = {k: t.clone() for k, t in self.tensors.items()}
        return decode_optimizer_state(tensors, self.metadata, dict(live), where)

    def entries(self, where: str) -> dict[str, dict[str, Any]]:
        """Per parameter name, its state entry (torch's keys: ``exp_avg_sq``, ``step``, ...; tensors and numbers).

        Raises :class:`TrajectoryError` naming ``where`` when an index or a tensor name is not one
        :func:`~explaind.trajectory._io.encode_optimizer_state` writes for these parameters.
        """
        n = len(self.names)
        desc = _optimizer_description(self.metadata, where, n)
        out = {self.names[int(i)]: dict(entry) for i, entry in desc["state"].items()}
        for key, t in self.tensors.items():
            kind, index, name = _state_key(key, where, n, len(desc["param_groups"]))
            if kind == "state":
                out.setdefault(self.names[index], {})[name] = t
        return out


def capture_optimizer_start(optimizer: torch.optim.Optimizer, model: nn.Module) -> OptimizerStart | None:
    """The optimizer's state at the start (``None`` for a fresh optimizer, one that holds no state)."""
    if not any(len(state) > 0 for state in optimizer.state.values()):
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    order = tuple(names[id(p)] for group in optimizer.param_groups for p in group["params"])
    tensors, metadata = encode_optimizer_state(optimizer.state_dict(),
                                               copy=lambda _k, v: v.detach().to("cpu", copy=True).contiguous())
    return OptimizerStart(tensors, metadata, order)


def optimizer_start_file(start: OptimizerStart | None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The start file's tensors and metadata for ``start`` (empty for ``None``)."""
    if start is None:
        return {}, {}
    tensors = {OPT_PREFIX + k: t for k, t in start.tensors.items()}
    return tensors, {"optimizer": start.metadata["optimizer"], NAMES_KEY: json.dumps(list(start.names))}


def optimizer_start_from_file(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], where: str
                              ) -> OptimizerStart | None:
    """Read back :func:`optimizer_start_file` (``None`` when the file holds no optimizer state: an older store)."""
    mine = {k[len(OPT_PREFIX):]: t for k, t in tensors.items() if k.startswith(OPT_PREFIX)}
    if NAMES_KEY not in metadata and not mine:
        return None
    try:
        names = json.loads(metadata[NAMES_KEY])
        ok = isinstance(names, list) and all(isinstance(n, str) for n in names) and "optimizer" in metadata
    except (KeyError, TypeError, ValueError, RecursionError):  # RecursionError: nested deeper than json goes
        ok = False
    if not ok:
        raise TrajectoryError(f"Trajectory file {where} holds the optimizer's start state without its description "
                              f"(the metadata entries 'optimizer' and '{NAMES_KEY}': a JSON list of parameter "
                              f"names). The store is corrupted; re-record the run.")
    start = OptimizerStart(mine, {"optimizer": metadata["optimizer"]}, tuple(names))
    start.entries(f"Trajectory file {where}")  # indices and tensor names checked now
    return start


def state_differences(optimizer: torch.optim.Optimizer, stored: Mapping[str, Any]) -> list[str]:
    """Where the optimizer's per-parameter state differs from a decoded stored ``state_dict`` (bit for bit).

    Hyperparameters (``param_groups``) are not compared: the recorder follows them at every step.
    """
    live = optimizer.state_dict()["state"]
    saved = stored.get("state", {})
    out = []
    for i in sorted(set(live) | set(saved)):
        a, b = live.get(i, {}), saved.get(i, {})
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key), b.get(key)
            if isinstance(x, Tensor) and isinstance(y, Tensor):
                same = x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.detach().cpu(), y.detach().cpu())
            else:
                same = not isinstance(x, Tensor) and not isinstance(y, Tensor) and x == y
            if not same:
                out.append(f"state[{i}][{key!r}]" + (" (missing)" if x is None or y is None else ""))
    return out
