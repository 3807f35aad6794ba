r"""Plain tensor attributes and config objects in the attribute watch's fingerprint.

docs/recording.md, "Python attributes changed between steps", has the user's side.

A tensor held as a plain attribute (``self.mask = torch.ones(d)``, not ``register_buffer``), directly or in a list,
tuple or dict attribute, is not recorded per step: the engine replays every step with its value when explaining.
It is fingerprinted by :func:`tensor_signature`,

.. math::

    \sigma(t) = (\operatorname{id} t,\ v_t,\ \text{shape},\ \text{dtype},\ \text{device},\ \kappa(t)),

with :math:`v_t` torch's version counter (bumped by every in-place operation; left out for a view, which shares
its base's counter) and, for tensors of at most :data:`CHECKSUM_BYTES` bytes, a value checksum :math:`\kappa(t)`
(:func:`checksum`). The elements' bit patterns :math:`u_i` (``view`` as the integer type of the same width; complex
tensors as their real pairs; integer sums, so the same values give the same checksum on every run and device: no
floating-point rounding, ``-0.0`` and ``0.0`` differ, NaNs of one payload are equal) are laid out in rows of
:math:`L` elements (:func:`row_length`, a power of two near :math:`\sqrt n`; the last row holds the :math:`n \bmod L`
remaining elements), :math:`u_i` at row :math:`r = \lfloor i / L \rfloor` and column :math:`q = i \bmod L`, and
summed along both axes in the elements' own width (wrapping, modulo :math:`2^{8 \cdot \text{width}}`, two
reductions torch vectorises without a copy of the tensor, 4 MiB of rows at a time),

.. math:: R_r = \sum_q u_{rq}, \qquad C_q = \sum_r u_{rq};

:math:`\kappa(t)` is :math:`L` and the BLAKE2b digest (128 bits) of :math:`R` and :math:`C`, which are all that
leaves the tensor's device (:math:`\approx 2 \sqrt n` integers). Any edit of one or two elements changes
:math:`R` or :math:`C`: a changed element changes its bit pattern by :math:`\delta \not\equiv 0` (modulo the width);
two changed elements in different rows change each row's sum by its own :math:`\delta`, and in one row they sit in
different columns and change each column's sum. So two elements swapped, or moved by :math:`+d` and :math:`-d`,
through ``.data`` are seen wherever they are, as are writes through ``.data`` and tensors made under
``torch.inference_mode()`` (no version counter). An edit of more elements is missed only if it keeps every row sum
and every column sum (or the 128-bit digests collide). Before, the checksum was :func:`block_sums` (16 contiguous
blocks), which missed two elements of one block swapped; it is still computed for a record kept in that form
(:mod:`~explaind.trajectory._attribute_record`, format 1). Tensors that share storage with a parameter or buffer
of the model (a view ``self.wT = self.w.T``) are recorded and stand as ``("recorded", id)``.

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
import hashlib
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["UNWATCHED", "CHECKSUM_BYTES", "CLONE_BYTES", "BLOCKS", "Seen", "tensor_ids", "tensor_signature",
           "is_plain_object", "checksum", "block_sums", "row_length", "describe_object_change", "describe_tensor"]

#: Tensors up to this size get the value checksums (module docstring) at every step.
CHECKSUM_BYTES = 64 << 20
#: Contiguous blocks of :func:`block_sums` (the checksum of format-1 records).
BLOCKS = 16
#: Tensors up to this size are cloned at every step, so the test forward can set an in-place change back.
CLONE_BYTES = 4 << 20

#: The fingerprint of a value that is not watched (an object of another kind, a large container).
UNWATCHED = object()

#: Bytes of rows :func:`checksum` sums at a time (both axes while they are in cache: a 64 MiB tensor 2x faster).
_CHUNK_BYTES = 4 << 20
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PLAIN_CLASSES = frozenset({types.SimpleNamespace, argparse.Namespace})
_PLAIN: dict[type, bool] = {}


def _bits(t: Tensor) -> Tensor | None:
    """The elements' bit patterns as a flat integer tensor of their width (``None``: no plain storage)."""
    if t.layout is not torch.strided or t.is_meta or t.is_quantized:
        return None
    try:
        flat = t.detach().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        return flat.view(_INT_OF_WIDTH[flat.element_size()])
    except Exception:  # noqa: BLE001 - a tensor subclass without plain integer views: its version counter stands
        return None


def row_length(n: int) -> int:
    r""":math:`L`, the row length of :func:`checksum`'s layout: the power of two nearest above :math:`\sqrt n`, at
    least 64."""
    return max(64, 1 << max(0, (max(n, 1) - 1).bit_length() + 1) // 2)


def checksum(t: Tensor) -> tuple[int, int] | None:
    r""":math:`\kappa(t) = (L, \text{digest})` (module docstring), or ``None`` for a tensor without plain storage
    (sparse, meta, quantized) or one larger than :data:`CHECKSUM_BYTES`."""
    if t.numel() * t.element_size() > CHECKSUM_BYTES:
        return None
    bits = _bits(t)
    if bits is None:
        return None
    n, width = bits.numel(), bits.dtype
    row = row_length(n)
    whole = n - n % row
    try:
        grid = bits[:whole].view(-1, row)
        step = max(1, _CHUNK_BYTES // (row * bits.element_size()))  # rows summed while in cache (a large tensor)
        columns = torch.zeros(row, dtype=width, device=bits.device)
        parts = []
        for start in range(0, grid.shape[0], step):
            chunk = grid[start:start + step]
            parts.append(chunk.sum(1, dtype=width))
            columns += chunk.sum(0, dtype=width)
        rows = torch.cat([*parts, bits[whole:].sum(0, dtype=width)[None]])
        columns[:n - whole] += bits[whole:]  # the last, shorter row's elements in their columns
        sums = [part.cpu().numpy() for part in (rows, columns)]
    except Exception:  # noqa: BLE001 - a tensor subclass whose integer view cannot be summed: its version counter
        return None
    digest = hashlib.blake2b(digest_size=16)
    for values in sums:
        digest.update(values.astype(values.dtype.newbyteorder("<")).tobytes())
    return row, int.from_bytes(digest.digest(), "little")


def block_sums(t: Tensor) -> tuple[int, ...] | None:
    r"""The checksum of format-1 records: the wrapping sums of the bit patterns over :data:`BLOCKS` equal contiguous
    blocks (one element a block below :data:`BLOCKS` elements) and over the remaining tail, in int32 for elements
    of up to 4 bytes, int64 for 8 (``None`` as :func:`checksum`)."""
    if t.numel() * t.element_size() > CHECKSUM_BYTES:
        return None
    bits = _bits(t)
    if bits is None:
        return None
    wide = torch.int64 if bits.element_size() == 8 else torch.int32
    blocks = max(1, min(BLOCKS, bits.numel()))
    whole = bits.numel() - bits.numel() % blocks
    try:
        sums = torch.cat([bits[:whole].view(blocks, -1).sum(1, dtype=wide), bits[whole:].sum(0, dtype=wide)[None]])
    except Exception:  # noqa: BLE001 - as in checksum
        return None
    return tuple(int(c) for c in sums.tolist())


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
