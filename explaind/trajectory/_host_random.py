r"""Random draws in a training forward that the recorder cannot replay (numpy, Python) or does not capture (torch).

The recorder replays a training forward under the torch generators' states it captured before it
(:mod:`~explaind.trajectory._random`), so dropout masks, ``torch.rand`` and ``torch.bernoulli`` draws are
recomputed exactly (docs/recording.md, "Dropout and batch norm"). A forward that draws from another source —
``numpy.random``'s global state, Python's ``random`` module, or a ``numpy.random.Generator``,
``numpy.random.RandomState`` or ``random.Random`` held as an attribute of one of the model's modules (stochastic
depth or SpecAugment-style masking written with numpy) — would be replayed with other numbers, and the
gradients of its samples, hence the split of every step over samples, would be off. ``numpy.random``'s global
state is the exception while the random states are captured: it is saved and replayed with them
(:mod:`~explaind.trajectory._numpy_random`), so the guard watches it only when nothing is captured.

:class:`HostDrawGuard` is a pair of forward hooks on the root module: before every training forward with
gradients it takes a fingerprint of those states, after the forward it compares; a changed state raises a
:class:`~explaind.exceptions.TrajectoryError` naming the source and the fix (draw with torch), at the forward
that drew. The fingerprint of numpy's global generator reads its Mersenne Twister position and two key words in
place (:class:`_GlobalPosition`, about 0.1 µs; copying its state took about 40 µs twice per forward); held
generators and Python's module (its state tuple, about 11 µs) are copied.

Torch draws that nothing captures. ``capture_random="auto"`` captures the random state of each training forward
when a module of the model shows that it draws (a dropout layer with ``p > 0``, batch norm, a private generator:
:mod:`~explaind.trajectory._random`). A forward may draw with no such module: ``F.dropout`` or
``F.scaled_dot_product_attention(dropout_p > 0)`` called in ``forward`` (the attention code of many Hugging Face
models passes the config's ``attention_dropout`` there, and ``F.dropout`` for residual or embedding dropout), or
``torch.rand``. Those masks are then not replayed: explaind recomputes the step's gradients without them, and the
split of every step over samples is inexact (the gradient check fails at step 0; with the check off, the residual
holds it). :class:`TorchDrawProbe`, attached only while nothing is captured under ``"auto"``, copies the CPU
generator's state (5,056 bytes) and each initialised CUDA device's before a training forward with gradients and
compares them after it; the first forward that moved one warns
(:class:`~explaind.exceptions.ExplaindWarning`) naming the model, the calls that draw so, and the fix,
``capture_random=True``; later forwards are not probed.
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..exceptions import TrajectoryError, warn_at_caller
from ._common import ForwardHookPair

__all__ = ["HostDrawGuard", "TorchDrawProbe", "host_generators"]

#: The name of numpy's global state among the sources.
NUMPY_GLOBAL = "numpy.random (the global state)"

#: Random sources of the host (not torch) a module may hold as an attribute.
_HOST_TYPES = (np.random.Generator, np.random.RandomState, random.Random)


def host_generators(model: nn.Module) -> dict[str, Any]:
    """``"<module>.<attribute>" -> generator`` for every numpy or Python generator a module holds directly."""
    found = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, _HOST_TYPES):
                found[f"{name}.{attr}" if name else attr] = value
    return found


class _GlobalPosition:
    """numpy's global generator, fingerprinted in place: MT19937's position and its first and last key words.

    A draw moves the position, or regenerates the whole key when it wraps (so a draw of a multiple of 624
    words changes the key words); only a normal draw served from the legacy Gaussian cache moves neither,
    and the next normal draw does. ``None`` from :meth:`find` where the layout read does not agree with
    ``get_state()`` (another numpy): the guard then copies the state.
    """

    def __init__(self, generator: Any):
        address = generator.ctypes.state_address
        self._key = (ctypes.c_uint32 * 624).from_address(address)
        self._pos = ctypes.c_int.from_address(address + 624 * ctypes.sizeof(ctypes.c_uint32))

    @classmethod
    def find(cls) -> _GlobalPosition | None:
        try:
            found = cls(np.random.mtrand._rand._bit_generator)
            _, key, pos, *_ = np.random.get_state(legacy=True)
        except (AttributeError, TypeError, ValueError):
            return None
        return found if found.state() == (int(pos), int(key[0]), int(key[623])) else None

    def state(self) -> tuple[int, int, int]:
        return self._pos.value, self._key[0], self._key[623]


def _state(source: Any) -> Any:
    """A comparable snapshot of one source's state."""
    if isinstance(source, _GlobalPosition):
        return source.state()
    if isinstance(source, np.random.Generator):
        return source.bit_generator.state
    if isinstance(source, np.random.RandomState):
        return source.get_state(legacy=False)
    return source.getstate()


def _same(a: Any, b: Any) -> bool:
    """Whether two snapshots of :func:`_state` are equal (numpy arrays compared by value)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return bool(np.array_equal(a, b))
    return bool(a == b)


class HostDrawGuard(ForwardHookPair):
    """Raise at a training forward that draws from ``numpy.random``, Python's ``random`` or a held host generator.

    Parameters
    ----------
    model : nn.Module
        The recorded model; its modules' numpy and Python generators are found once (:func:`host_generators`).
    active : callable
        ``active()`` says whether the recorder watches this forward (not one of its own checks).
    numpy_captured : bool
        Whether numpy's global state is captured and replayed with the torch states (``capture_random`` on:
        :mod:`~explaind.trajectory._numpy_random`); its draws are then allowed.
    """

    def __init__(self, model: nn.Module, active: Callable[[], bool], numpy_captured: bool = False):
        self.model = model
        self.active = active
        self.numpy_captured = numpy_captured
        numpy_global = _GlobalPosition.find() or np.random.mtrand._rand
        self.sources: dict[str, Any] = {**({} if numpy_captured else {NUMPY_GLOBAL: numpy_global}),
                                        "random (Python's module-level functions)": random._inst,
                                        **host_generators(model)}
        self._before: dict[str, Any] | None = None
        self._handles: list[Any] = []

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._before = {k: _state(v) for k, v in self.sources.items()} if self.active() and module.training \
            else None

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        before, self._before = self._before, None
        if before is None:
            return
        drew = [k for k, v in self.sources.items() if not _same(before[k], _state(v))]
        if drew:
            raise TrajectoryError(
                f"A training forward of the recorded model drew random numbers from {drew}, which explaind does not "
                f"capture: replaying this forward would draw other numbers, and the split of the step over samples "
                f"would be inexact. Allowed: draws from torch's generators (torch.rand, torch.bernoulli, dropout, "
                f"or a torch.Generator held by a module), which the recorder captures and replays. Fix: draw with "
                f"torch inside forward, e.g. torch.rand(n, device=x.device) instead of numpy.random.rand(n) or "
                f"random.random()."
                + (" numpy.random's global state alone is captured and replayed with "
                   "TrajectoryRecorder(..., capture_random=True) (Hugging Face Wav2Vec2's SpecAugment draws there)."
                   if NUMPY_GLOBAL in drew else ""))


def _states() -> list[torch.Tensor]:
    cuda = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())] \
        if torch.cuda.is_initialized() else []
    return [torch.get_rng_state(), *cuda]


class TorchDrawProbe(ForwardHookPair):
    """Warn once at a training forward that draws from torch's global generators while none is captured.

    Parameters
    ----------
    model : nn.Module
        The recorded model.
    active : callable
        ``active()`` says whether the recorder watches this forward (not one of its own checks).
    """

    def __init__(self, model: nn.Module, active: Callable[[], bool]):
        self.model = model
        self.active = active
        self.warned = False
        self._before: list[torch.Tensor] | None = None
        self._handles: list[Any] = []

    def attach(self) -> None:
        """Register the two hooks (not again once it has warned)."""
        if not self.warned:
            super().attach()

    def _pre(self, module: nn.Module, args: Any) -> None:
        watched = not self.warned and module.training and torch.is_grad_enabled() and self.active()
        self._before = _states() if watched else None

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        before, self._before = self._before, None
        if before is None:
            return
        after = _states()
        if len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after)):
            return
        self.warned = True
        self.detach()
        warn_at_caller(
            f"A training forward of the recorded model ({type(module).__name__}) drew random numbers from torch's "
            f"generator, but none of its modules is a dropout layer with p > 0, batch norm or a held "
            f"torch.Generator, so capture_random='auto' captures no random state: the draws are made in forward "
            f"itself (F.dropout, F.scaled_dot_product_attention(dropout_p > 0) as Hugging Face attention passes the "
            f"config's attention dropout, torch.rand, torch.bernoulli), and without their states explaind "
            f"recomputes the gradients without those masks, so the split of each step over samples is inexact (the "
            f"gradient check fails at step 0; with it off, the residual holds the difference). Fix: "
            f"TrajectoryRecorder(..., capture_random=True), which replays every training forward with its recorded "
            f"state; or set those dropout probabilities to 0.")
