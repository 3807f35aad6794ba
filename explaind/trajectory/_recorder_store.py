"""The store side of :class:`~explaind.TrajectoryRecorder`: opening, resuming and writing a store directory.

Kept apart from the hooks so that each module reads on its own; the methods use the recorder's
attributes (``_store``, ``_manifest``, ``_writer``, ``_params``, ...) set in its ``__init__``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError
from ..recurrence import LinearUpdate
from ._gradients import UpdateAudit
from ._io import decode_optimizer_state, encode_optimizer_state, read_tensors
from .disk import DiskTrajectory, check_model_matches
from .fingerprint import check_train_data, data_fingerprint
from .manifest import StepRecord, TrajectoryManifest
from .store import StoreWriter, pack_updates, read_manifest

__all__ = ["RecorderStoreMixin"]

logger = logging.getLogger("explaind.trajectory.recorder")


class RecorderStoreMixin:
    """Store methods of the recorder (see :class:`~explaind.TrajectoryRecorder`)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    _store: Path | None
    _manifest: TrajectoryManifest
    _resumed: bool
    _restarted: bool
    _loss: Any
    _params: dict[str, nn.Parameter]
    _auditor: UpdateAudit
    _writer: StoreWriter | None
    _fsync: bool
    _background: bool
    _data: Any
    _store_data: bool
    _state_every: int
    _audit_on: bool

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
        """Load ``theta_N`` and the stored optimizer state into the model and optimizer; returns ``N``.

        Use with ``resume=True`` before the loop, then continue training from step ``N``. An LR
        scheduler is the loop's own: recreate it at step ``N`` (e.g. ``last_epoch=N - 1``).
        """
        if self._store is not None and self._restarted:
            return 0  # resume=True where an interrupted recording had recorded nothing: starting anew
        if self._store is None or not self._resumed:
            raise TrajectoryError("restore() needs a recorder opened with store=<path> and resume=True.")
        n = self._manifest.n_steps  # the last step with a stored optimizer state
        final = DiskTrajectory(self._store, model=self.model, loss=self._loss).params(n)
        with torch.no_grad():
            for name, p in self._params.items():
                p.copy_(final[name])
        if n > 0:
            rec = self._manifest.steps[n - 1].optimizer_state
            assert rec is not None  # _validate_resume chose n so
            tensors, meta = read_tensors(self._store, rec, step=n - 1)
            audit = {k[len("audit."):]: v for k, v in tensors.items() if k.startswith("audit.")}
            state = {k: v for k, v in tensors.items() if not k.startswith("audit.")}
            self.optimizer.load_state_dict(decode_optimizer_state(state, meta, self.optimizer.state_dict()))
            self._auditor.momentum = {k: v.to(self._params[k].device) for k, v in audit.items()}
        return n

    def _open_store(self, theta: dict[str, Tensor], constants: dict[str, Tensor]) -> None:
        assert self._store is not None
        m = self._manifest
        if self._resumed:
            stored = DiskTrajectory(self._store, model=self.model, loss=self._loss).params(m.n_steps)
            differ = [n for n in self._params if not torch.equal(stored[n], theta[n].to("cpu"))]
            if differ:
                raise TrajectoryError(
                    f"Resuming {str(self._store)!r} at step {m.n_steps}, but the model's parameters {differ} differ "
                    f"from the stored theta_{m.n_steps}. Call rec.restore() before `with rec:`."
                )
            m.complete = False
            self._writer = StoreWriter(self._store, m, fsync=self._fsync, background=self._background)
            return
        if self._data is not None:
            m.train_fingerprint = data_fingerprint(self._data)
        # the manifest goes last: until it is written the directory holds no store (store.py, _layout.py)
        self._writer = StoreWriter(self._store, m, fsync=self._fsync, background=self._background, new=True)
        m.initial_file = self._writer.write_file("initial.safetensors", {f"param.{k}": v for k, v in theta.items()})
        if constants:
            m.constants_file = self._writer.write_file(
                "constants.safetensors", {f"const.{k}": v for k, v in constants.items()}
            )
        if self._data is not None and self._store_data:
            m.data_file = self._writer.write_file("data.safetensors", self._data.flat())
        self._writer.finish_setup()

    def _write_step(self, record: StepRecord, theta_next: dict[str, Tensor], updates: dict[str, LinearUpdate],
                    st: dict[str, Any]) -> None:
        assert self._writer is not None
        tensors: dict[str, Tensor] = {f"param.{n}": t for n, t in theta_next.items()}
        tensors.update(pack_updates(tuple(self._params), updates))
        tensors["batch.indices"] = st["indices"]
        tensors["batch.weights"] = st["weights"]
        state = None
        if self._state_every and (record.step + 1) % self._state_every == 0:
            state_tensors, meta = encode_optimizer_state(self.optimizer.state_dict())
            if self._audit_on:
                state_tensors.update({f"audit.{k}": v.detach().clone() for k, v in self._auditor.momentum.items()})
            state = (state_tensors, meta)
        self._writer.write_step(record, tensors, state)
