r"""Plain tensor attributes and config objects in the attribute watch's fingerprint.

docs/recording.md, "Python attributes changed between steps", has the user's side.

A tensor held as a plain attribute (``self.mask = torch.ones(d)``, not ``register_buffer``), directly or in a list,
tuple or dict attribute, is not recorded per step: the engine replays every step with its value when explaining.
It is fingerprinted by :func:`tensor_signature`,

.. math::

    \sigma(t) = (\operatorname{id} t,\ v_t,\ \text{shape},\ \text{dtype},\ \text{device},\ c_1(t), \dots,
    c_{16}(t),\ c_{\text{tail}}(t),\ T_1(t),\ W_1(t), \dots),

with :math:`v_t` torch's version counter (bumped by every in-place operation; left out for a view, which shares
its base's counter) and, for tensors of at most :data:`CHECKSUM_BYTES` bytes, value checksums of the elements' bit
patterns (``view`` as the integer type of the same width; complex tensors as their real pairs). Integer sums of bit
patterns make the same values give the same checksums on every run and device (no floating-point rounding; ``-0.0``
and ``0.0`` differ, NaNs of one payload are equal). The checksums are

* the wrapping sums of the elements' bit patterns :math:`u_i` over :data:`BLOCKS` equal contiguous blocks,
  :math:`c_b = \sum_{i \in B_b} u_i` (one element a block below :data:`BLOCKS` elements), and over the remaining
  tail; int32 sums for elements of up to 4 bytes, a reduction torch vectorises (they see a reordering across blocks);
* position-weighted sums over 32-bit words: the elements' bits as :math:`w` words :math:`u_{i,j}` (:math:`w = 2` for
  8-byte elements, low and high word; :math:`w = 1` otherwise, the element's own bit pattern), and for each word
  column :math:`j` the exact total and the sum weighted by the position,

  .. math:: T_j = \sum_i u_{i,j}, \qquad W_j = \sum_i i\,u_{i,j} \bmod 2^{64},

  in int64 (the words converted :data:`CHUNK_ELEMENTS` elements at a time, so the extra memory stays bounded), from
  the row sums :math:`R_r` and column sums :math:`C_q` of the words laid out in rows of :data:`ROW` elements:
  :math:`W_j = \sum_r r\,\mathrm{ROW}\,R_{r,j} + \sum_q q\,C_{q,j}` plus the tail's own weighted sum, two plain
  reductions with no host copy of the tensor.

Any edit of one or two elements changes :math:`(T_j, W_j)` of some column :math:`j`: one changed word changes
the exact :math:`T_j`; with two, at positions :math:`a \ne b`, an unchanged :math:`T_j` means the word changes are
:math:`\delta` and :math:`-\delta`, and :math:`W_j` then changes by :math:`\delta (a - b)`, which is not a multiple
of :math:`2^{64}` since :math:`0 < |\delta (a - b)| < 2^{32} \cdot 2^{26}` (a tensor of :data:`CHECKSUM_BYTES` has
at most :math:`2^{26}` elements). So two elements swapped, or :math:`+d` and :math:`-d` on two elements of one
block, through ``.data`` are seen, as are writes through ``.data`` and tensors made under ``torch.inference_mode()``
(no version counter). An edit of three or more elements is missed only if it keeps every block sum and both sums
of every column at once. Tensors that share storage with a parameter or buffer of the model (a view
``self.wT = self.w.T``) are recorded and stand as ``("recorded", id)``.

The restore value the recorder's test forward sets back (:mod:`~explaind.trajectory._attribute_check`) is a clone
for tensors of at most :data:`CLONE_BYTES` bytes; a larger one is kept by reference, so an in-place change of it
cannot be set back: ``Seen.referenced`` lists those and the recorder refuses such a change without a test.

Config objects a forward reads (a Hugging Face ``PretrainedConfig``, a dataclass, ``types.SimpleNamespace``,
``argparse.Namespace``: :func:`is_plain_object`) are fingerprinted by their ``vars()`` fields of plain values, once
per object per snapshot (the modules sharing one config share its fingerprint and its restore copy).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["UNWATCHED", "CHECKSUM_BYTES", "CLONE_BYTES", "BLOCKS", "ROW", "CHUNK_ELEMENTS", "Seen", "tensor_ids",
           "tensor_signature", "is_plain_object", "checksum", "describe_object_change", "describe_tensor"]

#: Tensors up to this size get the value checksums (module docstring) at every step.
CHECKSUM_BYTES = 64 << 20
#: Contiguous blocks the value checksum sums separately.
BLOCKS = 16
#: Elements per row of the position-weighted sums' layout (module docstring).
ROW = 1024
#: Elements converted to int64 at a time for the position-weighted sums (8 MiB per word column).
CHUNK_ELEMENTS = 1 << 20
#: Tensors up to this size are cloned at every step, so the test forward can set an in-place change back.
CLONE_BYTES = 4 << 20

#: The fingerprint of a value that is not watched (an object of another kind, a large container).
UNWATCHED = object()

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PLAIN_CLASSES = frozenset({types.SimpleNamespace, argparse.Namespace})
_PLAIN: dict[type, bool] = {}


def checksum(t: Tensor) -> tuple[int, ...] | None:
    r"""The block sums :math:`c_b`, the tail's sum and the word columns' :math:`T_j, W_j` of ``t`` (module docstring),
    or ``None`` for a tensor without plain storage (sparse, meta, quantized) or one larger than :data:`CHECKSUM_BYTES`.
    """
    if t.layout is not torch.strided or t.is_meta or t.is_quantized or t.numel() * t.element_size() > CHECKSUM_BYTES:
        return None
    try:
        flat = t.detach().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        bits = flat.view(_INT_OF_WIDTH[flat.element_size()])
    except Exception:  # noqa: BLE001 - a tensor subclass without plain integer views: its version counter stands
        return None
    wide = torch.int64 if bits.element_size() == 8 else torch.int32  # wrapping sums in the elements' own width
    blocks = max(1, min(BLOCKS, bits.numel()))  # a tensor of fewer elements: one block each
    whole = bits.numel() - bits.numel() % blocks
    sums = torch.cat([bits[:whole].view(blocks, -1).sum(1, dtype=wide), bits[whole:].sum(0, dtype=wide)[None],
                      _weighted(bits.view(torch.int32).view(-1, 2) if bits.element_size() == 8 else bits[:, None])])
    return tuple(int(c) for c in sums.tolist())


def _weighted(words: Tensor) -> Tensor:
    r"""``[T_1, W_1, ..., T_w, W_w]`` (int64) of the words ``(n, w)`` (module docstring): the row sums :math:`R_r`
    and column sums :math:`C_q` of rows of :data:`ROW` elements, converted to int64 a chunk of rows at a time."""
    n, w = words.shape
    rows = n // ROW
    device = words.device
    row_sums = []
    columns = torch.zeros(ROW, w, dtype=torch.int64, device=device)
    step = max(1, CHUNK_ELEMENTS // ROW)
    for start in range(0, rows, step):
        chunk = words[start * ROW:min(rows, start + step) * ROW].to(torch.int64).view(-1, ROW, w)
        row_sums.append(chunk.sum(1))
        columns += chunk.sum(0)
    tail = words[rows * ROW:].to(torch.int64)
    position = torch.arange(rows, dtype=torch.int64, device=device) * ROW
    total = tail.sum(0) + (torch.cat(row_sums).sum(0) if row_sums else 0)
    weighted = (columns * torch.arange(ROW, dtype=torch.int64, device=device)[:, None]).sum(0) + \
        (tail * torch.arange(rows * ROW, n, dtype=torch.int64, device=device)[:, None]).sum(0)
    if row_sums:
        weighted = weighted + (torch.cat(row_sums) * position[:, None]).sum(0)
    return torch.stack([total, weighted], 1).reshape(-1)


def tensor_signature(t: Tensor) -> tuple[Any, ...]:
    r""":math:`\sigma(t)` (module docstring): ``("tensor", id, version, shape, dtype, device, checksum)``; the version
    counter of a view is left out (it is its base's, bumped by writes to elements outside the view)."""
    version = -1 if t.is_inference() or t._is_view() else t._version
    return ("tensor", id(t), version, tuple(t.shape), t.dtype, t.device, checksum(t))


def is_plain_object(value: Any) -> bool:
    """Whether ``value`` is a config-like object whose fields are fingerprinted (module docstring)."""
    cls = type(value)
    plain = _PLAIN.get(cls)
    if plain is None:
        plain = _PLAIN[cls] = not issubclass(cls, nn.Module | Tensor | type) and cls.__dictoffset__ != 0 and (
            cls in _PLAIN_CLASSES or dataclasses.is_dataclass(cls)
            or any(b.__name__ == "PretrainedConfig" and b.__module__.startswith("transformers") for b in cls.__mro__))
    return plain


class Seen:
    """One snapshot's context: the fingerprints and restore values of the tensors and objects met so far.

    Parameters
    ----------
    model : nn.Module
        Its parameters' and buffers' storages are recorded (read once, at the first tensor met).
    previous : tuple of dict, optional
        ``(signatures, restores)`` of the previous snapshot: a tensor whose signature is unchanged keeps that
        snapshot's restore value instead of a new clone (its value is the same).
    """

    def __init__(self, model: nn.Module, previous: tuple[dict[int, Any], dict[int, Any]] | None = None):
        self.model = model
        self._previous = previous
        self._owned: set[int] | None = None
        self.tensors: dict[int, tuple[Any, ...]] = {}  # id -> signature
        self.referenced: dict[int, tuple[Any, ...]] = {}  # id -> signature, kept by reference (not cloned)
        self.objects: dict[int, tuple[Any, Any]] = {}  # id -> (fingerprint, restore copy)
        self._restores: dict[int, Any] = {}  # id -> restore value of a tensor
        self.met = 0  # tensors and objects met (a caller compares it before and after freezing one entry)

    def _recorded(self, t: Tensor) -> bool:
        if self._owned is None:
            state = [*self.model.parameters(), *self.model.buffers()]
            self._owned = {s.untyped_storage().data_ptr() for s in state if s.layout is torch.strided}
        return isinstance(t, nn.Parameter) or (t.layout is torch.strided and not t.is_meta
                                               and t.untyped_storage().data_ptr() in self._owned)

    def tensor(self, t: Tensor) -> tuple[Any, ...]:
        """The fingerprint of a plain tensor attribute (its restore value kept for :meth:`restore`)."""
        key = id(t)
        self.met += 1
        if key not in self.tensors:
            if self._recorded(t):
                self.tensors[key], self._restores[key] = ("recorded", key), t
            else:
                sig = self.tensors[key] = tensor_signature(t)
                small = t.layout is torch.strided and t.numel() * t.element_size() <= CLONE_BYTES
                if small and self._previous is not None and self._previous[0].get(key) == sig:
                    self._restores[key] = self._previous[1][key]  # unchanged since the last snapshot: its clone
                else:
                    self._restores[key] = t.detach().clone() if small else t
                if not small:
                    self.referenced[key] = sig
        return self.tensors[key]

    def restores_of_tensors(self) -> dict[int, Any]:
        """The restore values of the tensors met, by id."""
        return self._restores

    def object(self, value: Any, freeze: Callable[[Any], Any]) -> tuple[Any, ...]:
        """The fingerprint of a config-like object: its class and its fields of plain values (``freeze`` each)."""
        key = id(value)
        self.met += 1
        if key not in self.objects:
            fields = tuple((k, f) for k, v in vars(value).items() if (f := freeze(v)) is not UNWATCHED)
            duplicate = _copied(value)
            for k, v in vars(value).items():
                if isinstance(v, Tensor | list | dict | tuple | set) or is_plain_object(v):
                    vars(duplicate)[k] = self.restore(v)
            self.objects[key] = (("object", type(value), fields), duplicate)
        return self.objects[key][0]

    def restore(self, value: Any) -> Any:
        """What sets an entry back to its value at this snapshot: tensors as kept by :meth:`tensor`, objects as
        copied by :meth:`object`, containers rebuilt around those (other values as they are)."""
        key = id(value)
        if key in self._restores:
            return self._restores[key]
        if key in self.objects:
            return self.objects[key][1]
        kind = type(value)
        if kind is dict:
            return {k: self.restore(v) for k, v in value.items()}
        if kind in (list, tuple, set, frozenset):
            return kind(self.restore(v) for v in value)
        return value


def _copied(value: Any) -> Any:
    """A shallow copy of a config object: a bare instance of its class given a copy of its ``__dict__`` (without the
    class's attribute hooks, which a Hugging Face config runs on every read), or ``copy.copy``."""
    cls = type(value)
    try:
        duplicate = object.__new__(cls)
    except TypeError:  # a class with its own __new__ (types.SimpleNamespace)
        return copy.copy(value)
    object.__getattribute__(duplicate, "__dict__").update(vars(value))
    return duplicate


def tensor_ids(frozen: Any) -> set[int]:
    """The ids of the plain tensors a fingerprint holds (nested in containers and objects)."""
    out: set[int] = set()
    stack = [frozen]
    while stack:
        item = stack.pop()
        if type(item) is tuple and item:
            if item[0] == "tensor" and len(item) == 7:
                out.add(item[1])
            else:
                stack.extend(item)
        elif type(item) is frozenset:
            stack.extend(item)
    return out


def describe_tensor(t: Any) -> str:
    """``a Tensor of shape (2, 3) float32`` (or the value's own repr when it is no tensor)."""
    if isinstance(t, Tensor):
        return f"a {type(t).__name__} of shape {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
    return repr(t)


def describe_object_change(old: Any, new: Any) -> str:
    """The fields of two copies of a config object that differ: ``GPT2Config: output_attentions False -> True``."""
    a, b = vars(old), vars(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if k not in a or k not in b or not _same(a[k], b[k])]
    shown = ", ".join(f"{k} {_text(a.get(k))} -> {_text(b.get(k))}" for k in keys[:6])
    return f"{type(new).__name__} with {shown}{', ...' if len(keys) > 6 else ''}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype \
            and bool(torch.equal(a.cpu(), b.cpu()))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared count as changed
        return False


def _text(value: Any) -> str:
    text = describe_tensor(value) if isinstance(value, Tensor) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
