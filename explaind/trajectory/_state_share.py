r"""A dense store's copy of the optimizer state after a step, sharing the audit's momentum where the bytes agree.

After step :math:`s` a dense store keeps the optimizer's state (``optimizer/state-*.safetensors``) and,
with the update audit on, the audit's own momentum :math:`m_s` (docs/maths.md §3), which the next
step's audit reads. For an optimizer whose momentum buffer the adapter reproduces with torch's own
rounding (SGD with momentum: ``buf = momentum * buf + g``, and the audit's
:math:`m_s = a_s \odot m_{s-1} + b_s \odot u_s` with :math:`a_s` the momentum and :math:`b_s = 1`),
the two tensors hold the same bytes, and the copy of the state was a second copy of :math:`m_s`:
43 MB on a ResNet-18, alive through the next forward and backward, where the training loop's memory
peaks (``benchmarks/bench_recording_peak.py``; docs/recording.md, "Recording cost on real models").

:class:`StateCopy` replaces that copy by the audit's tensor where the two are equal byte for byte
(``memcmp``, :func:`~explaind.trajectory._gradients.same_bytes`), and copies as before where they
are not (Adam's ``exp_avg``, which torch updates with ``lerp_``, differs in its last bits; a state
edited outside the optimizer). Either way the stored file holds the state's own bytes, so the store
is the same bit for bit (``tests/test_recorder_state_share.py``). The comparison runs on the state
copier's thread while the loop computes the next forward and backward, as the copy did: the state
changes only inside ``optimizer.step()``, which waits for it first, and the audit never writes into a
momentum tensor it handed out (it makes new ones at every step).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, wait

import torch
from torch import Tensor

from ._background import CopyPool
from ._gradients import same_bytes

__all__ = ["StateCopy", "momentum_by_state_index"]

#: the pool key prefix of the optimizer state's copies
PREFIX = "state."


def momentum_by_state_index(optimizer: torch.optim.Optimizer, names: dict[int, str],
                            momentum: dict[str, Tensor]) -> dict[str, Tensor]:
    """The audit's momentum keyed by the optimizer state's parameter index (``"state.<i>."``).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Its ``state_dict()`` numbers the parameters of its groups consecutively, in order.
    names : dict of int to str
        ``id(parameter)`` to the recorded name.
    momentum : dict of str to Tensor
        The audit's :math:`m_s` per recorded name.
    """
    out: dict[str, Tensor] = {}
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names.get(id(p))
            if name is not None and name in momentum:
                out[f"{PREFIX}{index}."] = momentum[name]
            index += 1
    return out


def _shareable(candidate: Tensor | None, value: Tensor) -> bool:
    """Whether ``candidate`` may stand for ``value`` once their bytes agree (one layout, on the CPU)."""
    return (candidate is not None and candidate.device.type == "cpu" and value.device.type == "cpu"
            and candidate.dtype == value.dtype and candidate.shape == value.shape
            and candidate.is_contiguous() and value.is_contiguous())


class StateCopy:
    """The copies of one step's optimizer-state tensors: pool buffers, or the audit's momentum where equal.

    Use :meth:`take` as :func:`~explaind.trajectory._io.encode_optimizer_state`'s ``copy``, run
    :attr:`pairs` and :meth:`compare` on the state copier, :meth:`resolve` the encoded tensors once they
    finished (on the writer, before writing) and :meth:`release` the pool buffers once written.

    Parameters
    ----------
    pool : CopyPool
        Where the copies' buffers come from (key ``"state.<key>"``) and go back to.
    momentum : dict of str to Tensor, optional
        The audit's momentum of the step by state prefix (:func:`momentum_by_state_index`): a state
        tensor of that parameter with its shape, dtype and bytes is stored from it, not copied.
    """

    def __init__(self, pool: CopyPool, momentum: dict[str, Tensor] | None = None):
        self._pool = pool
        self._momentum = momentum or {}
        self._pairs: list[tuple[Tensor, Tensor]] = []  # (pool buffer, state tensor): copied by the job
        self._maybe: list[tuple[str, Tensor, Tensor]] = []  # (key, audit momentum, state tensor): compared first
        self._chosen: dict[str, Tensor] = {}  # key -> what is written for a compared tensor (after the job)
        self._pooled: dict[str, Tensor] = {}  # key -> pool buffer, given back by release()
        self._lock = threading.Lock()
        self._futures: list[Future] = []

    @property
    def pooled(self) -> dict[str, Tensor]:
        """The pool buffers holding copies so far, by state key (read by ``benchmarks/bench_recording_peak.py``)."""
        with self._lock:
            return dict(self._pooled)

    @property
    def shared(self) -> int:
        """How many state tensors are stored from the audit's momentum (known once :meth:`compare` ran)."""
        with self._lock:
            return sum(1 for key, _, _ in self._maybe if key not in self._pooled)

    def take(self, key: str, value: Tensor) -> Tensor:
        """The tensor that stands for state tensor ``key`` in the encoded state.

        A pool buffer for the copier to fill (:attr:`pairs`), a copy made now (tensors on another device, in its
        stream order), or, where the audit's momentum may share it, ``value`` itself as a
        placeholder that :meth:`resolve` replaces.
        """
        value = value.detach()
        if value.device.type != "cpu":
            buf = self._pooled[key] = self._pool.copy(PREFIX + key, value)
            return buf
        prefix = key[: key.index(".", len(PREFIX)) + 1] if key.startswith(PREFIX) else ""
        candidate = self._momentum.get(prefix)
        if _shareable(candidate, value):
            assert candidate is not None
            self._maybe.append((key, candidate, value))
            return value
        buf = self._pooled[key] = self._pool.buffer(PREFIX + key, value)
        self._pairs.append((buf, value))
        return buf

    @property
    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """``[(pool buffer, state tensor), ...]``: the plain copies, for :meth:`StateCopier.submit`."""
        return list(self._pairs)

    def compare(self) -> Callable[[], None] | None:
        """The job that compares the placeholders' tensors with the audit's momentum and copies those that differ,
        to run on the state copier (``None``: no placeholder)."""
        if not self._maybe:
            return None

        def run() -> None:
            for key, candidate, value in self._maybe:
                if same_bytes(candidate, value):
                    chosen = candidate
                else:
                    chosen = self._pool.buffer(PREFIX + key, value).copy_(value)
                    with self._lock:
                        self._pooled[key] = chosen
                self._chosen[key] = chosen

        return run

    def started(self, futures: list[Future]) -> None:
        """Note the futures of the copier's jobs (:meth:`release` waits for them)."""
        self._futures = list(futures)

    def resolve(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """``tensors`` (the encoded state) with the placeholders of :meth:`take` replaced; call after :meth:`compare`
        ran."""
        if not self._maybe:
            return tensors
        return {k: self._chosen.get(k, v) for k, v in tensors.items()}

    def release(self) -> None:
        """Give the pool buffers back once the step is written (after the copier's jobs, which may still fill one)."""
        if self._futures:
            wait(self._futures)
        with self._lock:
            pooled, self._pooled = self._pooled, {}
        self._pool.release(PREFIX, pooled)
