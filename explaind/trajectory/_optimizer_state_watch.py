r"""The optimizer's carried momentum, watched between steps: a change outside ``optimizer.step()`` is refused.

The adapters model the first moment an optimizer carries from step to step (SGD's and RMSprop's
``momentum_buffer``, the ``exp_avg`` of the Adam family and of Hugging Face's Adafactor) as the linear recurrence
of the recorded gradients, :math:`m_s = a_s \odot m_{s-1} + b_s \odot u_s` (docs/maths.md §4), starting from the
buffer the optimizer held when recording began. A buffer changed between two steps (``opt.load_state_dict`` from
another run's checkpoint, ``state["momentum_buffer"].mul_(0.5)`` by hand) makes torch's next update differ from
the modelled one by a term no sample's gradient produced: before this watch, the run was recorded without a word
and the estimators' residual share (0.07 to 0.16 on the cases of tests/test_stranger_loops_round8.py) blamed the
optimizer adapter.

What is watched. After every ``optimizer.step()`` (a step post-hook) each carried buffer is kept by reference
with torch's version counter :math:`v`, a copy of a sample of its bits (:func:`sampled_bits`: at most
:data:`SAMPLE` entries, evenly strided, read as integers so a NaN compares equal to itself) and the wrapping sum of
its bits read as 64-bit words (:func:`word_sum`); before the next step (a pre-hook registered before the recorder's)
it must be the same tensor object with the same :math:`v`, the same sampled bits and the same word sum. An in-place
edit bumps :math:`v`; an edit through ``.data`` (``buf.data.mul_(0.5)``), which torch does not count, is seen at that
next step by its bits:

* every edit of one entry, wherever it is (it changes one word by :math:`\delta \not\equiv 0 \pmod{2^{64}}`, so the
  sum moves), and every edit that changes a sampled entry: every edit of the whole buffer (a scaling, a zeroing,
  values copied in) and every edit of a contiguous run of entries at least as long as the stride (``numel / 1024``,
  rounded up; every entry of a buffer of at most 1024);
* before every step the gradient check checks (``check_gradients``'s schedule: with ``"auto"`` steps 0 and 1, the
  powers of 4 and every 1024th), every edit at all: after the step before it a copy of every buffer's bits is kept
  and compared bit by bit;
* before the other steps, any other edit unless it changes no sampled entry and its words' changes cancel in their
  sum modulo :math:`2^{64}`: exactly the edits of unsampled entries whose bit patterns, read as 64-bit words, move
  by amounts that add up to a multiple of :math:`2^{64}` — two unsampled entries swapped (any permutation of
  them), the signs of an even number of unsampled float64 entries flipped (each moves its word by :math:`2^{63}`),
  or entries moved by :math:`+d` and :math:`-d` in their bit patterns. Such an edit made between two unchecked
  steps is recorded; the update audit (``traj.audit()``) and the estimators' residual warning measure it
  (tests/test_stranger_round16_more.py: two signs flipped, residual share 5.2e-4, warned in float64).

``load_state_dict`` puts new tensors in the
state, which are compared by value with the kept one (the same state loaded again passes). A buffer that is gone
(``opt.state.clear()``, a parameter's state deleted) is a restart from zero, which the adapters model exactly (they
read at every step which parameters hold a buffer), and passes. The state the adapters read afresh at every step
(Adam's ``exp_avg_sq`` and ``step``, Adagrad's ``sum``) is not watched: a change of it, through ``.data`` too, is
exact. Every step is checked: the sample costs a copy of at most 1024 entries per buffer, the sum one read of the
buffer, after the step and again before the next (docs/recording.md, "Buffers changed between steps", measures it);
before a step of the gradient check's schedule, a copy of every buffer and one comparison more.
Buffers made under ``torch.inference_mode()`` (which have no counter) are compared by their bits only.

Where the reads after a step run. Given the recorder's
:class:`~explaind.trajectory._background.StateCopier`, the copy of the sample and the sum after the step of the
carried CPU buffers (at least :data:`BESIDE_FROM` entries in all) run on its thread, beside the recorder's own
post-step work (which, on the same thread, copies :math:`\theta_{s+1}` after them), and a post-step hook registered
after the recorder's (:meth:`settle_hooks`) waits for them: when ``optimizer.step()`` returns to the loop they hold
the bits the step left, as when they were taken on the loop's thread, so an edit made right after the step is
refused at the next one. Buffers off the CPU are read on the loop's thread.

Adapters of other plugins carry their own keys: :data:`CARRIED` names those of the first-party adapters, and an
adapter not listed is not watched (its audit, ``traj.audit()``, still measures every step).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError
from ._background import StateCopier

__all__ = ["BESIDE_FROM", "CARRIED", "OptimizerStateWatch", "SAMPLE", "sampled_bits", "word_sum"]

#: The most entries of each carried buffer whose bits are compared between steps.
SAMPLE = 1024

#: Fewest entries of the carried CPU buffers, all together, read on the copier's thread (fewer: inline, cheaper).
BESIDE_FROM = 2 ** 15

#: The state entries each first-party adapter carries as :math:`m_{s-1}` (by adapter name).
CARRIED: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum_buffer",), "rmsprop": ("momentum_buffer",), "adam": ("exp_avg",), "adamw": ("exp_avg",),
    "nadam": ("exp_avg",), "radam": ("exp_avg",), "adamax": ("exp_avg",), "hf_adafactor": ("exp_avg",),
}


class OptimizerStateWatch:
    """Refuse a change of the carried buffers between two ``optimizer.step()`` calls.

    Parameters
    ----------
    adapter : str
        The adapter's registered name (its keys in :data:`CARRIED`; none: nothing is watched).
    params : dict of str to Parameter
        The recorded parameters, to name the edited buffers.
    step : callable
        Returns the number of the step about to be recorded (the recorder's count).
    copier : StateCopier, optional
        The thread that reads the CPU buffers after each step; ``None``: read on the loop's thread.
    full : callable, optional
        ``full(s)``: whether every bit of the buffers is compared before step ``s`` (the gradient check's schedule:
        a copy of each buffer is kept after the step before it); ``None``: never.
    """

    def __init__(self, adapter: str, params: dict[str, nn.Parameter], step: Callable[[], int],
                 copier: StateCopier | None = None, full: Callable[[int], bool] | None = None) -> None:
        self._copier = copier
        self._full_at = full
        #: per carried buffer, a copy of all its bits after the last step, kept when the next step is a full one
        self._whole: dict[tuple[int, str], Tensor] = {}
        self._armed: Future | None = None  # the copier's reading of the buffers after the last step
        self._keys = CARRIED.get(adapter, ())
        self._names = {id(p): n for n, p in params.items()}
        self._step = step
        self._seen: dict[tuple[int, str], tuple[Tensor, int, int]] = {}
        #: per carried buffer, a copy of its sampled bits after the last step
        self._bits: dict[tuple[int, str], Tensor] = {}
        #: per carried buffer, the wrapping sum of its 64-bit words after the last step (:func:`word_sum`)
        self._sums: dict[tuple[int, str], Tensor] = {}
        #: per carried buffer, its sample view and its views as 64-bit words (rebuilt when the buffer or its storage
        #: changes)
        self._views: dict[tuple[int, str], tuple[Tensor, int, Tensor, tuple[Tensor, Tensor | None]]] = {}

    def hooks(self, optimizer: Any) -> list[Any]:
        """Register the pre-step check and the post-step snapshot on ``optimizer``; returns their handles."""
        if not self._keys:
            return []
        self.arm(optimizer, upcoming=self._step())  # what the recording starts from (the adapter's start state)
        self._wait()  # read before the loop can change it
        return [optimizer.register_step_pre_hook(self.check), optimizer.register_step_post_hook(self.arm)]

    def _carried(self, optimizer: Any) -> dict[tuple[int, str], tuple[Tensor, int, int]]:
        out = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                for key in self._keys if state else ():
                    buf = state.get(key)
                    if isinstance(buf, Tensor) and buf.is_floating_point():
                        out[(id(p), key)] = (buf, -1 if buf.is_inference() else buf._version, buf.data_ptr())
        return out

    def _held(self, where: tuple[int, str], buf: Tensor, ptr: int) -> tuple[Tensor, int, Tensor, Any]:
        """The views of ``buf`` (:func:`sampled_bits` and its 64-bit words), kept while the buffer and its storage
        stay."""
        held = self._views.get(where)
        if held is None or held[0] is not buf or held[1] != ptr:
            held = (buf, ptr, sampled_bits(buf), _words(buf))
            memory = buf.untyped_storage().data_ptr()
            if all(v.untyped_storage().data_ptr() == memory for v in (held[2], held[3][0])):
                self._views[where] = held  # views of its memory; views of a copy are made afresh at every read
        return held

    def _sample(self, where: tuple[int, str], buf: Tensor, ptr: int) -> Tensor:
        """The sample view of ``buf`` (:func:`sampled_bits`)."""
        return self._held(where, buf, ptr)[2]

    def _sum(self, where: tuple[int, str], buf: Tensor, ptr: int) -> Tensor:
        """:func:`word_sum` of ``buf`` through its kept views."""
        return _summed(self._held(where, buf, ptr)[3])

    def settle_hooks(self, optimizer: Any) -> list[Any]:
        """Register :meth:`settle` as a post-step hook (after the recorder's own); returns its handle."""
        return [optimizer.register_step_post_hook(self.settle)] if self._keys and self._copier is not None else []

    def arm(self, optimizer: Any, args: Any = (), kwargs: Any = None, upcoming: int | None = None) -> None:
        """Post-step hook: keep each carried buffer, its version counter and a copy of its sampled bits (of all its
        bits when the next step, ``upcoming``, default the step just taken plus one, is a full one).

        With a copier, the copies of the CPU buffers' samples and their sums are made on its thread
        (:meth:`settle` waits for them).
        """
        self._wait()
        self._seen = seen = self._carried(optimizer)
        upcoming = self._step() + 1 if upcoming is None else upcoming
        self._whole = ({w: _flat(v[0]).clone() for w, v in seen.items()}
                       if self._full_at is not None and self._full_at(upcoming) else {})
        for gone in self._views.keys() - seen.keys():
            del self._views[gone]
        beside = {} if self._copier is None else {w: v for w, v in seen.items() if v[0].device.type == "cpu"}
        if sum(v[0].numel() for v in beside.values()) < BESIDE_FROM:
            beside = {}
        self._bits, self._sums = kept = self._read({w: v for w, v in seen.items() if w not in beside})
        if beside:
            self._armed = self._copier.run([lambda: self._read(beside, into=kept)])

    def _read(self, seen: dict[tuple[int, str], tuple[Tensor, int, int]],
              into: tuple[dict, dict] | None = None) -> tuple[dict, dict]:
        """A copy of the sampled bits and the word sum of each of ``seen``'s buffers (added to ``into``)."""
        bits, sums = ({}, {}) if into is None else into
        for where, (buf, _, ptr) in seen.items():
            bits[where] = self._sample(where, buf, ptr).clone()
            sums[where] = self._sum(where, buf, ptr)
        return bits, sums

    def settle(self, optimizer: Any = None, args: Any = (), kwargs: Any = None) -> None:
        """Post-step hook: wait until the buffers after the last step are read (a failed read raises here)."""
        self._wait()

    def _wait(self) -> None:
        armed, self._armed = self._armed, None
        if armed is not None:
            armed.result()

    def check(self, optimizer: Any, args: Any = (), kwargs: Any = None) -> None:
        """Pre-step hook: raise :class:`~explaind.exceptions.TrajectoryError` when a kept buffer changed."""
        self._wait()
        if not self._seen:
            return
        now = self._carried(optimizer)
        edited = []
        for where, (buf, version, ptr) in self._seen.items():
            live = now.get(where)
            if live is None or (live[0] is buf and live[1] == version and live[2] == ptr
                                and torch.equal(self._sample(where, buf, ptr), self._bits[where])
                                and torch.equal(self._sum(where, buf, ptr), self._sums[where])
                                and (where not in self._whole or _same_bits(buf, self._whole[where]))):
                continue
            if live[0] is not buf and _same_values(live[0], buf):  # the same state loaded again: no edit
                continue
            name = self._names.get(where[0], "an unrecorded parameter")
            how = ("replaced" if live[0] is not buf else "changed in place" if live[1] != version
                   else "changed through .data")
            edited.append(f"{name} ({where[1]}: {how})")
        if not edited:
            return
        s = self._step()
        since = f"step {s - 1}" if s > 0 else "recording began"
        shown = ", ".join(edited[:6]) + (f" and {len(edited) - 6} more" if len(edited) > 6 else "")
        data = (" An edit through .data is not counted by torch's version counter; the recorder compares a sample "
                "of each buffer's bits and the sum of all its bits between steps, and every bit before the steps "
                "the gradient check checks."
                if any(e.endswith("through .data)") for e in edited) else "")
        raise TrajectoryError(
            f"Step {s}: the optimizer's momentum buffers of {shown} changed outside optimizer.step() since {since} "
            f"(opt.load_state_dict(...) of another checkpoint, or a buffer edited by hand, in place or through "
            f".data). explaind models that momentum as the recurrence of the recorded gradients (docs/maths.md §4), "
            f"so the change would move the next updates by a term no training sample explains. The steps recorded "
            f"before are kept. Fix: change "
            f"the optimizer's state outside `with rec:` and record the rest of the run with a new recorder, which "
            f"starts from the state the optimizer then holds (docs/recording.md, 'Starting from optimizer state'); "
            f"a momentum restart, opt.state.clear(), is exact inside `with rec:`.{data}"
        )


def _same_bits(buf: Tensor, whole: Tensor) -> bool:
    """Whether ``buf`` holds the bits of ``whole`` (its flat copy), entry by entry (a NaN equals itself)."""
    flat = _flat(buf)
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()]
    return flat.shape == whole.shape and bool(torch.equal(flat.view(ints), whole.view(ints)))


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` holds the values of ``b`` (shape, dtype and every element; a NaN never equals)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.detach().to(b.device), b.detach()))


def _in_memory_order(t: Tensor) -> Tensor | None:
    """A 1-D view of ``t``'s entries in the order they lie in memory, when they fill one block of it without gaps
    or overlaps (contiguous, or a permuted layout: a transposed or ``channels_last`` tensor); else ``None``."""
    t = t.detach()
    if t.is_contiguous():
        return t.view(-1)
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return None
        expected *= size
    return t.as_strided((t.numel(),), (1,))


def _flat(t: Tensor) -> Tensor:
    """``t``'s entries as one dimension: :func:`_in_memory_order`'s view, else a copy (a layout with gaps)."""
    flat = _in_memory_order(t)
    return t.detach().contiguous().view(-1) if flat is None else flat


def sampled_bits(t: Tensor) -> Tensor:
    """A view of at most :data:`SAMPLE` entries of ``t``, evenly strided from the first in the order they lie in
    memory, as integers of the entries' width (a NaN equals itself, -0 differs from 0): any run of entries adjacent
    in memory at least as long as the stride holds a sampled one. A tensor whose entries leave gaps in memory is
    read through a copy."""
    flat = _flat(t)
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()]
    return flat.view(ints)[::max(1, -(-flat.numel() // SAMPLE))]


def word_sum(t: Tensor) -> Tensor:
    r"""The bits of ``t`` read as 64-bit words and summed with wrap-around (modulo :math:`2^{64}`), followed by the
    bytes of a last partial word: a tensor on ``t``'s device, equal for equal bits.

    An edit of one entry changes one word (or the trailing bytes) and so the result; an edit of several entries is
    missed only when the changes of their words cancel modulo :math:`2^{64}`. One read of the tensor, no copy (a
    tensor whose storage does not start on a word boundary is read through a copy).
    """
    return _summed(_words(t))


def _words(t: Tensor) -> tuple[Tensor, Tensor | None]:
    """Views of ``t``'s bits as 64-bit words and as the bytes of a last partial word (``None`` when there are none)."""
    flat = _flat(t)
    nbytes = flat.numel() * flat.element_size()
    if nbytes % 8 == 0 and (flat.storage_offset() * flat.element_size()) % 8 == 0:
        try:
            return flat.view(torch.int64), None
        except RuntimeError:  # a dtype without an integer reinterpretation of this width: read as bytes below
            pass
    raw = flat.view(torch.uint8)
    whole = nbytes // 8 * 8
    try:
        words = raw[:whole].view(torch.int64)
    except RuntimeError:  # a storage offset off the 8-byte boundary: a contiguous copy starts on one
        words = raw[:whole].clone().view(torch.int64)
    return words, (raw[whole:] if whole < nbytes else None)


def _summed(words: tuple[Tensor, Tensor | None]) -> Tensor:
    total = words[0].sum()[None]
    return total if words[1] is None else torch.cat([total, words[1].to(torch.int64)])
