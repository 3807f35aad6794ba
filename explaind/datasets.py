"""Built-in datasets that need no download.

Three sources, each returned as a :class:`Dataset` with a seeded train/validation split:

* :func:`modular_arithmetic` — every pair ``(a, b)`` of residues modulo ``p`` with target
  ``(a + b) mod p``, as the token sequence ``[a, p, b, p + 1]`` (``p`` stands for ``+`` and
  ``p + 1`` for ``=``); the grokking setting of the paper is ``p = 113`` with 4,000 training and
  2,000 validation pairs.
* :func:`digits` — scikit-learn's bundled 8×8 handwritten digits, optionally restricted to a
  subset of classes (a two-class subset plays the role of CIFAR-2 on CPU).
* :func:`load_cifar10` — a reader for the CIFAR-10 *binary* distribution (``data_batch_*.bin``,
  ``test_batch.bin``; one label byte then 3,072 pixel bytes per record). No pickle is involved.

:func:`load_dataset` looks a dataset up by name (used by the command line).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .exceptions import ConfigError, ExplaindError

__all__ = [
    "Dataset",
    "DatasetError",
    "DATASETS",
    "modular_arithmetic",
    "digits",
    "read_cifar10_binary",
    "load_cifar10",
    "load_dataset",
    "CIFAR10_CLASSES",
    "CIFAR10_RECORD_BYTES",
]

#: Class names of CIFAR-10, in label order.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
#: Bytes per record of the CIFAR-10 binary format: one label byte and a 3×32×32 uint8 image.
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32


class DatasetError(ExplaindError, ValueError):
    """A dataset file is missing, truncated or malformed; the message names the file."""


@dataclass(frozen=True)
class Dataset:
    """A supervised dataset split into training and validation parts.

    Attributes
    ----------
    name : str
        Registry name (``"modular"``, ``"digits"``, ``"cifar10"``).
    X_train, y_train : Tensor
        Training inputs (shape ``(n_train, ...)``) and integer class targets ``(n_train,)``.
    X_val, y_val : Tensor
        Validation inputs and targets.
    n_classes : int
        Number of output classes ``O``.
    meta : dict
        JSON-serialisable facts about the data (modulus, class names, split seed, ...);
        ``meta["params"]`` holds the keyword arguments that rebuild the dataset with
        :func:`load_dataset`.
    """

    name: str
    X_train: Tensor
    y_train: Tensor
    X_val: Tensor
    y_val: Tensor
    n_classes: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.X_train.shape[0])

    @property
    def n_val(self) -> int:
        """Number of validation samples."""
        return int(self.X_val.shape[0])

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        """``(X_train, y_train)``, the form :class:`explaind.TrajectoryRecorder` takes as ``train_data``."""
        return self.X_train, self.y_train

    @property
    def val(self) -> tuple[Tensor, Tensor]:
        """``(X_val, y_val)``."""
        return self.X_val, self.y_val

    def spec(self) -> dict[str, Any]:
        """``{"name": ..., "params": ...}``: enough to rebuild this dataset with :func:`load_dataset`."""
        return {"name": self.name, "params": dict(self.meta.get("params", {}))}


# --------------------------------------------------------------------------- helpers
def _split_count(value: int | float | None, total: int, what: str, default: int) -> int:
    """Resolve an absolute count or a fraction of ``total``; ``None`` gives ``default``."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what}={value!r} must be a count (int) or a fraction in (0, 1] (float).")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"{what}={value!r} is a fraction outside (0, 1]. Give a fraction like 0.3 or a count.")
        return max(1, int(round(value * total)))
    if value < 1:
        raise ConfigError(f"{what}={value!r} must be at least 1.")
    return value


def _permutation(n: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator)


# --------------------------------------------------------------------------- modular arithmetic
def modular_arithmetic(
    p: int = 113,
    *,
    n_train: int | float | None = 4000,
    n_val: int | float | None = 2000,
    seed: int = 0,
) -> Dataset:
    """All pairs ``(a, b)`` with target ``(a + b) mod p``, split into training and validation sets.

    Every input is the token sequence ``[a, p, b, p + 1]`` (vocabulary size ``p + 2``: the
    residues, ``+`` as ``p`` and ``=`` as ``p + 1``). The ``p²`` pairs are shuffled with ``seed``;
    the first ``n_train`` train, the next ``n_val`` validate.

    Parameters
    ----------
    p : int
        The modulus (at least 2). The paper uses 113.
    n_train, n_val : int or float or None
        Sizes as counts or as fractions of the ``p²`` pairs. ``n_val=None`` takes all remaining
        pairs; ``n_train=None`` takes 30% of the pairs.
    seed : int
        Seed of the split.

    Returns
    -------
    Dataset
        ``X_*`` int64 of shape ``(n, 4)``, ``y_*`` int64 of shape ``(n,)``, ``n_classes = p``;
        ``meta`` holds ``p``, ``vocab_size``, ``plus_token``, ``equals_token``.

    Raises
    ------
    ConfigError
        For ``p < 2`` or when the split asks for more than ``p²`` pairs.
    """
    if isinstance(p, bool) or not isinstance(p, int) or p < 2:
        raise ConfigError(f"Modulus p={p!r} must be an integer of at least 2 (the paper uses p=113).")
    total = p * p
    n_tr = _split_count(n_train, total, "n_train", max(1, int(round(0.3 * total))))
    n_va = _split_count(n_val, total, "n_val", total - n_tr)
    if n_tr + n_va > total:
        raise ConfigError(
            f"n_train + n_val = {n_tr} + {n_va} = {n_tr + n_va} exceeds the {total} pairs available for p={p}. "
            f"Use smaller sizes (or fractions such as n_train=0.3) or a larger p."
        )
    if n_va < 1:
        raise ConfigError(f"No pairs are left for validation with p={p} and n_train={n_tr}. Lower n_train.")
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    X = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    y = (a + b) % p
    order = _permutation(total, seed)
    tr, va = order[:n_tr], order[n_tr : n_tr + n_va]
    meta = {
        "p": p,
        "vocab_size": p + 2,
        "plus_token": p,
        "equals_token": p + 1,
        "seq_len": 4,
        "seed": int(seed),
        "params": {"p": p, "n_train": n_tr, "n_val": n_va, "seed": int(seed)},
    }
    return Dataset("modular", X[tr].clone(), y[tr].clone(), X[va].clone(), y[va].clone(), p, meta)


# --------------------------------------------------------------------------- digits
def _check_classes(classes: Sequence[int] | None, n_classes: int, what: str) -> list[int]:
    if classes is None:
        return list(range(n_classes))
    chosen = list(classes)
    if len(chosen) < 2:
        raise ConfigError(f"classes={chosen!r}: choose at least two of the {what} classes 0..{n_classes - 1}.")
    bad = [c for c in chosen if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < n_classes]
    if bad:
        raise ConfigError(f"classes={chosen!r} contains {bad!r}; {what} classes are the integers 0..{n_classes - 1}.")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"classes={chosen!r} repeats a class; list each class once.")
    return chosen


def _subset_and_split(
    X: Tensor, y: Tensor, classes: list[int], val_fraction: float, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not isinstance(val_fraction, int | float) or not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction={val_fraction!r} must lie strictly between 0 and 1, e.g. 0.25.")
    keep = torch.isin(y, torch.tensor(classes))
    X, y = X[keep], y[keep]
    remap = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    y = remap[y]
    order = _permutation(len(y), seed)
    n_val = max(1, int(round(float(val_fraction) * len(y))))
    va, tr = order[:n_val], order[n_val:]
    return X[tr].clone(), y[tr].clone(), X[va].clone(), y[va].clone()


def digits(
    *,
    classes: Sequence[int] | None = None,
    val_fraction: float = 0.25,
    seed: int = 0,
    flatten: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1,797 images), scaled to ``[0, 1]``.

    Parameters
    ----------
    classes : sequence of int, optional
        Keep only these digits; labels are renumbered ``0..len(classes)-1`` in the given order.
        ``classes=(3, 8)`` gives a two-class task in the spirit of CIFAR-2.
    val_fraction : float
        Fraction of the (kept) images held out for validation.
    seed : int
        Seed of the split.
    flatten : bool
        Inputs of shape ``(n, 64)`` (for an MLP) instead of ``(n, 1, 8, 8)`` (for a CNN).
    dtype : torch.dtype
        Floating dtype of the inputs.

    Returns
    -------
    Dataset
        ``meta["classes"]`` lists the original digit of each label.
    """
    from sklearn.datasets import load_digits

    chosen = _check_classes(classes, 10, "digit")
    bunch = load_digits()
    X = torch.as_tensor(bunch.images, dtype=dtype).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    X_tr, y_tr, X_va, y_va = _subset_and_split(X, y, chosen, val_fraction, seed)
    if flatten:
        X_tr, X_va = X_tr.reshape(len(X_tr), -1), X_va.reshape(len(X_va), -1)
    params = {
        "classes": None if classes is None else chosen,
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "flatten": bool(flatten),
    }
    meta = {"classes": chosen, "input_shape": list(X_tr.shape[1:]), "seed": int(seed), "params": params}
    return Dataset("digits", X_tr, y_tr, X_va, y_va, len(chosen), meta)


# --------------------------------------------------------------------------- CIFAR-10 (binary format)
def read_cifar10_binary(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one file of the CIFAR-10 binary distribution.

    Each record is ``1 + 3072`` bytes: the label (0–9), then the red, green and blue 32×32
    planes in row-major order.

    Parameters
    ----------
    path : str or Path
        A ``data_batch_N.bin`` or ``test_batch.bin`` file.

    Returns
    -------
    images : ndarray of uint8, shape (n, 3, 32, 32)
    labels : ndarray of int64, shape (n,)

    Raises
    ------
    DatasetError
        When the file is missing, empty, not a whole number of records, or holds a label above 9.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"CIFAR-10 file {str(path)!r} does not exist. Point to the 'cifar-10-batches-bin' folder.")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD_BYTES:
        raise DatasetError(
            f"CIFAR-10 file {str(path)!r} has {raw.size} bytes, not a positive multiple of the "
            f"{CIFAR10_RECORD_BYTES}-byte record size; it is truncated or not in the binary format."
        )
    records = raw.reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        row = int(np.argmax(labels > 9))
        raise DatasetError(
            f"CIFAR-10 file {str(path)!r}: record {row} has label {int(labels[row])}, but labels are 0..9; "
            f"the file is corrupted or not in the binary format."
        )
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def _cifar_files(root: Path, pattern: str) -> list[Path]:
    files = sorted(root.glob(pattern))
    if not files:
        raise DatasetError(
            f"No CIFAR-10 files matching {pattern!r} in {str(root)!r}. Download the binary version "
            f"('cifar-10-binary.tar.gz') and pass its 'cifar-10-batches-bin' folder as root."
        )
    return files


def load_cifar10(
    root: str | Path,
    *,
    classes: Sequence[int] | None = None,
    max_train: int | None = None,
    max_val: int | None = None,
    flatten: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """CIFAR-10 from its binary files: ``data_batch_*.bin`` train, ``test_batch.bin`` validates.

    Parameters
    ----------
    root : str or Path
        Folder holding the binary files.
    classes : sequence of int, optional
        Keep only these classes, renumbered in the given order (``(3, 5)``: cat vs dog, CIFAR-2).
    max_train, max_val : int, optional
        Keep only the first so many samples of each part (after the class filter).
    flatten : bool
        Inputs of shape ``(n, 3072)`` instead of ``(n, 3, 32, 32)``.
    dtype : torch.dtype
        Floating dtype; pixels are scaled to ``[0, 1]``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 root {str(root)!r} is not a folder. Pass the 'cifar-10-batches-bin' folder.")
    chosen = _check_classes(classes, 10, "CIFAR-10")

    def part(pattern: str, limit: int | None, what: str) -> tuple[Tensor, Tensor]:
        blocks = [read_cifar10_binary(f) for f in _cifar_files(root, pattern)]
        images = np.concatenate([b[0] for b in blocks])
        labels = np.concatenate([b[1] for b in blocks])
        keep = np.isin(labels, chosen)
        images, labels = images[keep], labels[keep]
        if limit is not None:
            if limit < 1:
                raise ConfigError(f"{what}={limit!r} must be at least 1 (or None for all samples).")
            images, labels = images[:limit], labels[:limit]
        remap = np.full(10, -1, dtype=np.int64)
        remap[chosen] = np.arange(len(chosen))
        X = torch.as_tensor(images, dtype=dtype) / 255.0
        if flatten:
            X = X.reshape(len(X), -1)
        return X, torch.as_tensor(remap[labels])

    X_tr, y_tr = part("data_batch_*.bin", max_train, "max_train")
    X_va, y_va = part("test_batch.bin", max_val, "max_val")
    params = {
        "root": str(root),
        "classes": None if classes is None else chosen,
        "max_train": max_train,
        "max_val": max_val,
        "flatten": bool(flatten),
    }
    meta = {
        "classes": chosen,
        "class_names": [CIFAR10_CLASSES[c] for c in chosen],
        "input_shape": list(X_tr.shape[1:]),
        "params": params,
    }
    return Dataset("cifar10", X_tr, y_tr, X_va, y_va, len(chosen), meta)


# --------------------------------------------------------------------------- registry
#: name -> (loader, one-line description)
DATASETS: dict[str, tuple[Callable[..., Dataset], str]] = {
    "modular": (modular_arithmetic, "(a + b) mod p on all pairs, tokens [a, p, b, p+1] (grokking)"),
    "digits": (digits, "scikit-learn's bundled 8x8 digits, optionally a class subset"),
    "cifar10": (load_cifar10, "CIFAR-10 from its binary files (needs root=<cifar-10-batches-bin>)"),
}


def load_dataset(name: str, **params: Any) -> Dataset:
    """Build a built-in dataset by name.

    Parameters
    ----------
    name : {"modular", "digits", "cifar10"}
    **params
        Keyword arguments of the loader (see :func:`modular_arithmetic`, :func:`digits`,
        :func:`load_cifar10`).

    Raises
    ------
    ConfigError
        For an unknown name (with the choices and the closest match) or an unknown parameter.
    """
    if name not in DATASETS:
        hint = difflib.get_close_matches(str(name), list(DATASETS), n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"Unknown dataset {name!r}. Choose one of: {', '.join(DATASETS)}.{extra}")
    loader = DATASETS[name][0]
    try:
        return loader(**params)
    except TypeError as exc:
        if "unexpected keyword" not in str(exc) and "required" not in str(exc):
            raise
        import inspect

        allowed = [p for p in inspect.signature(loader).parameters]
        raise ConfigError(
            f"Dataset {name!r} got invalid parameters {sorted(params)!r} ({exc}). Allowed: {', '.join(allowed)}."
        ) from None
