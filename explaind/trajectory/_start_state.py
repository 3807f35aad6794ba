r"""The optimizer state a recording starts from: taken from the live optimizer, checked, stored and read back.

A recording may open on an optimizer that already holds state: restored from a framework checkpoint
(``trainer.train(resume_from_checkpoint=...)``, ``trainer.fit(..., ckpt_path=...)``) or after steps the
loop took before ``with rec:``. Its second moments and step counts are read from the live state at every
step by the optimizer adapter, so only the first moment needs a start value: the recurrence of
docs/maths.md §3 then starts from :math:`m_{-1} = m_{start}` instead of 0, and the part of every update
that :math:`m_{start}` carries is the exact ``initial_state`` term of an attribution (docs/maths.md §4,
"Optimizer state at the start").

The start buffers go to the store's start file :data:`START_STATE_FILE` (tensors ``m.<parameter name>``,
written with the other start files before the manifest, checksummed and checked by ``verify()``);
a parameter without an entry starts from zero. The same file keeps the optimizer's whole state at the
start for what replays the optimizer itself (:mod:`explaind.trajectory._start_optimizer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError, TrajectoryError
from ._io import read_tensors
from ._start_optimizer import OPT_PREFIX, OptimizerStart, optimizer_start_from_file
from .manifest import FileRecord

__all__ = ["START_STATE_FILE", "PREFIX", "held_state", "capture_start_state",
           "check_initial_state", "start_state_tensors", "start_state_from_tensors", "read_start_file"]

#: The store's start file holding :math:`m_{-1}` (only written when some buffer is held at the start).
START_STATE_FILE = "initial_state.safetensors"
#: Key prefix of a parameter's start buffer in that file.
PREFIX = "m."


def held_state(optimizer: torch.optim.Optimizer) -> int:
    """Number of parameters for which ``optimizer`` holds state (momentum buffers, moments, step counts)."""
    return sum(1 for state in optimizer.state.values() if len(state) > 0)


def stepped_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` holds state from steps taken: state other than what its constructor built.

    Some optimizers (Adagrad) build their state in ``__init__`` (``step = 0`` and the initial
    accumulator); state whose every ``step`` count is zero is that, not the trace of a step.
    """
    for state in optimizer.state.values():
        step = state.get("step") if len(state) else 0
        if step is None or float(step) != 0.0:
            return True
    return False


def capture_start_state(adapter: Any, adapter_name: str, optimizer: torch.optim.Optimizer,
                        params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
    r"""The start buffers :math:`m_{-1}` of the recorded parameters, name -> new tensor (empty for a fresh optimizer).

    Parameters
    ----------
    adapter : OptimizerAdapter
        Its optional ``start_state(optimizer)`` returns ``id(param) -> m_{-1}``.
    adapter_name : str
        For messages.
    optimizer : torch.optim.Optimizer
    params : mapping of str to Parameter
        The recorded parameters.

    Raises
    ------
    explaind.exceptions.ConfigError
        The optimizer holds state and the adapter has no ``start_state``.
    """
    held = held_state(optimizer)
    if not held:
        return {}
    kind = type(optimizer).__name__
    starter = getattr(adapter, "start_state", None)
    if not callable(starter):
        raise ConfigError(
            f"The optimizer already holds {kind} state for {held} parameter(s) (restored from a checkpoint or after "
            f"unrecorded steps), and the optimizer adapter {adapter_name!r} has no start_state() to read it, so the "
            f"part of each update carried over from before the recording cannot be modelled. Fix: record from a "
            f"fresh optimizer, or give the adapter a start_state(optimizer) method (docs/optimizers.md)."
        )
    buffers = starter(optimizer)
    out: dict[str, Tensor] = {}
    for name, p in params.items():
        m = buffers.get(id(p))
        if m is None:
            continue
        if tuple(m.shape) != tuple(p.shape):
            raise ConfigError(f"The optimizer adapter {adapter_name!r} returned a start buffer of shape "
                              f"{tuple(m.shape)} for {name!r} of shape {tuple(p.shape)}; it must be shaped like the "
                              f"parameter. Fix the adapter's start_state().")
        out[name] = m.detach().to(device=p.device, dtype=p.dtype).clone()
    return out


def _problems(state: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> list[str]:
    """What is wrong with start buffers ``state`` for ``params``: unknown names, shapes unlike the parameter's."""
    problems = [f"{n!r} is not a trainable parameter of the run" for n in state if n not in params]
    problems += [f"{n!r} has shape {tuple(t.shape)}, its parameter {tuple(params[n].shape)}" for n, t in state.items()
                 if n in params and tuple(t.shape) != tuple(params[n].shape)]
    return problems


def check_initial_state(state: Mapping[str, Tensor] | None, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` checked against the parameters: known names, their shapes (raises ``TrajectoryError``)."""
    if not state:
        return {}
    problems = _problems(state, params)
    if problems:
        raise TrajectoryError(f"initial_state: {'; '.join(problems)}. Allowed: buffers shaped like the trainable "
                              f"parameters {list(params)}. Fix: pass m_-1 only for recorded parameters, each with its "
                              f"parameter's shape.")
    return dict(state)


def start_state_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of :data:`START_STATE_FILE` (contiguous CPU copies)."""
    return {PREFIX + n: t.detach().to("cpu").contiguous() for n, t in state.items()}


def start_state_from_tensors(tensors: Mapping[str, Tensor], params: Mapping[str, Tensor], where: str
                             ) -> dict[str, Tensor]:
    """Read back :func:`start_state_tensors` (names and shapes checked against ``params``; ``where`` names the file).

    The optimizer's whole start state in the same file (``opt.`` tensors) is read by
    :func:`~explaind.trajectory._start_optimizer.optimizer_start_from_file`."""
    state = {}
    for key, t in tensors.items():
        if key.startswith(OPT_PREFIX):  # the optimizer's whole start state (_start_optimizer)
            continue
        if not key.startswith(PREFIX):
            raise TrajectoryError(f"Trajectory file {where} holds the tensor {key!r}; a start-state file holds only "
                                  f"'{PREFIX}<parameter>' tensors. The store is corrupted; re-record the run.")
        state[key[len(PREFIX):]] = t
    problems = _problems(state, params)
    if problems:
        raise TrajectoryError(f"Trajectory file {where} does not hold start buffers of this run's parameters: "
                              f"{'; '.join(problems)}. The store is corrupted; re-record the run.")
    return state


def read_start_file(root: Path, record: FileRecord | None, params: Mapping[str, Tensor]
                    ) -> tuple[dict[str, Tensor], OptimizerStart | None]:
    """:data:`START_STATE_FILE` of the store at ``root``: :math:`m_{-1}` and the optimizer's start state (if kept)."""
    if record is None:
        return {}, None
    tensors, metadata = read_tensors(root, record)
    where = repr(str(root / record.path))
    return start_state_from_tensors(tensors, params, where), optimizer_start_from_file(tensors, metadata, where)
