"""The step records of a read store, held column by column (docs/recording.md, "The store").

A store of ``n`` steps lists ``n`` :class:`~explaind.trajectory.manifest.StepRecord` s. As pydantic
objects each is a model with its own field dictionary and set, and so is each of its file records;
:class:`StepIndex` keeps the same values in flat columns (an ``array`` of numbers, a byte per
flag, a list of checksum strings) and builds a record only when one is asked for. It is a sequence
of records to its readers: ``len``, indexing, iteration, slices, ``append``/``extend`` (a resumed
recording goes on appending to it) and equality behave as on the list it replaces.
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

from pydantic import BaseModel

from ._layout import step_path
from .manifest import FileRecord, StepRecord

__all__ = ["StepIndex", "step_column", "steps_where"]

#: the optional float fields of a step record, in the bit order of ``StepIndex._none``
_OPTIONAL = ("audit", "loss_scale", "gradient_check", "amp_scale")
#: a count too large for a signed 64-bit column is kept in a side dictionary; the column holds this
_BIG = -1
_BUFFERS = {None: 0, True: 1, False: 2}
_BUFFERS_BACK = (None, True, False)


def _extend_counts(column: array, big: dict[int, int], values: list[int]) -> None:
    """Append non-negative counts to ``column``; one too large for it goes to ``big`` (the column: :data:`_BIG`)."""
    try:
        column.extend(array("q", values))
    except OverflowError:
        for value in values:
            if value >= 1 << 63:
                big[len(column)] = value
                value = _BIG
            column.append(value)


#: setters of the slots every pydantic model has besides its ``__dict__`` (those of :class:`~pydantic.BaseModel`)
_SET_FIELDS_SET = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_SET_EXTRA = BaseModel.__dict__["__pydantic_extra__"].__set__
_SET_PRIVATE = BaseModel.__dict__["__pydantic_private__"].__set__


def _built(cls: type[Any], values: dict[str, Any], fields_set: frozenset[str]) -> Any:
    """A pydantic record of ``values`` (every field of ``cls``) as its own JSON parse builds it, without validation.

    What :meth:`~pydantic.BaseModel.model_construct` does for a model without private attributes or extra fields, at
    a fraction of its cost (it looks up every field's default): the values come from records validated when the
    store was read or appended.
    """
    record = object.__new__(cls)
    object.__setattr__(record, "__dict__", values)
    _SET_FIELDS_SET(record, set(fields_set))
    _SET_EXTRA(record, None)
    _SET_PRIVATE(record, None)
    return record


_STEP_FIELDS = frozenset(StepRecord.model_fields)
_FILE_FIELDS = (frozenset({"path", "nbytes", "checksum"}), frozenset({"path", "nbytes", "sha256"}))


def _count(column: array, big: dict[int, int], i: int) -> int:
    value = column[i]
    return big[i] if value == _BIG else value


class _Files:
    """One file field of every step (``file``, ``optimizer_state`` or ``audit_state``) as columns.

    ``kind`` per step: 0 no file, 1 ``checksum`` set, 2 ``sha256`` set. ``path`` is ``None`` where it is
    the step's own file name (``steps/{s:06d}.safetensors``); other paths (the two optimizer-state slots,
    a checkpoint) are shared between the steps that name them.
    """

    __slots__ = ("kind", "path", "nbytes", "big", "digest", "_paths", "_own")

    def __init__(self, own: bool):
        self.kind = bytearray()
        self.path: list[str | None] = []
        self.nbytes = array("q")
        self.big: dict[int, int] = {}
        self.digest: list[str | None] = []
        self._paths: dict[str, str] = {}
        self._own = own  # the field names the step's own file (``file``)

    def extend(self, records: list[FileRecord | None], first: int) -> None:
        """Add the file records of steps ``first``, ``first + 1``, ... (``None``: the step names no such file)."""
        self.kind.extend([0 if r is None else 1 if r.checksum is not None else 2 for r in records])
        paths = [None if r is None else r.path for r in records]
        if self._own:
            self.path.extend([None if p == step_path(first + k) else p for k, p in enumerate(paths)])
        else:
            shared = self._paths
            self.path.extend([None if p is None else shared.setdefault(p, p) for p in paths])
        _extend_counts(self.nbytes, self.big, [0 if r is None else r.nbytes for r in records])
        self.digest.extend([None if r is None else r.checksum if r.checksum is not None else r.sha256
                            for r in records])

    def get(self, i: int) -> FileRecord | None:
        kind = self.kind[i]
        if not kind:
            return None
        path, digest = self.path[i], self.digest[i]
        values = {"path": step_path(i) if path is None else path, "nbytes": _count(self.nbytes, self.big, i),
                  "checksum": digest if kind == 1 else None, "sha256": None if kind == 1 else digest}
        return _built(FileRecord, values, _FILE_FIELDS[kind - 1])

    def head(self, n: int) -> _Files:
        out = _Files(self._own)
        out.kind, out.path, out.digest = self.kind[:n], self.path[:n], self.digest[:n]
        out.nbytes = self.nbytes[:n]
        out.big = {i: v for i, v in self.big.items() if i < n}
        out._paths = dict(self._paths)
        return out


class StepIndex(Sequence[StepRecord]):
    """The records of steps ``0 .. n-1`` of a store, in columns; ``index[s]`` builds the record of step ``s``.

    A record appended must be the next step (``record.step == len(index)``), as in every store's index.
    A record built is a new object each time: change a store's steps by appending, not by assigning to a
    record's fields.
    """

    __slots__ = ("_n", "_n_samples", "_big", "_grad_scale", "_optional", "_none", "_has_params", "_buffers",
                 "_autocast", "_autocasts", "_files")

    def __init__(self, records: Iterable[StepRecord] = ()):
        self._n = 0  # the steps held: counted last, so a reader beside an extend sees whole records only
        self._n_samples = array("q")
        self._big: dict[int, int] = {}
        self._grad_scale = array("d")
        self._optional = {name: array("d") for name in _OPTIONAL}
        self._none = bytearray()  # bit k set: the optional field _OPTIONAL[k] is None
        self._has_params = bytearray()
        self._buffers = bytearray()
        self._autocast: list[str | None] = []
        self._autocasts: dict[str, str] = {}
        self._files = {"file": _Files(True), "optimizer_state": _Files(False), "audit_state": _Files(False)}
        self.extend(records)

    def append(self, record: StepRecord) -> None:
        """Add the record of the next step."""
        self.extend([record])

    def extend(self, records: Iterable[StepRecord]) -> None:
        """Add the records of the next steps, in order."""
        records = list(records)
        first = self._n
        wrong = next((k for k, r in enumerate(records) if r.step != first + k), None)
        if wrong is not None:
            raise ValueError(f"StepIndex.extend: the record of step {records[wrong].step} given where step "
                             f"{first + wrong} comes next; a store's index lists the steps 0, 1, 2, ... in order")
        try:
            _extend_counts(self._n_samples, self._big, [r.n_samples for r in records])
            self._grad_scale.extend(array("d", [r.grad_scale for r in records]))
            none = [0] * len(records)
            for k, name in enumerate(_OPTIONAL):
                values = [getattr(r, name) for r in records]
                for i, value in enumerate(values):
                    if value is None:
                        none[i] |= 1 << k
                self._optional[name].extend(array("d", [0.0 if v is None else v for v in values]))
            self._none.extend(none)
            self._has_params.extend([1 if r.has_params else 0 for r in records])
            self._buffers.extend([_BUFFERS[r.buffers] for r in records])
            shared = self._autocasts
            self._autocast.extend([None if r.autocast is None else shared.setdefault(r.autocast, r.autocast)
                                   for r in records])
            for name, files in self._files.items():
                files.extend([getattr(r, name) for r in records], first)
        except BaseException:  # columns left as they were: a record with a value no column holds is not half added
            self._cut(first)
            raise
        self._n = first + len(records)

    def _cut(self, n: int) -> None:
        """Drop every column's entries from position ``n`` on."""
        columns: list[Any] = [self._n_samples, self._grad_scale, *self._optional.values(), self._none,
                              self._has_params, self._buffers, self._autocast]
        for files in self._files.values():
            columns += [files.kind, files.path, files.nbytes, files.digest]
            files.big = {i: v for i, v in files.big.items() if i < n}
        for column in columns:
            del column[n:]
        self._big = {i: v for i, v in self._big.items() if i < n}

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> StepRecord: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[StepRecord]: ...

    def __getitem__(self, i: int | slice) -> StepRecord | Sequence[StepRecord]:
        n = len(self)
        if isinstance(i, slice):
            start, stop, stride = i.indices(n)
            if start == 0 and stride == 1:
                return self._head(max(stop, 0))
            return [self[j] for j in range(start, stop, stride)]
        s = operator.index(i)
        if s < 0:
            s += n
        if not 0 <= s < n:
            raise IndexError(f"step {i} is out of range: the index holds steps 0 to {n - 1}")
        none, optional, files = self._none[s], self._optional, self._files  # bit k of none: _OPTIONAL[k] is None
        record = {"step": s, "file": files["file"].get(s), "n_samples": _count(self._n_samples, self._big, s),
                  "grad_scale": self._grad_scale[s], "audit": None if none & 1 else optional["audit"][s],
                  "loss_scale": None if none & 2 else optional["loss_scale"][s],
                  "gradient_check": None if none & 4 else optional["gradient_check"][s],
                  "amp_scale": None if none & 8 else optional["amp_scale"][s], "autocast": self._autocast[s],
                  "has_params": self._has_params[s] == 1, "optimizer_state": files["optimizer_state"].get(s),
                  "buffers": _BUFFERS_BACK[self._buffers[s]], "audit_state": files["audit_state"].get(s)}
        return _built(StepRecord, record, _STEP_FIELDS)

    def _head(self, n: int) -> StepIndex:
        """The index of the first ``n`` steps (a copy)."""
        out = StepIndex()
        out._n = min(n, self._n)
        out._n_samples, out._grad_scale = self._n_samples[:n], self._grad_scale[:n]
        out._big = {i: v for i, v in self._big.items() if i < n}
        out._optional = {name: column[:n] for name, column in self._optional.items()}
        out._none, out._has_params, out._buffers = self._none[:n], self._has_params[:n], self._buffers[:n]
        out._autocast, out._autocasts = self._autocast[:n], dict(self._autocasts)
        out._files = {name: files.head(n) for name, files in self._files.items()}
        return out

    def __iter__(self) -> Iterator[StepRecord]:
        return (self[s] for s in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable, as the list it stands for

    def __repr__(self) -> str:
        return f"StepIndex({len(self)} steps)"

    def has_params(self) -> list[bool]:
        """``has_params`` of every step, without building the records."""
        return [bool(v) for v in self._has_params[:self._n]]

    def optional(self, name: str) -> list[float | None]:
        """An optional float field (``audit``, ``loss_scale``, ``gradient_check``, ``amp_scale``) of every step."""
        k = _OPTIONAL.index(name)
        values = self._optional[name][:self._n]
        return [None if none >> k & 1 else value for none, value in zip(self._none[:self._n], values, strict=True)]


def step_column(steps: Sequence[StepRecord], name: str) -> list[Any]:
    """The field ``name`` of every record of ``steps``; from the columns when ``steps`` is a :class:`StepIndex`."""
    if isinstance(steps, StepIndex):
        if name == "has_params":
            return steps.has_params()
        if name in _OPTIONAL:
            return steps.optional(name)
    return [getattr(record, name) for record in steps]


def steps_where(steps: Sequence[StepRecord], name: str) -> list[int]:
    """The steps whose ``has_params`` or ``buffers`` is true, or whose file field ``name`` (``optimizer_state``, ...)
    names a file; from the columns when ``steps`` is a :class:`StepIndex` (its step ``s`` is at position ``s``)."""
    if isinstance(steps, StepIndex):
        flags: Iterable[int] = (steps._has_params if name == "has_params" else
                                (v == 1 for v in steps._buffers) if name == "buffers" else steps._files[name].kind)
        return [s for s, flag in zip(range(len(steps)), flags) if flag]
    if name in ("has_params", "buffers"):
        return [r.step for r in steps if getattr(r, name)]
    return [r.step for r in steps if getattr(r, name) is not None]
