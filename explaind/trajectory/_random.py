r"""The random state of every training forward, captured so the engine can replay it (docs/recording.md).

A model with dropout draws its masks from the global generators; a model with batch norm in
training mode couples the samples of a batch through the batch statistics. Either way the
gradient the optimizer saw is :math:`c_s\nabla_\theta\sum_k w_k\ell_k(F(X_B;\theta_s,\xi_s))`, a
function of the *batched* forward :math:`F` and of the random state :math:`\xi_s` (docs/maths.md,
"Dropout and batch norm"). :class:`RandomCapture` is a forward pre-hook on the root module: before
every forward that runs in training mode with gradients enabled it saves the state of the CPU
generator (and of every CUDA device's generator once CUDA is initialised); ``log_batch`` then ties
the state of that forward to its micro-batch (:class:`MicroBatch`). :func:`replayed` runs code
under a saved state without touching the caller's generators.

The rule (``capture_random="auto"``): capture when the model holds a dropout layer with
``p > 0`` or a batch-norm layer; ``True`` always, ``False`` never. The CPU state is 5,056 bytes,
each CUDA device's 16 bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError, TrajectoryError

__all__ = ["RandomState", "MicroBatch", "RandomCapture", "coupled_modules", "replayed", "replay_parts",
           "pack_micro_batches",
           "unpack_micro_batches"]


def coupled_modules(model: nn.Module) -> list[str]:
    """Names of the dropout (``p > 0``) and batch-norm modules of ``model``, whatever their mode."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append(name or type(module).__name__)
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            found.append(name or type(module).__name__)
    return found


@dataclass(frozen=True)
class RandomState:
    """The generators' states before one training forward.

    Attributes
    ----------
    cpu : Tensor
        ``torch.get_rng_state()`` (uint8, 5,056 bytes).
    cuda : tuple of Tensor
        ``torch.cuda.get_rng_state_all()`` when CUDA was initialised, else empty.
    device : str
        Device type of the model's parameters during the forward (``"cpu"``, ``"cuda"``): the
        generator its random layers drew from.
    """

    cpu: Tensor
    cuda: tuple[Tensor, ...]
    device: str

    @classmethod
    def now(cls, device: str) -> RandomState:
        """The current states."""
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
        return cls(torch.get_rng_state(), cuda, device)


@dataclass(frozen=True)
class MicroBatch:
    """One ``log_batch`` call as the engine replays it.

    Attributes
    ----------
    indices : Tensor
        Dataset positions in the order given, int64 ``(n,)``.
    weights : Tensor
        :math:`w_{s,k}`, ``(n,)``.
    forwards : int
        Training forwards (with gradients) seen since the previous ``log_batch``; replayable iff 1.
        ``-1``: not captured (``capture_random=False`` or a run recorded before capturing).
    state : RandomState or None
        The generators before that forward (when ``forwards == 1``).
    eval_forwards : int
        Forwards in evaluation mode (with gradients) seen since the previous ``log_batch``: a
        micro-batch with only these needs no replay (the evaluation-mode recomputation is exact).
    """

    indices: Tensor
    weights: Tensor
    forwards: int = -1
    state: RandomState | None = None
    eval_forwards: int = 0


class RandomCapture:
    """Forward pre-hook on the root module that saves the generators before each training forward.

    Parameters
    ----------
    model : nn.Module
    capture : {"auto", True, False}
        See the module docstring.
    """

    def __init__(self, model: nn.Module, capture: Any):
        if not (capture is True or capture is False or capture == "auto"):
            raise ConfigError(f"capture_random={capture!r} is not allowed. Choose one of: 'auto' (when the model has "
                              f"dropout or batch norm), True, False.")
        self.model = model
        self.coupled = coupled_modules(model)
        self.enabled = bool(self.coupled) if capture == "auto" else bool(capture)
        self.paused = False
        self._handle: Any = None
        self._forwards = self._eval_forwards = 0
        self._state: RandomState | None = None

    def attach(self) -> None:
        """Register the hook (when capturing)."""
        if self.enabled and self._handle is None:
            self._handle = self.model.register_forward_pre_hook(self._hook)

    def detach(self) -> None:
        """Remove the hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: Any) -> None:
        if self.paused or not torch.is_grad_enabled():
            return
        if not module.training:
            self._eval_forwards += 1
            return
        self._forwards += 1
        if self._forwards == 1:
            param = next(module.parameters(), None)
            self._state = RandomState.now(param.device.type if param is not None else "cpu")

    def take(self) -> tuple[int, RandomState | None, int]:
        """``(forwards, state, eval_forwards)`` since the previous call (``(-1, None, 0)`` when not capturing)."""
        if not self.enabled:
            return -1, None, 0
        got = (self._forwards, self._state if self._forwards == 1 else None, self._eval_forwards)
        self._forwards, self._state, self._eval_forwards = 0, None, 0
        return got

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Run the recorder's own forwards (checks): not counted, and the caller's generators left as they were."""
        self.paused = True
        try:
            with torch.random.fork_rng(devices=_cuda_devices(), device_type="cuda"):
                yield
        finally:
            self.paused = False


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


@contextlib.contextmanager
def replayed(state: RandomState, device: torch.device, where: str) -> Iterator[None]:
    """Run the body with the generators set to ``state``; the caller's generators are restored afterwards.

    Raises
    ------
    TrajectoryError
        When the forward drew from a generator this device does not have (recorded on CUDA, replayed
        on CPU or the reverse): its masks cannot be reproduced here.
    """
    if state.device != device.type or (state.device == "cuda" and not state.cuda):
        raise TrajectoryError(
            f"{where}: the training forward ran on {state.device!r} and drew its dropout masks from that device's "
            f"random generator, but the engine computes on {device.type!r}, whose generator gives other masks. Fix: "
            f"compute on the device the run was recorded on (device={state.device!r})."
        )
    devices = list(range(len(state.cuda))) if state.device == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.set_rng_state(state.cpu)
        for d, s in enumerate(state.cuda if devices else ()):
            torch.cuda.set_rng_state(s, d)
        yield


def replay_parts(micro: Sequence[MicroBatch], coupled: Sequence[str],
                 where: str) -> tuple[tuple[int, int, RandomState], ...] | None:
    """Positions ``[lo, hi)`` in the merged batch and states of the micro-batches to replay.

    ``None`` when every micro-batch ran its forward in evaluation mode (the evaluation-mode
    recomputation is then exact).

    Raises
    ------
    TrajectoryError
        When a micro-batch saw no or several training forwards between two ``log_batch`` calls, or
        the step mixes training- and evaluation-mode micro-batches: its masks and batch statistics
        are not known.
    """
    if all(m.forwards == 0 and m.eval_forwards > 0 for m in micro):
        return None
    parts, lo = [], 0
    for i, m in enumerate(micro):
        n = int(m.indices.shape[0])
        if m.forwards != 1 or m.state is None:
            raise TrajectoryError(
                f"{where}: micro-batch {i} saw {m.forwards} training forward(s) between two rec.log_batch calls, so "
                f"the dropout masks and batch statistics of the modules {list(coupled)} cannot be replayed and the "
                f"split over samples would be inexact. Fix: record with one training forward of exactly the logged "
                f"samples per rec.log_batch(indices) call."
            )
        parts.append((lo, lo + n, m.state))
        lo += n
    return tuple(parts)


# ---------------------------------------------------------------------- storage
def pack_micro_batches(micro: Sequence[MicroBatch]) -> dict[str, Tensor]:
    """Step-file tensors of the micro-batches (their merged indices and weights are stored as the batch).

    ``micro.sizes``, ``micro.forwards`` and ``micro.eval_forwards`` (int64 ``(M,)``), and per captured
    micro-batch ``m``
    ``micro.{m}.cpu`` and ``micro.{m}.cuda`` (``(n_devices, 16)``); the state's device type is
    ``micro.{m}.on_cuda`` (a 0-d bool).
    """
    out = {"micro.sizes": torch.tensor([int(m.indices.shape[0]) for m in micro], dtype=torch.long),
           "micro.forwards": torch.tensor([m.forwards for m in micro], dtype=torch.long),
           "micro.eval_forwards": torch.tensor([m.eval_forwards for m in micro], dtype=torch.long)}
    for i, m in enumerate(micro):
        if m.state is not None:
            out[f"micro.{i}.cpu"] = m.state.cpu
            out[f"micro.{i}.on_cuda"] = torch.tensor(m.state.device == "cuda")
            if m.state.cuda:
                out[f"micro.{i}.cuda"] = torch.stack(list(m.state.cuda))
    return out


def unpack_micro_batches(tensors: dict[str, Tensor], indices: Tensor, weights: Tensor,
                         where: str) -> list[MicroBatch]:
    """Inverse of :func:`pack_micro_batches` (one uncaptured micro-batch when the file holds none)."""
    if "micro.sizes" not in tensors:
        return [MicroBatch(indices, weights)]
    sizes, forwards = tensors["micro.sizes"].tolist(), tensors.get("micro.forwards")
    if forwards is None or sum(sizes) != indices.shape[0] or len(forwards) != len(sizes) or min(sizes) < 0:
        raise TrajectoryError(f"Trajectory file {where}: its micro-batch sizes {sizes} do not add up to the batch of "
                              f"{indices.shape[0]} samples. The store is corrupted; re-record the run.")
    evals = tensors.get("micro.eval_forwards", torch.zeros(len(sizes), dtype=torch.long)).tolist()
    out, lo = [], 0
    for i, (n, f) in enumerate(zip(sizes, forwards.tolist())):
        state = None
        if f"micro.{i}.cpu" in tensors:
            cuda = tensors.get(f"micro.{i}.cuda")
            on_cuda = bool(tensors.get(f"micro.{i}.on_cuda", torch.tensor(False)))
            state = RandomState(tensors[f"micro.{i}.cpu"], tuple(cuda) if cuda is not None else (),
                                "cuda" if on_cuda else "cpu")
        out.append(MicroBatch(indices[lo:lo + n], weights[lo:lo + n], int(f), state, int(evals[i])))
        lo += n
    return out
