r"""Replaying the steps of a sparse store between two checkpoints (docs/recording.md, "Sparse checkpoints").

A store recorded with ``checkpoint_every=k`` holds :math:`\theta` only at checkpoints
:math:`c_0 = 0 < c_1 < \dots`, and the optimizer state at some of them (the full checkpoints,
:class:`~explaind.trajectory._sparse.SparseLayout`). For a step :math:`s` with
:math:`c_j \le s < c_{j+1}`, :class:`SegmentReplay` rebuilds the segment: starting from the stored
:math:`\theta_{c_j}` and the optimizer state at :math:`c_j` (stored, or the one the replay of the
segment before left there, from the last full checkpoint on; at :math:`c_0 = 0` none, or the state the
recording opened on), for
:math:`s = c_j, \dots, c_{j+1}-1` it recomputes the batch gradient
:math:`c_s \sum_k w_{s,k} \nabla\ell_k(\theta_s)` from the training data (the functional path of
the recorder's gradient check), hands it to a fresh optimizer of the recorded class with the
step's recorded hyperparameters, runs ``optimizer.step()`` and asks the adapter for the step's
:class:`~explaind.recurrence.LinearUpdate`, exactly as the recorder did. With dropout or
train-mode batch norm the gradient is that of the batched training forward of each micro-batch
under its recorded random state, from the buffers :math:`\beta_s` of the step (docs/maths.md,
"Dropout and batch norm").

The replayed :math:`\hat\theta_{c_{j+1}}` is compared with the stored checkpoint; the relative gap
:math:`\|\hat\theta_{c_{j+1}} - \theta_{c_{j+1}}\| / \|\theta_{c_{j+1}} - \theta_{c_j}\|` is kept per
segment and warned about above a tolerance. The trajectory then uses the *stored*
:math:`\theta_{c_{j+1}}`, so :math:`\Delta\theta_{c_{j+1}-1}` ends on the checkpoint: the sum of the
steps telescopes to the recorded end points and the gap lands in the residual of the segment's last
step (docs/maths.md §4). Segments are cached (least recently used), and so are the replayed
optimizer states at checkpoints without a stored one, so sweeps that walk the steps forwards or
backwards replay each segment at most twice.
"""

from __future__ import annotations

import bisect
import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..exceptions import TrajectoryError
from ..recurrence import LinearUpdate
from ._checks import batch_gradient, default_tolerance
from ._common import warn_user
from ._coupled_loss import replay_forward
from ._io import decode_optimizer_state, read_tensors
from ._participation import collect_updates
from ._sparse import StepReplay, apply_groups, relative_gap
from ._steps import steps_where
from .store import pack_updates

__all__ = ["SegmentReplay", "Segment"]

logger = logging.getLogger(__name__)

#: Replayed optimizer states kept at checkpoints that store only theta.
MAX_STATES = 8


@dataclass(frozen=True)
class Segment:
    r"""The replayed steps ``lo .. hi-1`` between the checkpoints ``lo`` and ``hi``.

    Attributes
    ----------
    lo, hi : int
        The checkpoints (``theta_lo`` and ``theta_hi`` are stored).
    thetas : list of dict
        :math:`\theta_t` for ``t = lo .. hi`` (the stored ones at both ends).
    updates : list of dict
        The :class:`LinearUpdate` of each step ``lo .. hi-1``.
    gap : float
        :math:`\|\hat\theta_{hi} - \theta_{hi}\| / \|\theta_{hi} - \theta_{lo}\|` (float64).
    """

    lo: int
    hi: int
    thetas: list[dict[str, Tensor]]
    updates: list[dict[str, LinearUpdate]]
    gap: float


class SegmentReplay:
    """Rebuild the parameters and coefficients of a sparse store's steps, one segment at a time.

    Parameters
    ----------
    source : DiskTrajectory
        The sparse store's reader (its stored checkpoints, step files, data, model and loss).
    tolerance : float, optional
        Largest replay gap before an :class:`~explaind.exceptions.ExplaindWarning` (default: the
        recorder's gradient tolerance, 1e-7 in float64 and 1e-3 in float32).
    cache_segments : int
        Replayed segments kept in memory.
    """

    def __init__(self, source: Any, tolerance: float | None = None, cache_segments: int = 2):
        self._src = source
        manifest = source.manifest
        self._ends = [0] + [s + 1 for s in steps_where(manifest.steps, "has_params")]
        #: checkpoints whose optimizer state is stored (the others take it from the replay before them)
        self._full = {0} | {s + 1 for s in steps_where(manifest.steps, "optimizer_state")}
        self._states: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._module: nn.Module | None = None
        self._tol = float(tolerance) if tolerance is not None else default_tolerance(source.dtype)
        self._cache: OrderedDict[int, Segment] = OrderedDict()
        self._cache_size = max(1, int(cache_segments))
        self._gaps: dict[int, float] = {}

    # ----------------------------------------------------------------- lookup
    def bounds(self, s: int) -> tuple[int, int]:
        """The checkpoints ``(lo, hi)`` with ``lo <= s < hi``."""
        j = bisect.bisect_right(self._ends, s)
        return self._ends[j - 1], self._ends[j]

    def segment(self, s: int) -> Segment:
        """The replayed segment holding step ``s`` (cached)."""
        lo, hi = self.bounds(s)
        if lo in self._cache:
            self._cache.move_to_end(lo)
            return self._cache[lo]
        seg = self._replay(lo, hi)
        self._cache[lo] = seg
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return seg

    def params(self, t: int) -> dict[str, Tensor]:
        r""":math:`\theta_t` (replayed; ``t`` must not be a checkpoint)."""
        seg = self.segment(t)
        return seg.thetas[t - seg.lo]

    def updates(self, s: int) -> dict[str, LinearUpdate]:
        """The coefficients of step ``s``."""
        seg = self.segment(s)
        return seg.updates[s - seg.lo]

    def gaps(self, n_steps: int, replay_all: bool) -> np.ndarray:
        """Per step: the gap of the segment that ends with it (NaN elsewhere and for segments not replayed)."""
        if replay_all:
            for lo, hi in zip(self._ends[:-1], self._ends[1:]):
                if hi not in self._gaps:
                    self.segment(lo)
        out = np.full(n_steps, np.nan, dtype=np.float64)
        for hi, gap in self._gaps.items():
            out[hi - 1] = gap
        return out

    # ----------------------------------------------------------------- replay
    def _optimizer(self, first: StepReplay, lo: int, theta: dict[str, Tensor]) -> tuple[Any, Any, dict[str, Tensor]]:
        """A fresh optimizer of the recorded class over copies of ``theta_lo``, with the state at ``lo``.

        At ``lo > 0`` the stored or replayed state; at ``lo = 0`` the state the recording opened on
        (:meth:`~explaind.trajectory.base.Trajectory.optimizer_start`; none for a fresh optimizer).
        """
        from ..plugins import adapter_optimizer_classes, get_entry

        src, manifest = self._src, self._src.manifest
        record = get_entry("optimizer_adapter", str(manifest.adapter))
        cls = next((c for c in adapter_optimizer_classes(record)
                    if f"{c.__module__}.{c.__name__}" == manifest.optimizer_class), None)
        if cls is None:
            raise TrajectoryError(
                f"The sparse store at {str(src.root)!r} was recorded with {manifest.optimizer_class}, which the "
                f"adapter {manifest.adapter!r} does not list in optimizer_classes (or whose module does not "
                f"import), so its steps cannot be replayed. Install the plugin (and the package) that recorded it, "
                f"or re-record with checkpoint_every=1."
            )
        constants = src.constants()
        leaves = {n: theta[n].detach().clone().requires_grad_(True) for n in src.param_names}
        for g in first.groups:
            for n in g["params"]:
                if n not in leaves:  # a frozen parameter held by the optimizer: never stepped
                    leaves[n] = constants[n].detach().clone().requires_grad_(True)
        groups = [{**{k: (tuple(v) if isinstance(v, list) else v) for k, v in g.items() if k != "params"},
                   "params": [leaves[n] for n in g["params"]]} for g in first.groups]
        optimizer = cls(groups)
        adapter = record.implementation.from_optimizer(optimizer)
        start = src.optimizer_start() if lo == 0 else None  # the state a recording opened on (or None: fresh)
        if lo > 0 or start is not None:
            # a stored state that cannot be read raises naming its file
            state = self._state_at(lo, optimizer) if lo > 0 else self._start_state(start, first, optimizer)
            try:
                optimizer.load_state_dict(state)
            except (ValueError, KeyError) as exc:
                raise TrajectoryError(f"The optimizer state at checkpoint theta_{lo} of the store at "
                                      f"{str(src.root)!r} does not fit the recorded parameter groups ({exc}); the "
                                      f"store is corrupted. Re-record the run.") from None
            _keep_state_dtypes(optimizer, state)
        return optimizer, adapter, {n: leaves[n] for n in src.param_names}

    def _start_state(self, start: Any, first: StepReplay, optimizer: Any) -> dict[str, Any]:
        """The ``state_dict`` the recording opened on (:meth:`~explaind.trajectory.base.Trajectory.optimizer_start`)."""
        where = f"The optimizer's start state in the store at {str(self._src.root)!r}"
        order = tuple(n for g in first.groups for n in g["params"])
        if start.names != order:
            raise TrajectoryError(f"{where} covers the parameters {list(start.names)[:6]} in that order, step 0's "
                                  f"parameter groups {list(order)[:6]}: the groups changed between the start of the "
                                  f"recording and its first step, which the replay cannot follow. Re-record with "
                                  f"checkpoint_every=1, or add parameter groups before the recorder opens.")
        return start.state_dict(optimizer.state_dict(), where)

    def _state_at(self, lo: int, optimizer: Any) -> dict[str, Any]:
        """The optimizer's ``state_dict`` at checkpoint ``lo``: stored, or left by replaying the segment before it."""
        if lo in self._full:
            state_file = self._src.manifest.steps[lo - 1].optimizer_state
            tensors, meta = read_tensors(self._src.root, state_file, step=lo - 1)
            state = {k: v for k, v in tensors.items() if not k.startswith("audit.")}
            decoded = decode_optimizer_state(state, meta, optimizer.state_dict(),
                                             f"Trajectory file {str(self._src.root / state_file.path)!r}")
            self._src.check_state_file(lo - 1, state_file, tensors, meta, audit=False)  # the state its step binds
            return decoded
        before = self._ends[bisect.bisect_left(self._ends, lo) - 1]
        if lo not in self._states:
            self.segment(before)  # its replay leaves the end state in self._states
        if lo not in self._states:  # the segment was cached, its end state forgotten
            self._replay(before, lo)
        self._states.move_to_end(lo)
        return copy.deepcopy(self._states[lo])  # load_state_dict keeps its tensors and step() updates them

    def _keep_state(self, hi: int, optimizer: Any) -> None:
        """Remember the replayed optimizer state at a checkpoint without a stored one (least recently used)."""
        if hi in self._full:
            return
        self._states[hi] = copy.deepcopy(optimizer.state_dict())
        while len(self._states) > MAX_STATES:
            self._states.popitem(last=False)

    def _replay(self, lo: int, hi: int) -> Segment:
        src = self._src
        src.require_data()
        names = list(src.param_names)
        start = src.params(lo)
        optimizer, adapter, leaves = self._optimizer(src.step_replay(lo), lo, start)
        constants, loss = src.constants(), src.loss
        thetas: list[dict[str, Tensor]] = [start]
        updates: list[dict[str, LinearUpdate]] = []
        for s in range(lo, hi):
            info = src.step_replay(s)
            where = f"Step {s} of the sparse store at {str(src.root)!r}"
            apply_groups(optimizer, info.groups, where)
            idx, w = src.batch(s)
            x, y = src.train_samples(idx)
            stepped = [n for n in names if n in set(info.stepped)]
            module, parts, generators = self._forward_of(s, where)
            grads = batch_gradient(module, {**constants, **self._buffers_at(s)}, {n: leaves[n] for n in names},
                                   stepped, loss, (x, y, w), parts, where, generators)
            scale = src.grad_scale(s)
            for n, p in leaves.items():
                p.grad = grads[n].mul(scale) if n in grads else None
            before = adapter.before_step(optimizer)
            optimizer.step()
            step_updates = collect_updates(leaves, adapter.after_step(optimizer, before), set(info.no_input), s)
            self._check_scalars(s, step_updates, where)
            updates.append(step_updates)
            thetas.append({n: p.detach().clone() for n, p in leaves.items()})
        self._keep_state(hi, optimizer)
        stored = src.params(hi)
        gap = relative_gap(thetas[-1], stored, start)
        thetas[-1] = stored
        self._gaps[hi] = gap
        if not gap <= self._tol:
            message = (
                f"Replaying steps {lo}..{hi - 1} of the sparse store at {str(src.root)!r} ends {gap:.3g} (relative "
                f"to the segment's movement) away from the stored checkpoint theta_{hi} (tolerance {self._tol:g}). "
                f"The difference is reported as the residual of step {hi - 1}. Likely causes: train_data or loss "
                f"differ from the recording, a non-deterministic model, or a modified checkpoint. Fix: pass the "
                f"recorded data and loss, or re-record with checkpoint_every=1."
            )
            warn_user(logger, message)
        return Segment(lo, hi, thetas, updates, gap)

    def _forward_of(self, s: int, where: str) -> tuple[nn.Module, Any, list[Any]]:
        """The module, micro-batch replay plan and generators of step ``s``'s batch gradient
        (:func:`~explaind.trajectory._coupled_loss.replay_forward`; the copy of the model is kept)."""
        module, parts, generators = replay_forward(self._src, s, self._module, where)
        if module is not self._src.model:
            self._module = module
        return module, parts, generators

    def _buffers_at(self, s: int) -> dict[str, Tensor]:
        r"""Copies of the buffers :math:`\beta_s` step ``s``'s forward started from (batch norm updates them)."""
        if not self._src.manifest.buffer_names:
            return {}
        return {n: t.clone() for n, t in self._src.buffers(s).items()}

    def _check_scalars(self, s: int, updates: dict[str, LinearUpdate], where: str) -> None:
        """The replayed scalar coefficients equal the recorded ones (same hyperparameters, same rounding)."""
        names = tuple(self._src.param_names)
        recorded = self._src.step_scalars(s)
        replayed = pack_updates(names, updates)["update.scalars"]
        same = (recorded == replayed) | (recorded.isnan() & replayed.isnan())
        if not bool(same.all()):
            row = int((~same).any(dim=1).nonzero()[0, 0])
            raise TrajectoryError(
                f"{where}: the replayed optimizer coefficients of {names[row]!r} ({replayed[row].tolist()}) differ "
                f"from the recorded ones ({recorded[row].tolist()}): the replay optimizer does not reproduce the "
                f"recorded step. Re-record the run with checkpoint_every=1 (or report the optimizer adapter)."
            )


def _keep_state_dtypes(optimizer: Any, state: dict[str, Any]) -> None:
    """Give every loaded state tensor back the dtype it was stored in.

    ``load_state_dict`` casts every state entry but ``step`` to its parameter's dtype, so NAdam's
    ``mu_product`` (held in torch's scalar dtype, float32) would continue in float64 and change the
    replayed ``q``, ``n`` in their last bits, which :meth:`SegmentReplay._check_scalars` refuses.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.get("state", {}).items():
        live = optimizer.state.get(params[int(index)], {})
        for key, saved in entry.items():
            now = live.get(key)
            if isinstance(saved, Tensor) and isinstance(now, Tensor) and now.dtype != saved.dtype:
                live[key] = now.to(saved.dtype)
