"""A trajectory read from a store directory, streamed step by step (docs/recording.md, "The store").

Reading step ``s`` opens only ``steps/{s:06d}.safetensors`` (``theta_{s+1}``, the coefficients and
the batch of step ``s``), verifies its checksum and keeps the last few decoded steps in a small
LRU cache; the run is never loaded as a whole.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..exceptions import ConfigError, ExplaindError, TrajectoryError, UnknownEntryError
from ..recurrence import LinearUpdate
from ._binding import check_state, check_step_file, run_binding
from ._buffers import unpack_buffers
from ._common import TrainData, resolve_loss_record
from ._coupled_loss import refuse_loss_mismatch
from ._io import check_specs, read_tensors, store_root
from ._layout import warn_uncommitted_steps
from ._random import MicroBatch, find_generators
from ._random_store import unpack_micro_batches
from ._sparse import StepReplay
from ._start_optimizer import OptimizerStart
from ._start_state import read_start_file
from ._steps import step_column, steps_where
from ._verify import verify_store
from .fingerprint import check_train_data
from .manifest import FileRecord, TrajectoryManifest, dtype_from_name
from .recorded import RecordedTrajectory, check_param_index, check_step
from .replay import SegmentReplay
from .store import check_updates, read_manifest, unpack_updates

__all__ = ["DiskTrajectory", "check_model_matches", "build_model_from_spec"]

logger = logging.getLogger(__name__)


def check_model_matches(model: nn.Module, manifest: TrajectoryManifest, where: str) -> None:
    """Raise :class:`TrajectoryError` listing every recorded tensor whose name or shape differs in ``model``.

    Recorded parameters and constants must exist in ``model`` (as parameters or buffers, whatever their
    ``requires_grad``) with the recorded shapes; a model parameter or buffer that was not recorded is a
    mismatch too (the recorder records every buffer, so the forward of a model with another one is not the
    recorded model's). Dtypes may differ: the recorded tensors replace the model's in every evaluation.
    """
    expected = {t.name: tuple(t.shape) for t in [*manifest.params, *manifest.constants]}
    actual = {n: tuple(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    buffers = {n for n, _ in model.named_buffers()}
    problems = []
    for name, shape in expected.items():
        if name not in actual:
            problems.append(f"{name}: recorded shape {shape}, missing from the model")
        elif actual[name] != shape:
            problems.append(f"{name}: recorded shape {shape}, model has {actual[name]}")
    for name, shape in actual.items():
        if name not in expected:
            kind = "buffer of shape" if name in buffers else "shape"
            problems.append(f"{name}: model {kind} {shape}, not in the recorded trajectory")
    if problems:
        listed = "; ".join(problems)
        raise TrajectoryError(
            f"The model does not match the trajectory at {where}: {listed}. Pass a model with the architecture "
            f"used when recording."
        )


def _declared_elements(manifest: TrajectoryManifest, where: str) -> int:
    """Elements of the parameters and constants the manifest declares (shapes checked to be non-negative)."""
    total = 0
    for spec in [*manifest.params, *manifest.constants]:
        if any(d < 0 for d in spec.shape):
            raise TrajectoryError(f"The manifest of the trajectory at {where} records {spec.name!r} with the shape "
                                  f"{spec.shape}; the store is corrupted. Re-record the run.")
        total += math.prod(spec.shape)
    return total


def build_model_from_spec(manifest: TrajectoryManifest, where: str, max_parameters: int | None = None) -> nn.Module:
    """Rebuild the recorded model with ``explaind.models.build_model`` from the manifest's architecture spec.

    Nothing is allocated before the size is checked: the parameter and constant shapes the manifest
    declares, and the architecture's ``parameter_count`` of the spec's config, must agree and stay
    within ``max_parameters`` (``explaind.models.resolve_max_parameters``).

    Raises
    ------
    TrajectoryError
        For a run not recorded from the registry, a spec over the size limit (the message gives the
        limit and how to raise it), a spec whose size differs from the declared shapes, or an invalid
        spec.
    """
    spec = manifest.architecture
    if spec is None:
        raise TrajectoryError(
            f"The trajectory at {where} was recorded from a model not built by explaind.models.build_model, so it "
            f"cannot be rebuilt. Pass model=<a module with the same architecture> to Trajectory.load."
        )
    models = importlib.import_module("explaind.models")
    limit = models.resolve_max_parameters(max_parameters)
    fix = (f"If you trust the store and the size is intended, pass max_parameters=<n> to Trajectory.load (or set "
           f"{models.MAX_PARAMETERS_ENV}=<n>), or pass model=<a module with the recorded architecture>.")
    declared = _declared_elements(manifest, where)
    if declared > limit:
        raise TrajectoryError(f"The trajectory at {where} declares {declared:,} parameter and constant elements, "
                              f"more than the limit of {limit:,}; nothing was built. {fix}")
    try:
        count = models.count_parameters(spec.name, spec.config)
        if count is not None and count != declared:
            raise TrajectoryError(
                f"The architecture spec of the trajectory at {where} ({spec.name!r}) builds {count:,} elements but its "
                f"manifest declares parameters and constants of {declared:,}; the store was modified. Re-record the "
                f"run, or pass model=<a module with the recorded architecture>."
            )
        kwargs = {} if spec.seed is None else {"seed": spec.seed}
        return models.build_model(spec.name, spec.config, dtype=manifest.dtype, max_parameters=limit, **kwargs)
    except (ConfigError, UnknownEntryError) as exc:
        raise TrajectoryError(f"Cannot rebuild the model of the trajectory at {where} from its architecture spec: "
                              f"{exc} {fix}") from None


class DiskTrajectory(RecordedTrajectory, reads_stores=True):
    """A stored trajectory (see :mod:`explaind.trajectory.store` for the layout).

    Parameters
    ----------
    path : str or Path
        The store directory.
    model : nn.Module, optional
        Template module; rebuilt from the registry when omitted and the run recorded a spec.
    train_data : (X, y) or Dataset, optional
        Training data; defaults to ``data.safetensors`` when the run stored it.
    loss : str, LossRecord or callable, optional
        Overrides the recorded loss (required for a run recorded with a custom callable).
    cache_steps : int
        Number of decoded step files kept in memory.
    replay_tolerance : float, optional
        Sparse stores: the largest gap between a replayed and a stored checkpoint before a warning
        (see :mod:`explaind.trajectory.replay`).
    cache_segments : int
        Sparse stores: replayed segments kept in memory.
    verify_train_data : bool
        Check ``train_data`` against the fingerprint recorded with the run (its length always); ``False``
        skips the fingerprint, for data known to hold the same samples in other bytes.
    max_parameters : int, optional
        Size limit of a model rebuilt from the recorded spec (see :func:`build_model_from_spec`).
    generators : list or tuple of torch.Generator, optional
        The generators passed to the recorder as ``generators=[...]``, in the same order (needed to
        replay the run's training forwards; generators held by the model's modules are found in it
        and left out). A :class:`~explaind.exceptions.ConfigError` names a non-generator, or a count
        other than the run's ``"generators[i]"`` entries of ``manifest.generators``.

    Notes
    -----
    A sparse store (``checkpoint_every > 1``) ends at its last checkpoint holding theta: steps a crash
    left after it are not read (a resumed recording records them again from the last stored
    optimizer state).
    """

    def __init__(self, path: str | Path, model: nn.Module | None = None, train_data: Any = None, *,
                 loss: Any = None, cache_steps: int = 4, replay_tolerance: float | None = None,
                 cache_segments: int = 2, verify_train_data: bool = True, max_parameters: int | None = None,
                 generators: Any = None):
        for name, value in (("cache_steps", cache_steps), ("cache_segments", cache_segments)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ConfigError(f"Trajectory.load: {name}={value!r} is not allowed: it takes a positive int (how "
                                  f"many are kept in memory). Fix: leave it out, or pass e.g. {name}=4.")
        self.root = store_root(path)  # '~' expanded; a later os.chdir does not move it
        self._generators: tuple[torch.Generator, ...] = ()
        self._manifest = read_manifest(self.root)
        self._run = run_binding(self._manifest)  # what every step file of the run binds (_binding.py)
        self._committed = len(self._manifest.steps)  # a sparse store's reader may end before (_end_at_checkpoint)
        self._replay: SegmentReplay | None = None
        if self.sparse:
            self._end_at_checkpoint()
        self._cache: OrderedDict[int, tuple[dict[str, Tensor], dict[str, str]]] = OrderedDict()
        self._cache_size = max(1, int(cache_steps))
        self._static: dict[str, Any] = {}
        where = repr(str(self.root))
        if model is None:
            model = build_model_from_spec(self._manifest, where, max_parameters)
            self._fill_model(model)
        check_model_matches(model, self._manifest, where)
        self._model = model
        if generators is not None:
            self._generators = self._passed_generators(generators, model, where)
        if loss is None:
            if self._manifest.loss is None:
                raise TrajectoryError(f"The trajectory at {where} records no loss; pass loss=... to Trajectory.load.")
            if self._manifest.loss.startswith("custom:"):
                raise TrajectoryError(
                    f"The trajectory at {where} was recorded with the loss callable {self._manifest.loss!r}, which is "
                    f"not in the registry. Pass the same callable again: Trajectory.load(path, loss=<callable>)."
                )
            loss = self._manifest.loss
        self._loss = resolve_loss_record(loss)
        refuse_loss_mismatch(self._manifest.loss, self._loss, where)  # batch-coupled or per-sample, as recorded
        self._data = TrainData(train_data) if train_data is not None else None
        if self._data is not None and self._manifest.n_train is not None:
            self._check_data(self._data, where, verify_train_data)
        if self.sparse:
            self._replay = SegmentReplay(self, replay_tolerance, cache_segments)

    def _passed_generators(self, generators: Any, model: nn.Module, where: str) -> tuple[torch.Generator, ...]:
        """``generators=`` as the recorder kept them: those ``model`` holds left out, as many as the run passed.

        Raises
        ------
        ConfigError
            When an entry is not a :class:`torch.Generator`, or the count differs from the run's.
        """
        given = list(generators) if isinstance(generators, (list, tuple)) else [generators]
        bad = [type(g).__name__ for g in given if not isinstance(g, torch.Generator)]
        held = {id(g) for g in find_generators(model).values()}  # found by name, as the recorder did
        kept = tuple(g for g in given if id(g) not in held)
        recorded = [n for n in self._manifest.generators if n.startswith("generators[")]
        if bad or len(kept) != len(recorded):
            raise ConfigError(
                f"Trajectory.load(generators=...): got {len(given)} object(s) ({bad or 'torch.Generator'}), "
                f"{len(kept)} of them not held by the model, but the run at {where} was recorded with "
                f"{len(recorded)} generator(s) passed as generators=[...] ({recorded}). Allowed: a list of "
                f"{len(recorded)} torch.Generator(s), in the order given to the recorder (those the model's modules "
                f"hold are found by name and may be left out). Fix: pass the same generators as TrajectoryRecorder("
                f"generators=[...]), or leave generators= out when the run passed none.")
        return kept

    def _check_data(self, data: TrainData, where: str, verify: bool) -> None:
        """The given training data has the recorded length and (unless ``verify`` is off) fingerprint."""
        if len(data) != self._manifest.n_train:
            raise TrajectoryError(
                f"train_data has {len(data)} samples but the run at {where} was recorded with "
                f"{self._manifest.n_train}: its batch indices refer to that data. Pass the training data the run "
                f"was recorded with, in the same order."
            )
        if verify is not True:
            if verify is not False:
                raise ConfigError(f"verify_train_data={verify!r} is not allowed. Choose True (the default) or False.")
            logger.warning("verify_train_data=False: the training data given for %s is not compared with the "
                           "recorded fingerprint; train-axis scores are exact only if it is the recorded data.", where)
            return
        check_train_data(data, self._manifest.train_fingerprint, where)

    @property
    def sparse(self) -> bool:
        """Whether the store keeps theta only at checkpoints (recorded with ``checkpoint_every > 1``)."""
        return self._manifest.param_stride > 1

    def _end_at_checkpoint(self) -> None:
        steps = self._manifest.steps
        last = max((s + 1 for s in steps_where(steps, "has_params")), default=0)
        if last < len(steps):
            end = f"ends at its last checkpoint, step {last - 1}" if last else "holds no checkpoint yet"
            logger.warning("The sparse store at %s %s: the %d step(s) recorded after it (by a recording interrupted "
                           "or still running) are not read.", self.root, end, len(steps) - last)
            self._manifest.steps = steps[:last]
            self._manifest.n_steps = last

    def warn_uncommitted(self) -> list[int]:
        """Warn when ``steps/`` holds files of steps that the store's index does not list (``Trajectory.load`` calls
        this; :func:`~explaind.trajectory._layout.warn_uncommitted_steps`); returns those steps."""
        return warn_uncommitted_steps(self.root, self._committed, resuming=False)

    # ----------------------------------------------------------------- files
    def _static_file(self, key: str, record: FileRecord | None) -> dict[str, Tensor]:
        if key not in self._static:
            if record is None:
                raise TrajectoryError(f"The manifest of the trajectory at {str(self.root)!r} names no {key} file "
                                      f"({key}_file is null); every store has one. The store is corrupted or was not "
                                      f"written by explaind; re-record the run.")
            tensors = read_tensors(self.root, record)[0]
            if key == "initial":
                self._check_params(tensors, f"{record.path!r}")
            elif key == "constants":
                check_specs(tensors, "const.", self._manifest.constants, f"{record.path!r}")
            self._static[key] = tensors
        return self._static[key]

    def _step_tensors(self, s: int) -> dict[str, Tensor]:
        return self._step_file(s)[0]

    def _step_file(self, s: int) -> tuple[dict[str, Tensor], dict[str, str]]:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        record = self._manifest.steps[s]
        if record.file is None:
            raise TrajectoryError(f"Step {s} of the trajectory at {str(self.root)!r} has no file.")
        tensors, meta = read_tensors(self.root, record.file, step=s)
        where = f"{record.file.path!r} (step {s})"
        check_step_file(meta, record, self._run, f"{where} of the store {str(self.root)!r}")
        if record.has_params:
            self._check_params(tensors, where)
        check_updates(self._manifest.params, tensors, where, dense=not self.sparse)
        self._check_batch(tensors, where)
        self._cache[s] = (tensors, meta)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tensors, meta

    def check_state_file(self, s: int, record: FileRecord, tensors: dict[str, Tensor], metadata: dict[str, str] | None,
                         audit: bool | None = None) -> bool:
        """The optimizer (or audit) state ``record`` read after step ``s`` is the one step ``s``'s file binds
        (:func:`~explaind.trajectory._binding.check_state`; its step file is read and checked first); ``False``
        when the step file binds no state (a store written before schema 3)."""
        step_file = self._manifest.steps[s].file
        where = f"{record.path!r} (step {s}) of the store {str(self.root)!r}"
        return check_state(self._step_file(s)[1], tensors, metadata, where, repr(step_file and step_file.path),
                           audit=audit)

    def _check_params(self, tensors: dict[str, Tensor], where: str) -> None:
        check_specs(tensors, "param.", self._manifest.params, where)

    def _check_batch(self, tensors: dict[str, Tensor], where: str) -> None:
        idx, w = tensors.get("batch.indices"), tensors.get("batch.weights")
        ok = (idx is not None and w is not None and idx.dim() == 1 and w.dim() == 1 and idx.shape == w.shape
              and not idx.is_floating_point() and idx.dtype != torch.bool and w.is_floating_point())
        if ok and idx.numel():
            n = self._manifest.n_train
            ok = int(idx.min()) >= 0 and (n is None or int(idx.max()) < n) and bool(torch.isfinite(w).all())
        if not ok:
            raise TrajectoryError(f"Trajectory file {where} has an invalid batch (indices must be integers in "
                                  f"0..n_train-1 with one finite weight each). The store is corrupted; re-record "
                                  f"the run.")

    def _fill_model(self, model: nn.Module) -> None:
        """Load ``theta_N`` and the constants into a rebuilt model (its weights are then the trained ones)."""
        check_model_matches(model, self._manifest, repr(str(self.root)))
        final = self.params(self._manifest.n_steps)
        state = {**final, **self.constants()}
        with torch.no_grad():
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if name in state and tuple(state[name].shape) == tuple(t.shape):
                    t.copy_(state[name])

    # ----------------------------------------------------------------- structure
    @property
    def n_steps(self) -> int:
        return self._manifest.n_steps

    @property
    def param_names(self) -> tuple[str, ...]:
        return self._manifest.param_names

    def _missing_data_message(self) -> str:
        return (
            f"The trajectory at {str(self.root)!r} has no training data. Pass train_data=(X, y) to Trajectory.load."
        )

    # ----------------------------------------------------------------- per step
    def params(self, s: int) -> dict[str, Tensor]:
        s = check_param_index(s, self.n_steps)
        if s > 0 and not self._manifest.steps[s - 1].has_params and self._replay is not None:
            return self._replay.params(s)  # only sparse stores have steps without theta (store._check_consistency)
        if s == 0:
            tensors = self._static_file("initial", self._manifest.initial_file)
        else:
            tensors = self._step_tensors(s - 1)
        return {name: tensors[f"param.{name}"] for name in self.param_names}

    def constants(self) -> dict[str, Tensor]:
        if self._manifest.constants_file is None:
            return {}
        tensors = self._static_file("constants", self._manifest.constants_file)
        return {spec.name: tensors[f"const.{spec.name}"] for spec in self._manifest.constants}

    def initial_state(self) -> dict[str, Tensor]:
        return dict(self._start_file()[0])

    def optimizer_start(self) -> OptimizerStart | None:
        return self._start_file()[1]

    def _start_file(self) -> tuple[dict[str, Tensor], OptimizerStart | None]:
        """``initial_state.safetensors``: :math:`m_{-1}` and the optimizer's whole start state (when kept)."""
        if "start" not in self._static:
            self._static["start"] = read_start_file(self.root, self._manifest.initial_state_file, self.params(0))
        return self._static["start"]

    def updates(self, s: int) -> dict[str, LinearUpdate]:
        s = check_step(s, self.n_steps)
        if self._replay is not None:
            return self._replay.updates(s)
        return unpack_updates(self.param_names, self._step_tensors(s))

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the recorded parameters (from the manifest)."""
        return dtype_from_name(self._manifest.dtype)

    # ----------------------------------------------------------------- sparse stores
    def step_replay(self, s: int) -> StepReplay:
        """The replay record of step ``s`` of a sparse store (parameter groups, stepped parameters)."""
        record = self._manifest.steps[s]
        return StepReplay.decode(self._step_file(s)[1], f"Trajectory file {record.file and record.file.path!r}")

    def step_scalars(self, s: int) -> Tensor:
        """The recorded scalar coefficient table of step ``s``, shape ``(n_params, 7)`` (NaN: a tensor coefficient)."""
        return self._step_tensors(s)["update.scalars"]

    def require_data(self) -> None:
        """Raise ``TrajectoryError`` when a sparse store has no training data to replay its steps from."""
        if self._data is None and self._manifest.data_file is None:
            raise TrajectoryError(
                f"The trajectory at {str(self.root)!r} is a sparse store (checkpoint_every="
                f"{self._manifest.param_stride}): the steps between checkpoints are rebuilt by replaying the optimizer "
                f"on the recorded batches, which needs the training data. Pass Trajectory.load(path, "
                f"train_data=(X, y)) with the data of the recording, or record with store_data=True."
            )

    def replay_error(self, replay_all: bool = True) -> np.ndarray:
        r"""Per step, the replay gap of the segment ending with it, shape ``(n_steps,)``.

        The gap is :math:`\|\hat\theta_{hi} - \theta_{hi}\| / \|\theta_{hi} - \theta_{lo}\|` between
        the replayed and the stored checkpoint ``hi`` of a segment ``lo .. hi-1`` (float64); NaN at
        the other steps, for segments not replayed (``replay_all=False``) and for dense stores.
        """
        if self._replay is None:
            return np.full(self.n_steps, np.nan, dtype=np.float64)
        return self._replay.gaps(self.n_steps, replay_all)

    def batch(self, s: int) -> tuple[Tensor, Tensor]:
        tensors = self._step_tensors(check_step(s, self.n_steps))
        return tensors["batch.indices"], tensors["batch.weights"]

    def micro_batches(self, s: int) -> list[MicroBatch]:
        tensors = self._step_tensors(check_step(s, self.n_steps))
        return unpack_micro_batches(tensors, tensors["batch.indices"], tensors["batch.weights"],
                                    f"{self._manifest.steps[s].file.path!r} (step {s})")  # type: ignore[union-attr]

    def buffers(self, s: int) -> dict[str, Tensor]:
        s = check_param_index(s, self.n_steps)
        names = self._manifest.buffer_names
        last = next((j for j in range(s - 1, -1, -1) if self._manifest.steps[j].buffers), None)
        if last is None:
            constants = self.constants()
            return {n: constants[n] for n in names}
        where = f"{self._manifest.steps[last].file.path!r} (step {last})"  # type: ignore[union-attr]
        return unpack_buffers(self._step_tensors(last), names, where)

    def grad_scale(self, s: int) -> float:
        return float(self._manifest.steps[check_step(s, self.n_steps)].grad_scale)

    def audit(self) -> np.ndarray:
        return np.asarray([np.nan if v is None else v for v in step_column(self._manifest.steps, "audit")],
                          dtype=np.float64)

    def train_samples(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        if self._data is None:
            if self._manifest.data_file is None:
                raise TrajectoryError(
                    f"The trajectory at {str(self.root)!r} has no training data attached. Pass "
                    f"Trajectory.load(path, train_data=(X, y)), or record with store_data=True."
                )
            self._data = self._stored_data(self._manifest.data_file)
        return self._data.get(indices)

    def _stored_data(self, record: FileRecord) -> TrainData:
        """``data.safetensors`` as :class:`TrainData`, checked to hold ``n_train`` samples."""
        tensors = read_tensors(self.root, record)[0]
        where = repr(str(self.root / record.path))
        try:
            data = TrainData.from_flat(tensors)
            n = len(data)
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError, ExplaindError) as exc:
            raise TrajectoryError(f"Trajectory file {where} does not hold training data as explaind stores it "
                                  f"(tensors 'X' or 'X.<key>', and 'y'; here {sorted(tensors)}): {exc!r}. The store "
                                  f"is corrupted; pass Trajectory.load(path, train_data=(X, y)) with the recorded "
                                  f"data.") from None
        if self._manifest.n_train is not None and n != self._manifest.n_train:
            raise TrajectoryError(f"Trajectory file {where} holds {n} samples, but the run was recorded with n_train="
                                  f"{self._manifest.n_train}. The store is corrupted; pass Trajectory.load(path, "
                                  f"train_data=(X, y)) with the recorded data.")
        return data

    # ----------------------------------------------------------------- extras
    def verify(self) -> None:
        """Check every file's checksum (reads the whole store once); raises ``TrajectoryError`` at the first bad one.

        Of the optimizer states, the newest is checked (the one a resume loads); a sparse store's
        checkpoint states are all checked, and the newest audit state. While a recorder still writes the
        store, a state slot it replaced meanwhile is checked again against the store's newer index
        (:func:`~explaind.trajectory._verify.verify_store`).
        """
        verify_store(self.root, self._manifest, self.sparse)

    def __repr__(self) -> str:
        return (
            f"DiskTrajectory({str(self.root)!r}, n_steps={self.n_steps}, loss={self._loss.name!r}, "
            f"adapter={self._manifest.adapter!r}, complete={self._manifest.complete})"
        )
