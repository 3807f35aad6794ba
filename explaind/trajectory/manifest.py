"""The versioned manifest of a recorded trajectory (docs/recording.md, "The store").

The manifest is the JSON description of a run: what was trained (parameter names, shapes and
dtypes, constants, the architecture spec when the model came from the registry), how it was
trained (optimizer adapter and hyperparameters, loss) and one :class:`StepRecord` per
completed optimizer step with the checksum of every file that step wrote (XXH3-128 since
schema 2, SHA-256 in schema-1 stores: :mod:`explaind.trajectory._checksum`).

Both trajectory backends expose the same model; the in-memory backend simply has no files.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_serializer, model_validator
from torch import Tensor

from ._checksum import parse

__all__ = [
    "SCHEMA_VERSION",
    "TensorSpec",
    "FileRecord",
    "StepRecord",
    "ArchitectureSpec",
    "TensorDigest",
    "DataFingerprint",
    "TrajectoryManifest",
    "tensor_specs",
    "dtype_name",
    "dtype_from_name",
]

#: Version of the on-disk layout; bumped on incompatible changes. 2: file checksums are XXH3-128
#: (``FileRecord.checksum``); schema-1 stores (``FileRecord.sha256``) are still read and resumed. 3: the manifest
#: names the run (``run_id``) and every step file binds it, the start files' checksums and the layout of the
#: optimizer state written with it (:mod:`~explaind.trajectory._binding`); stores of schema 1 and 2 are read and
#: resumed as before (their steps bind neither).
SCHEMA_VERSION = 3

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.bool: "bool",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
#: A name shaped like a torch dtype's (``float8_e4m3fn``, ``uint32``, ``complex32``): one that a newer torch may have.
_DTYPE_LIKE = re.compile(r"^(?:b?float|u?int|complex|bits|bool)[0-9]*(?:_[0-9a-z]+)*$")
#: The cause and fix of a dtype name this torch does not know (``_index.py`` gives it instead of "corrupted").
NEWER_TORCH = ("A store written with a newer torch holds dtypes this one lacks: upgrade torch "
               "(pip install -U torch) to read it.")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name` (any ``torch`` dtype by its name, e.g. ``"complex64"``).

    Raises
    ------
    ValueError
        When ``name`` names no torch dtype (the manifest's validators turn it into a clear error).
    """
    if name in _NAME_DTYPES:
        return _NAME_DTYPES[name]
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        if _DTYPE_LIKE.match(name):  # float8_e8m0fnu, uint32, ...: a dtype of a newer torch than this one
            raise ValueError(f"{name!r} is not a dtype of this torch ({torch.__version__}); allowed: "
                             f"{sorted(_NAME_DTYPES)} or another dtype of this torch. {NEWER_TORCH}")
        raise ValueError(f"{name!r} is not a torch dtype; allowed: {sorted(_NAME_DTYPES)} or another torch dtype name")
    return dtype


def _known_dtype(value: str) -> str:
    """A field validator: ``value`` names a torch dtype."""
    dtype_from_name(value)
    return value


#: a tensor dimension or count stored in the manifest (never negative)
_Count = Annotated[int, Field(ge=0)]
#: a name the manifest records (a parameter, a loss, an adapter, an architecture): at most 4096 characters, so a
#: store cannot make an error message that names it unreadably long (docs/recording.md, "Strangers' files, round 8")
_Name = Annotated[str, Field(max_length=4096)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Model):
    """Name, shape and dtype of one stored tensor."""

    name: _Name
    shape: list[_Count]
    dtype: str

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        return _known_dtype(value)

    @classmethod
    def of(cls, name: str, tensor: Tensor) -> TensorSpec:
        return cls(name=name, shape=list(tensor.shape), dtype=dtype_name(tensor.dtype))


class FileRecord(_Model):
    """A file of the store, relative to its root, with its size and the checksum of its bytes.

    Exactly one of ``checksum`` and ``sha256`` is set: ``checksum`` (``"xxh3-128:<32 hex>"``, or
    ``"sha256:<64 hex>"`` when a writer was asked for it) in stores of schema 2; ``sha256`` (the
    bare hex digest) in stores of schema 1. The field left unset is not written, so a schema-1
    record reads and writes back as it was.
    """

    path: str
    nbytes: _Count
    checksum: str | None = None
    sha256: str | None = None

    @field_validator("checksum")
    @classmethod
    def _known_checksum(cls, value: str | None) -> str | None:
        if value is not None:
            parse(value)
        return value

    @model_validator(mode="after")
    def _one_checksum(self) -> FileRecord:
        if (self.checksum is None) == (self.sha256 is None):
            raise ValueError(f"file record {self.path!r} needs exactly one of 'checksum' and 'sha256'")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_checksum(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        for key in ("checksum", "sha256"):
            if out.get(key) is None:
                out.pop(key, None)
        return out

    @property
    def algorithm_and_digest(self) -> tuple[str, str]:
        """``(algorithm, hex digest)`` the file's bytes must hash to."""
        if self.checksum is not None:
            return parse(self.checksum)
        assert self.sha256 is not None  # _one_checksum
        return "sha256", self.sha256


class StepRecord(_Model):
    """One completed optimizer step ``s``.

    Attributes
    ----------
    step : int
        ``s`` (0-based).
    file : FileRecord or None
        The step file (``steps/{s:06d}.safetensors``: ``theta_{s+1}``, coefficients, batch);
        ``None`` for in-memory trajectories.
    n_samples : int
        Number of (index, weight) pairs of the merged batch.
    grad_scale : float
        ``c_s``.
    audit : float or None
        ``||E_s|| / ||Delta theta_s||`` measured by the recorder (``None`` when the audit was off).
    loss_scale : float or None
        The user's loss scale measured by the gradient check (``None`` when not checked).
    gradient_check : float or None
        At a checked step, ``||g_raw - sigma * g_recomputed|| / ||g_raw||``: how far the loop's
        gradient is from ``sigma`` times the gradient of the logged batch under the recorded loss
        (``None`` when the step was not checked).
    amp_scale : float or None
        The ``torch.amp.GradScaler`` scale of the step's backward (``None`` without ``grad_scaler=``).
    autocast : str or None
        dtype of ``torch.autocast`` during the step's forward passes (``None``: no autocast).
    has_params : bool
        Whether the file holds ``theta_{s+1}``: every step of a dense store; the checkpoints of a
        sparse one (multiples of ``param_stride`` chosen by its layout, and the last step).
    optimizer_state : FileRecord or None
        The optimizer's ``state_dict`` after this step (dense stores keep only the latest two, for
        resuming; sparse stores keep one per full checkpoint).
    buffers : bool or None
        ``True`` when the step file holds :math:`\beta_{s+1}` (buffers changed by training); ``None`` otherwise.
    audit_state : FileRecord or None
        Sparse stores: the recorder audit's momentum after this checkpoint (``optimizer/state-{0,1}``,
        the latest two kept, for resuming); dense stores keep it inside ``optimizer_state``.
    """

    step: _Count
    file: FileRecord | None = None
    n_samples: _Count
    grad_scale: float
    audit: float | None = None
    loss_scale: float | None = None
    gradient_check: float | None = None
    amp_scale: float | None = None
    autocast: str | None = None
    has_params: bool = True
    optimizer_state: FileRecord | None = None
    buffers: bool | None = None
    audit_state: FileRecord | None = None


class ArchitectureSpec(_Model):
    """How to rebuild the model from the registry (``explaind.models.build_model``)."""

    name: _Name
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None


class TensorDigest(_Model):
    """One tensor of the training data in a :class:`DataFingerprint`: dtype, shape of one row, SHA-256."""

    dtype: str
    row_shape: list[int]
    sha256: str


class DataFingerprint(_Model):
    """A fingerprint of the training data a run was recorded with (docs/recording.md, "Training data").

    Attributes
    ----------
    n : int
        Number of samples.
    rows : int
        Number of rows hashed: ``n`` (all of them) or an evenly spaced sample of that many rows,
        positions ``i * (n - 1) // (rows - 1)`` for ``i = 0 .. rows-1``.
    tensors : dict of str to TensorDigest
        ``"X"`` (or ``"X.<key>"`` / ``"X.<position>"`` for tuple and mapping inputs) and ``"y"``:
        dtype, row shape and the SHA-256 of the hashed rows' bytes, in row order.
    """

    algorithm: Literal["sha256-rows"] = "sha256-rows"
    n: int = Field(ge=0)
    rows: int = Field(ge=0)
    tensors: dict[str, TensorDigest]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class TrajectoryManifest(_Model):
    """The manifest of a trajectory (``manifest.json`` of a store).

    Attributes
    ----------
    schema_version : int
        Layout version (:data:`SCHEMA_VERSION`).
    run_id : str or None
        The run's identity, 32 random hex digits drawn when the store was created; every step file names it
        (:mod:`~explaind.trajectory._binding`). ``None``: a store created before schema 3 (not written).
    params : list of TensorSpec
        Trainable parameters in ``model.named_parameters()`` order.
    constants : list of TensorSpec
        Frozen parameters and buffers.
    adapter, adapter_hyperparameters
        Registry name of the optimizer adapter and its hyperparameters.
    optimizer_class : str
        ``module.ClassName`` of the optimizer.
    loss : str
        Registry name of the loss (or the qualified name of a callable).
    architecture : ArchitectureSpec or None
        Present when the model carried an ``explaind_spec`` attribute.
    n_steps : int
        Number of completed steps (``len(steps)``).
    param_stride : int
        ``checkpoint_every`` of the recording: ``theta`` and the optimizer state are stored every
        ``param_stride`` steps and at the last step; ``1`` (a dense store): every step.
    n_train : int or None
        Number of training samples, when known.
    train_fingerprint : DataFingerprint or None
        Fingerprint of the training data at record time (``None``: recorded without ``train_data``,
        or by an explaind that did not record one).
    data_file : FileRecord or None
        ``data.safetensors`` with the training data, when stored.
    initial_file, constants_file : FileRecord or None
        ``theta_0`` and the constants.
    initial_state_file : FileRecord or None
        The momentum buffers :math:`m_{-1}` the optimizer held before step 0 (``None``: all zero, a
        fresh optimizer; docs/recording.md, "Starting from optimizer state").
    complete : bool
        ``True`` once the recorder exited cleanly (a crashed run is resumable).
    coupled : list of str
        Dropout and batch-norm modules of the model (samples coupled by randomness or batch statistics).
    random_capture : bool
        Whether the random state of every training forward was captured (docs/recording.md).
    generators : list of str
        Private generators whose states were captured too: ``"<module>.<attribute>"`` for those the
        model's modules hold, ``"generators[i]"`` for those passed to the recorder.
    buffer_names : list of str
        The buffers tracked per step (``StepRecord.buffers`` marks the steps that changed them).
    extras : dict
        Free-form JSON metadata supplied by the caller.
    """

    schema_version: int = SCHEMA_VERSION
    format: Literal["explaind-trajectory"] = "explaind-trajectory"
    explaind_version: str = ""
    created: str = Field(default_factory=_now)
    run_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] | None = None
    dtype: str = "float32"
    params: list[TensorSpec] = Field(default_factory=list)
    constants: list[TensorSpec] = Field(default_factory=list)
    adapter: _Name | None = None
    adapter_hyperparameters: dict[str, Any] = Field(default_factory=dict)
    optimizer_class: _Name | None = None
    loss: _Name | None = None
    architecture: ArchitectureSpec | None = None
    n_steps: int = 0
    param_stride: int = Field(default=1, ge=1)
    n_train: _Count | None = None
    train_fingerprint: DataFingerprint | None = None
    data_file: FileRecord | None = None
    initial_file: FileRecord | None = None
    constants_file: FileRecord | None = None
    initial_state_file: FileRecord | None = None
    steps: list[StepRecord] = Field(default_factory=list)
    complete: bool = False
    coupled: list[str] = Field(default_factory=list)
    random_capture: bool = False
    generators: list[str] = Field(default_factory=list)
    buffer_names: list[str] = Field(default_factory=list)
    extras: dict[str, Any] = Field(default_factory=dict)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        return _known_dtype(value)

    @model_validator(mode="after")
    def _distinct_names(self) -> TrajectoryManifest:
        seen: set[str] = set()
        for spec in [*self.params, *self.constants]:
            if spec.name in seen:
                raise ValueError(f"the tensor name {spec.name!r} is listed twice in 'params' and 'constants'; each "
                                 f"parameter or constant is recorded once")
            seen.add(spec.name)
        return self

    @field_serializer("steps", mode="plain", return_type=list[StepRecord])
    def _steps_as_list(self, steps: Any) -> Any:
        """A read store's steps (a :class:`~explaind.trajectory._steps.StepIndex`, held in columns) written as the list
        of records they stand for; a list as it is."""
        return steps if isinstance(steps, list) else list(steps)

    def to_json(self) -> bytes:
        """``manifest.json``'s bytes: indented JSON; ``run_id`` left out while unset, so that a store created before
        schema 3 reads and writes back as it was (an ``exclude``, not a serializer: that keeps pydantic's fast path)."""
        return self.model_dump_json(indent=1, exclude=None if self.run_id is not None else {"run_id"}).encode()

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


def tensor_specs(tensors: dict[str, Tensor]) -> list[TensorSpec]:
    """Specs of a name -> tensor dict, in its order."""
    return [TensorSpec.of(k, v) for k, v in tensors.items()]
