r"""Resuming a recording: the recorder's ``restore()`` and the checks that a store can be resumed.

``TrajectoryRecorder(store=..., resume=True)`` reads the store's manifest (:meth:`RecorderResumeMixin._validate_resume`:
the same model, adapter, loss, ``checkpoint_every`` and training data), and ``restore()`` loads
:math:`\theta_N`, the buffers after step :math:`N - 1`, the optimizer state and the update audit's momentum of
the last step with a stored optimizer state, so the resumed run records the same steps bit for bit
(docs/recording.md, "Resuming").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError, TrajectoryError
from ._audit import UpdateAudit
from ._common import warn_user
from ._io import decode_optimizer_state, read_tensors
from .disk import DiskTrajectory, check_model_matches
from .fingerprint import check_train_data
from .manifest import TrajectoryManifest
from .store import read_manifest

__all__ = ["RecorderResumeMixin"]

logger = logging.getLogger("explaind.trajectory.recorder")

def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every parameter group's hyperparameters (all entries but ``"params"``)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _same_setting(a: Any, b: Any) -> bool:
    """Equal hyperparameter values (``0 == 0.0``, a tuple equals the list of its items; tensors by value)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a.cpu(), b.cpu())
    return bool(a == b)


def _warn_replaced_settings(given: list[dict[str, Any]], restored: list[dict[str, Any]], n: int) -> None:
    """Warn when ``restore()`` replaced hyperparameters the resumed optimizer was built with (``load_state_dict``)."""
    changed = [f"param_groups[{g}][{k!r}]: {old[k]!r} -> {new.get(k)!r}" for g, (old, new) in
               enumerate(zip(given, restored)) for k in old if not _same_setting(old[k], new.get(k))]
    if not changed:
        return
    message = (f"restore() loaded the optimizer state of step {n}, and with it the hyperparameters the run was "
               f"recorded with, replacing those this optimizer was built with: {'; '.join(changed[:6])}. The run "
               f"continues with the recorded values. To continue with other values, set them in "
               f"optimizer.param_groups after restore(): the recorder follows a change at any step that the "
               f"optimizer adapter models (it refuses one it cannot, such as switching maximize while momentum "
               f"buffers built under the recorded value exist).")
    warn_user(logger, message, stacklevel=3)


class RecorderResumeMixin:
    """Resume methods of the recorder (see :class:`~explaind.TrajectoryRecorder`)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    _store: Path | None
    _manifest: TrajectoryManifest
    _resumed: bool
    _restarted: bool
    _loss: Any
    _params: dict[str, nn.Parameter]
    _auditor: UpdateAudit
    _data: Any
    _every: int
    _adapter: Any

    def _validate_resume(self) -> TrajectoryManifest:
        assert self._store is not None
        stored = read_manifest(self._store)
        check_model_matches(self.model, stored, repr(str(self._store)))
        for field, new in (("adapter", self._manifest.adapter), ("loss", self._manifest.loss)):
            if getattr(stored, field) != new:
                raise TrajectoryError(
                    f"Cannot resume the run at {str(self._store)!r}: it was recorded with {field} "
                    f"{getattr(stored, field)!r}, this recorder uses {new!r}."
                )
        if stored.param_stride != self._every:
            raise ConfigError(
                f"Cannot resume the run at {str(self._store)!r} with checkpoint_every={self._every}: it was recorded "
                f"with checkpoint_every={stored.param_stride}. Pass checkpoint_every={stored.param_stride}."
            )
        if self._data is not None and stored.n_train is not None:
            check_train_data(self._data, stored.train_fingerprint, repr(str(self._store)))
        point = len(stored.steps)
        while point > 0 and stored.steps[point - 1].optimizer_state is None:
            point -= 1
        if point < len(stored.steps):
            logger.warning("Resuming %s at step %d, the last step with a stored optimizer state; the %d later "
                           "step(s) are recorded again.", self._store, point, len(stored.steps) - point)
            stored.steps = stored.steps[:point]
            stored.n_steps = point
        return stored

    def restore(self) -> int:
        """Load ``theta_N``, the recorded buffers and the optimizer state into the model and optimizer; returns ``N``.

        Use with ``resume=True`` before the loop, then continue training from step ``N``. An LR
        scheduler is the loop's own: recreate it at step ``N`` (e.g. ``last_epoch=N - 1``).
        """
        if self._store is not None and self._restarted:
            return 0  # resume=True where an interrupted recording had recorded nothing: starting anew
        if self._store is None or not self._resumed:
            raise TrajectoryError("restore() needs a recorder opened with store=<path> and resume=True.")
        n = self._manifest.n_steps  # the last step with a stored optimizer state
        stored = DiskTrajectory(self._store, model=self.model, loss=self._loss)
        final, buffers = stored.params(n), dict(self.model.named_buffers())
        with torch.no_grad():
            for name, p in self._params.items():
                p.copy_(final[name])
            for name, b in stored.buffers(n).items():  # running statistics as they were after step n - 1
                buffers[name].copy_(b)
        if n > 0:
            rec = self._manifest.steps[n - 1].optimizer_state
            assert rec is not None  # _validate_resume chose n so
            tensors, meta = read_tensors(self._store, rec, step=n - 1)
            audit_file = self._manifest.steps[n - 1].audit_state  # sparse stores keep it apart
            if audit_file is not None:
                tensors = {**tensors, **read_tensors(self._store, audit_file, step=n - 1)[0]}
            audit = {k[len("audit."):]: v for k, v in tensors.items() if k.startswith("audit.")}
            state = {k: v for k, v in tensors.items() if not k.startswith("audit.")}
            given = _group_settings(self.optimizer)
            self.optimizer.load_state_dict(decode_optimizer_state(state, meta, self.optimizer.state_dict(),
                                                                  f"Trajectory file {str(self._store / rec.path)!r}"))
            _warn_replaced_settings(given, _group_settings(self.optimizer), n)
            resumed = getattr(self._adapter, "resumed", None)  # optional adapter method (OptimizerAdapter)
            if callable(resumed):
                resumed(self.optimizer)
            self._auditor.momentum = {k: v.to(self._params[k].device) for k, v in audit.items()}
        return n
