r"""NumPy's global random state, captured with every training forward and set again for its replay.

Some models draw their training-time randomness from NumPy rather than torch: Hugging Face's
Wav2Vec2, HuBERT and their relatives compute SpecAugment's time and feature masks
(``mask_time_prob``, ``mask_feature_prob``) with ``np.random`` inside ``forward``. The gradient the
optimizer saw is then a function of NumPy's global generator as well as torch's (docs/maths.md,
"Dropout and batch norm": :math:`\xi_s` is every generator the forward draws from). Captured with
the torch states (:class:`~explaind.trajectory._random.RandomState`), the replayed forward draws
the same masks, so such a run decomposes exactly.

The state of the legacy global generator (``np.random.get_state()``: MT19937's 624 32-bit words,
the position, and the cached Gaussian) is held as one float64 tensor of :data:`STATE_SIZE` entries,
exact because float64 holds every 32-bit integer; it is stored in the step files like the torch
states. Only the global generator is captured: a ``numpy.random.Generator`` created in ``forward``
or Python's ``random`` module is not, and a run drawing from them fails the gradient check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from ..exceptions import TrajectoryError

__all__ = ["STATE_SIZE", "numpy_state", "set_numpy_state", "kept_numpy_state"]

#: Entries of a packed state: 624 key words, position, has_gauss, cached_gaussian.
STATE_SIZE = 627


def numpy_state() -> Tensor:
    """NumPy's global random state now, packed as a float64 tensor ``(STATE_SIZE,)``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    packed = np.empty(STATE_SIZE, dtype=np.float64)
    packed[:624] = keys
    packed[624:] = (pos, has_gauss, gauss)
    return torch.from_numpy(packed)


def set_numpy_state(state: Tensor, where: str) -> None:
    """Set NumPy's global generator to a state packed by :func:`numpy_state`.

    Raises
    ------
    TrajectoryError
        When ``state`` is not such a state (a corrupted store), naming ``where``.
    """
    values = state.detach().cpu().to(torch.float64).numpy()
    keys = values[:624]
    if values.shape != (STATE_SIZE,) or not np.all((keys >= 0) & (keys < 2**32) & (keys == np.floor(keys))):
        raise TrajectoryError(f"{where}: the recorded NumPy random state has shape {tuple(values.shape)} or values "
                              f"that are no 32-bit words (expected {STATE_SIZE} entries). The store is corrupted; "
                              f"re-record the run.")
    np.random.set_state(("MT19937", keys.astype(np.uint32), int(values[624]), int(values[625]), float(values[626])))


@contextlib.contextmanager
def kept_numpy_state() -> Iterator[None]:
    """Restore NumPy's global generator after the body (the caller's draws go on as if it never ran)."""
    saved = np.random.get_state(legacy=True)
    try:
        yield
    finally:
        np.random.set_state(saved)
