"""What the in-memory and the on-disk backends share: step checks and the common members.

Both backends validate step numbers with :func:`check_step` (``0 <= s < n_steps``: coefficients,
batches, gradient scales) and :func:`check_param_index` (``0 <= s <= n_steps``: parameters), and
derive from :class:`RecordedTrajectory`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ..exceptions import TrajectoryError
from ._common import TrainData
from ._steps import step_column, steps_where
from .base import Trajectory
from .manifest import TrajectoryManifest

__all__ = ["RecordedTrajectory", "check_step", "check_param_index"]


def _in_range(s: Any, stop: int) -> bool:
    """Whether ``s`` is a Python or numpy integer (not a ``bool``) with ``0 <= s < stop``."""
    return isinstance(s, int | np.integer) and not isinstance(s, bool) and 0 <= int(s) < stop


def check_step(s: int, n_steps: int) -> int:
    """Validate a step number ``0 <= s < n_steps``; return it as a Python ``int``.

    Raises
    ------
    TrajectoryError
        When ``s`` is not an integer in range; the message gives the valid steps.
    """
    if not _in_range(s, n_steps):
        raise TrajectoryError(f"Step {s!r} is out of range: this trajectory has steps 0..{n_steps - 1}.")
    return int(s)


def check_param_index(s: int, n_steps: int) -> int:
    """Validate a parameter index ``0 <= s <= n_steps`` (``n_steps``: the trained model); return it as an ``int``.

    Raises
    ------
    TrajectoryError
        When ``s`` is not an integer in range; the message gives the valid indices.
    """
    if not _in_range(s, n_steps + 1):
        raise TrajectoryError(
            f"params({s!r}) is out of range: parameters exist for s = 0..{n_steps} (n_steps = {n_steps})."
        )
    return int(s)


class RecordedTrajectory(Trajectory):
    """Members shared by the in-memory and the on-disk backends.

    Subclasses set ``_model``, ``_loss``, ``_manifest`` and ``_data`` (a ``TrainData`` or ``None``)
    and say in :meth:`_missing_data_message` how to attach training data.
    """

    _model: nn.Module
    _loss: Any
    _manifest: TrajectoryManifest
    _data: TrainData | None

    @property
    def buffer_names(self) -> tuple[str, ...]:
        """The tracked buffers, when training changed them at some step (else empty)."""
        names = tuple(self._manifest.buffer_names)
        return names if steps_where(self._manifest.steps, "buffers") else ()

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def loss(self) -> Any:
        return self._loss

    @property
    def manifest(self) -> TrajectoryManifest:
        return self._manifest

    @property
    def n_train(self) -> int:
        if self._data is not None:
            return len(self._data)
        if self._manifest.n_train is not None:
            return int(self._manifest.n_train)
        raise TrajectoryError(self._missing_data_message())

    def _missing_data_message(self) -> str:
        raise NotImplementedError

    def gradient_check(self) -> np.ndarray:
        """Per-step mismatch of the recorder's gradient check, shape ``(n_steps,)`` (NaN: step not checked).

        ``||g_raw - sigma * g_recomputed|| / ||g_raw||``: the loop's gradient against ``sigma`` times
        the gradient of the logged batch under the recorded loss. Round-off at checked steps of an exact
        recording; a large value, or no checked step at all (all NaN), means the data part of the
        decomposition is not verified and a large residual may come from a loss or batch mismatch.
        """
        return np.asarray([np.nan if v is None else v for v in step_column(self._manifest.steps, "gradient_check")],
                          dtype=np.float64)
