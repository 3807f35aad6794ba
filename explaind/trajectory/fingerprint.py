"""The fingerprint of a run's training data, recorded at record time and checked at load time.

A stored run refers to its training data by position only (the batch indices), so loading it
with other data — shuffled, re-split, other values of the same length — would silently
decompose the trained model over the wrong samples. The recorder stores a
:class:`~explaind.trajectory.manifest.DataFingerprint` in the manifest; ``Trajectory.load``
recomputes it from the ``train_data`` it is given and refuses data that differ
(docs/recording.md, "Training data").

The fingerprint hashes, tensor by tensor (``X`` or its entries, then ``y``), the bytes of a set
of rows ``R`` in order with SHA-256:

* tensor data of at most :data:`FULL_HASH_BYTES` bytes: every row (``R = 0..n-1``);
* larger tensor data: ``rows = max(MIN_SAMPLED_ROWS, SAMPLED_BYTES / row bytes)`` evenly spaced rows
  ``R_i = i (n - 1) // (rows - 1)``, so the cost stays bounded (a change confined to rows outside
  ``R`` is not seen; a reordering almost surely is);
* a ``Dataset`` object: at most :data:`DATASET_ROWS` evenly spaced items (each item is a call to
  ``dataset[i]``, possibly slow).

Rows of a ``Dataset`` are its items stacked, so a dataset and an ``(X, y)`` tuple with the same
values have the same fingerprint. Hashing goes in chunks of about :data:`CHUNK_BYTES`, so it
never copies more than that at once (a full hash of 50,000 x 784 float32 rows is measured by
``benchmarks/bench_fingerprint.py``).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import Tensor

from ..exceptions import TrajectoryError
from ..inputs import Inputs
from ._common import TrainData
from .manifest import DataFingerprint, TensorDigest, dtype_name

__all__ = [
    "FULL_HASH_BYTES",
    "SAMPLED_BYTES",
    "MIN_SAMPLED_ROWS",
    "DATASET_ROWS",
    "CHUNK_BYTES",
    "fingerprint_rows",
    "sampled_rows",
    "data_fingerprint",
    "check_train_data",
]

logger = logging.getLogger("explaind.trajectory")

#: Tensor data up to this many bytes is hashed whole.
FULL_HASH_BYTES = 1 << 30
#: Larger tensor data: about this many bytes of evenly spaced rows are hashed.
SAMPLED_BYTES = 256 << 20
#: ... but never fewer rows than this (or ``n``).
MIN_SAMPLED_ROWS = 1024
#: Items of a ``Dataset`` object hashed (evenly spaced).
DATASET_ROWS = 1024
#: Bytes hashed per chunk.
CHUNK_BYTES = 16 << 20


def sampled_rows(n: int, rows: int) -> Tensor:
    """Row positions hashed: ``0..n-1`` when ``rows >= n``, else ``i (n - 1) // (rows - 1)`` for ``i < rows``."""
    if rows >= n:
        return torch.arange(n)
    if rows <= 1:
        return torch.zeros(min(rows, n), dtype=torch.long)
    return torch.arange(rows, dtype=torch.long) * (n - 1) // (rows - 1)


def _named(x: Tensor | Inputs, y: Tensor) -> dict[str, Tensor]:
    """The data's tensors by name: ``X`` or ``X.<key>`` / ``X.<position>``, and ``y`` (non-tensor entries skipped)."""
    out: dict[str, Tensor] = {}
    if isinstance(x, Inputs):
        items = x.data.items() if isinstance(x.data, dict) else enumerate(x.data)
        out.update({f"X.{k}": v for k, v in items if isinstance(v, Tensor)})
    else:
        out["X"] = x
    out["y"] = y
    return out


def fingerprint_rows(data: TrainData) -> int:
    """How many rows :func:`data_fingerprint` hashes for ``data`` by default (see the module docstring)."""
    n = len(data)
    if data.is_dataset:
        return min(n, DATASET_ROWS)
    tensors = _named(*data.tensors())
    row_bytes = sum(t[:1].numel() * t.element_size() for t in tensors.values())
    if n * row_bytes <= FULL_HASH_BYTES:
        return n
    return min(n, max(MIN_SAMPLED_ROWS, SAMPLED_BYTES // max(row_bytes, 1)))


def _update(h: Any, t: Tensor) -> None:
    """Feed the bytes of ``t`` (rows in order, C order within a row) to ``h``, about :data:`CHUNK_BYTES` at a time."""
    row_bytes = max(t[:1].numel() * t.element_size(), 1)
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, t.shape[0], step):
        chunk = t[start : start + step].detach().to("cpu").contiguous()
        h.update(chunk.reshape(-1).view(torch.uint8).numpy())


def _digests(tensors: dict[str, Tensor], index: Tensor | None) -> dict[str, TensorDigest]:
    out = {}
    for name, t in tensors.items():
        h = hashlib.sha256()
        if t.dim() > 0:
            _update(h, t if index is None else t[index.to(t.device)])
        out[name] = TensorDigest(dtype=dtype_name(t.dtype), row_shape=list(t.shape[1:]), sha256=h.hexdigest())
    return out


def data_fingerprint(data: TrainData, rows: int | None = None) -> DataFingerprint:
    """The fingerprint of ``data`` over ``rows`` rows (default :func:`fingerprint_rows`); cached on ``data``.

    Parameters
    ----------
    data : TrainData
        ``(X, y)`` tensors, tuple/mapping inputs, or a ``Dataset`` of ``(x, y)`` items.
    rows : int, optional
        Rows hashed (``n``: all); a recorded fingerprint's ``rows`` when checking against it.

    Returns
    -------
    DataFingerprint
    """
    n = len(data)
    rows = fingerprint_rows(data) if rows is None else min(int(rows), n)
    cached = data.fingerprints.get(rows)
    if cached is not None:
        return cached
    index = sampled_rows(n, rows)
    if data.is_dataset:
        tensors, index_in = _named(*data.get(index)), None
    else:
        tensors, index_in = _named(*data.tensors()), (None if rows >= n else index)
    result = DataFingerprint(n=n, rows=rows, tensors=_digests(tensors, index_in))
    data.fingerprints[rows] = result
    return result


def _difference(recorded: DataFingerprint, given: DataFingerprint) -> str:
    """The first difference between two fingerprints of the same number of rows, in words."""
    names_r, names_g = list(recorded.tensors), list(given.tensors)
    if names_r != names_g:
        return f"the recorded data has the tensors {names_r}, this train_data has {names_g}"
    for name in names_r:
        r, g = recorded.tensors[name], given.tensors[name]
        if (r.dtype, r.row_shape) != (g.dtype, g.row_shape):
            return (f"{name!r} has dtype {g.dtype} and row shape {g.row_shape}, the recorded data had {r.dtype} and "
                    f"{r.row_shape}")
        if r.sha256 != g.sha256:
            scope = "all rows" if recorded.rows >= recorded.n else f"{recorded.rows} evenly spaced rows"
            return (f"the values of {name!r} differ (SHA-256 over {scope}: recorded {r.sha256[:12]}..., given "
                    f"{g.sha256[:12]}...): other data, or the same data in another order")
    return ""


def check_train_data(data: TrainData, recorded: DataFingerprint | None, where: str) -> None:
    """Raise :class:`TrajectoryError` when ``data`` is not the data whose fingerprint was recorded.

    Parameters
    ----------
    data : TrainData
        The training data given to ``Trajectory.load`` (or to a resuming recorder).
    recorded : DataFingerprint or None
        The manifest's fingerprint; ``None`` (a store written without one) logs a note and checks nothing.
    where : str
        The store, for messages.
    """
    if recorded is None:
        logger.warning("The trajectory at %s records no fingerprint of its training data (written by an older "
                       "explaind); train_data is checked for its length only, not for its order or values.", where)
        return
    if recorded.n != len(data):
        raise TrajectoryError(
            f"train_data has {len(data)} samples but the run at {where} was recorded with {recorded.n}: its batch "
            f"indices refer to that data. Pass the training data the run was recorded with, in the same order."
        )
    given = data_fingerprint(data, recorded.rows)
    problem = _difference(recorded, given)
    if problem:
        raise TrajectoryError(
            f"train_data is not the data the run at {where} was recorded with: {problem}. Its batch indices "
            f"refer to the recorded samples, so scores over training samples would be computed on other data. "
            f"Pass the training data the run was recorded with, in the same order and dtype (or, if you know it "
            f"holds the same samples, verify_train_data=False to skip this check)."
        )
