"""Helpers shared by the trajectory backends and the recorder: losses, training data, model specs, warnings."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError, TrajectoryError, warn_at_caller
from ..inputs import Inputs, as_inputs
from ..records import LossRecord
from .manifest import ArchitectureSpec

#: The class label that torch's and Hugging Face's cross entropies skip (``ignore_index``).
IGNORE_INDEX = -100

__all__ = [
    "evaluation_mode",
    "FirstForward",
    "note_full_graph",
    "TrainData",
    "resolve_loss_record",
    "loss_name",
    "architecture_spec",
    "split_model_tensors",
    "validate_indices",
    "validate_weights",
    "default_weights",
    "refuse_ignored_labels",
    "IGNORE_INDEX",
    "warn_user",
    "ModelHook",
]


class ModelHook:
    """A hook the recorder registers on the user's model, left behind by copies of the model.

    ``copy.deepcopy(model)`` inside ``with rec:`` (an EMA in ``torch.optim.swa_utils.AveragedModel``, a snapshot
    of the best model) copies the module's hook dictionaries; a bound method would drag the recorder's state
    (locks, tensors, generators) into the copy, or fail to copy. A copy of this wrapper (deep copy or pickle) is
    inert: the copy's forwards are not the recorded model's, so the recorder does not see them.

    Parameters
    ----------
    fn : callable or None
        The hook; ``None`` does nothing.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Any = None):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return None if self.fn is None else self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelHook:
        return ModelHook()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return ModelHook, ()


def note_full_graph(exc: BaseException | None) -> None:
    """Add a note naming the cause and the fix to torch's refusal of a graph break under
    ``torch.compile(..., fullgraph=True)`` when the break is in explaind's code: the recorder's hooks on the
    recorded model (random-state capture, gradient probes) run Python that torch cannot trace into one graph."""
    if exc is None or type(exc).__name__ != "Unsupported" or not type(exc).__module__.startswith("torch._dynamo"):
        return
    if "explaind" not in str(exc) or any("explaind" in n for n in getattr(exc, "__notes__", [])):
        return
    exc.add_note(
        "explaind: the graph break torch refuses is in a hook explaind's recorder placed on the recorded model (it "
        "captures the random state of each training forward and probes the gradients), which torch.compile cannot "
        "trace into one graph: fullgraph=True forbids the break. Fix: compile without fullgraph=True (the hooks "
        "then break the graph and the run is recorded exactly; docs/guide_own_model.md, 'Fabric and Accelerate').")


class ForwardHookPair:
    """A forward pre-hook (``self._pre``) and a forward hook (``self._post``) on the root module ``self.model``,
    registered and removed together (each wrapped in :class:`ModelHook`); subclasses set ``model`` and
    ``_handles = []`` and define the two hooks."""

    model: nn.Module
    _handles: list[Any]

    def attach(self) -> None:
        """Register the two hooks (once)."""
        if not self._handles:
            self._handles = [self.model.register_forward_pre_hook(ModelHook(self._pre)),
                             self.model.register_forward_hook(ModelHook(self._post))]

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre(self, module: nn.Module, args: Any) -> None:
        raise NotImplementedError

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        raise NotImplementedError


class FirstForward:
    """Call ``fn()`` at the first gradient-enabled forward of ``model`` after each :meth:`arm` (a forward pre-hook,
    a :class:`ModelHook`): the forward a step's training starts with, not an evaluation under ``torch.no_grad()``.

    Parameters
    ----------
    model : nn.Module
    fn : callable
        Called without arguments.
    """

    def __init__(self, model: nn.Module, fn: Any):
        self.model, self.fn = model, fn
        self.armed = False
        self._handle: Any = None

    def arm(self) -> None:
        """Call ``fn`` at the next gradient-enabled forward."""
        self.armed = True

    def attach(self) -> None:
        """Register the hook (once)."""
        if self._handle is None:
            self._handle = self.model.register_forward_pre_hook(ModelHook(self._hook))

    def detach(self) -> None:
        """Remove the hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: Any) -> None:
        if self.armed and torch.is_grad_enabled():
            self.armed = False
            self.fn()


def resolve_loss_record(loss: Any) -> LossRecord:
    """A :class:`LossRecord` from a record, a registered name or a ``(outputs, targets) -> mean`` callable.

    Names and callables are resolved by ``explaind.losses.resolve_loss``; an unknown name raises
    :class:`~explaind.exceptions.UnknownEntryError` listing the registered losses.
    """
    if isinstance(loss, LossRecord):
        return loss
    if loss is None:
        raise ConfigError(
            "loss=None: the recorder needs the training loss to relate gradients to samples. Pass a "
            "registered name such as loss='cross_entropy', 'nll' or 'mse', or a callable "
            "(outputs, targets) -> mean loss."
        )
    losses = importlib.import_module("explaind.losses")
    return losses.resolve_loss(loss)


def loss_name(record: LossRecord) -> str:
    """The name stored in manifests (the registry name of the loss)."""
    return record.name


def architecture_spec(model: nn.Module) -> ArchitectureSpec | None:
    """The ``explaind_spec`` attribute that ``explaind.models.build_model`` sets, as a manifest spec."""
    spec = getattr(model, "explaind_spec", None)
    if not isinstance(spec, dict) or "name" not in spec:
        return None
    config = spec.get("config") or {}
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return ArchitectureSpec(name=str(spec["name"]), config=dict(config), seed=spec.get("seed"))


def split_model_tensors(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, Tensor]]:
    """Trainable parameters (``requires_grad``) and constants (frozen parameters + buffers) by name."""
    trainable: dict[str, nn.Parameter] = {}
    constants: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable[name] = p
        else:
            constants[name] = p.detach()
    for name, b in model.named_buffers():
        constants[name] = b.detach()
    return trainable, constants


class TrainData:
    """Uniform access to training data given as ``(X, y)`` or a ``torch.utils.data.Dataset``.

    Parameters
    ----------
    data : tuple of (X, y) or Dataset
        Inputs ``X`` — a tensor of shape ``(n, ...)``, or a tuple or mapping of such tensors (the
        model's positional or keyword arguments, e.g. ``{"input_ids": ..., "attention_mask": ...}``)
        — and targets ``y`` of shape ``(n, ...)``; or a map-style dataset whose items are ``(x, y)``
        pairs (``x`` a tensor).
    """

    def __init__(self, data: Any):
        self._x: Tensor | Inputs | None = None
        self._y: Tensor | None = None
        self._dataset: Any = None
        #: rows hashed -> DataFingerprint, filled by ``explaind.trajectory.fingerprint.data_fingerprint``
        self.fingerprints: dict[int, Any] = {}
        #: ``(id, Tensor._version)`` of X's and y's tensors when given (:meth:`get` refuses in-place edits after)
        self._versions: tuple[int, ...] | None = None
        if isinstance(data, TrainData):
            self._x, self._y, self._dataset = data._x, data._y, data._dataset
            self.fingerprints, self._versions = data.fingerprints, data._versions
            return
        if (isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[1], Tensor)
                and isinstance(data[0], Tensor | Inputs | Mapping | tuple)):
            x, y = as_inputs(data[0]), data[1]
            if x.shape[0] != y.shape[0]:
                raise ConfigError(
                    f"train_data: X has {x.shape[0]} rows but y has {y.shape[0]}. Pass (X, y) with the same "
                    f"number of samples along the first dimension."
                )
            self._x, self._y = x, y
            self._versions = self._versions_now()
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, Tensor | str):
            self._dataset = data
        else:
            raise ConfigError(
                f"train_data of type {type(data).__name__} is not supported. Pass a tuple (X, y) — X a tensor or a "
                f"tuple/mapping of tensors — or a map-style torch.utils.data.Dataset returning (x, y) pairs."
            )

    @property
    def is_dataset(self) -> bool:
        """Whether the data is a ``Dataset`` object (items fetched one by one), not tensors."""
        return self._x is None

    def __len__(self) -> int:
        if self._x is not None:
            return int(self._x.shape[0])
        return len(self._dataset)

    def get(self, indices: Tensor | Sequence[int]) -> tuple[Tensor | Inputs, Tensor]:
        """Inputs and targets at ``indices`` (shape ``(n,)``, int64)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self._x is not None:
            self._refuse_edits()
            idx = idx.to(self._x.device)
            return self._x[idx], self._y[idx]
        xs, ys = [], []
        for i in idx.tolist():
            item = self._dataset[i]
            if not (isinstance(item, tuple | list) and len(item) >= 2):
                raise TrajectoryError(
                    f"train_data[{i}] returned {type(item).__name__}; the dataset must return (x, y) pairs."
                )
            xs.append(torch.as_tensor(item[0]))
            ys.append(torch.as_tensor(item[1]))
        return torch.stack(xs), torch.stack(ys)

    def _versions_now(self) -> tuple[int, ...]:
        """``(id, version)`` of X's tensors and y (a copy of this object holds other tensors, counted anew); tensors
        made under ``torch.inference_mode()`` keep no version counter (-1): their in-place changes are not seen."""
        x = self._x._tensors() if isinstance(self._x, Inputs) else [self._x]
        return tuple(v for t in [*x, self._y] for v in (id(t), -1 if t.is_inference() else t._version))

    def follow(self) -> None:
        """Take X's and y's versions anew: edits made before now are the data (``with rec:`` calls it, before the
        store's data fingerprint and ``data.safetensors`` are taken); :meth:`get` refuses edits made after."""
        if self._x is not None and self._versions != self._versions_now():
            self._versions, self.fingerprints = self._versions_now(), {}

    def _refuse_edits(self) -> None:
        """Refuse X or y changed in place since they were given: steps taken before saw other rows."""
        versions = self._versions_now()
        if self._versions is None or versions[::2] != self._versions[::2]:  # copied (pickled, deep-copied)
            self._versions = versions
        elif versions != self._versions:
            what = "y" if versions[-1] != self._versions[-1] else "X"
            raise TrajectoryError(
                f"train_data: {what} was changed in place after it was given to explaind (e.g. labels "
                f"overwritten by self-training or pseudo-labelling, inputs normalised in place). explaind holds "
                f"train_data as given and recomputes every step's gradients from it, so the steps taken before the "
                f"change would be explained with rows they never saw. Fix: leave X and y unchanged while recording "
                f"and explaining; for relabelled samples, append them as new rows (torch.cat) before recording and "
                f"log the rows each step used; for targets that follow the model being trained (pseudo-labels, a "
                f"mean teacher's soft labels), return what they come from as output columns (the weak view's "
                f"logits, a teacher held as buffers the training forward moves) and compute them, detached, in the "
                f"loss callable.")

    def tensors(self) -> tuple[Tensor | Inputs, Tensor]:
        """All data as ``(X, y)`` (a dataset is materialised item by item)."""
        if self._x is not None:
            return self._x, self._y
        return self.get(torch.arange(len(self)))

    def flat(self) -> dict[str, Tensor]:
        """All data as named tensors for storage: ``X`` (or ``X.<key>`` / ``X.<position>``) and ``y``."""
        x, y = self.tensors()
        if isinstance(x, Inputs):
            items = x.data.items() if isinstance(x.data, dict) else enumerate(x.data)
            out = {f"X.{k}": v for k, v in items if isinstance(v, Tensor)}
            if len(out) != len(x.data):
                raise ConfigError("store_data=True stores tensors only; this train_data has non-tensor entries. "
                                  "Pass store_data=False and give train_data to Trajectory.load.")
            out["X.__kind__"] = torch.tensor([1 if isinstance(x.data, dict) else 0])
            return {**out, "y": y}
        return {"X": x, "y": y}

    @classmethod
    def from_flat(cls, tensors: Mapping[str, Tensor]) -> TrainData:
        """Inverse of :meth:`flat`."""
        if "X" in tensors:
            return cls((tensors["X"], tensors["y"]))
        keys = sorted(k[2:] for k in tensors if k.startswith("X.") and k != "X.__kind__")
        if int(tensors["X.__kind__"][0]) == 1:
            return cls((Inputs({k: tensors[f"X.{k}"] for k in keys}), tensors["y"]))
        return cls((Inputs(tuple(tensors[f"X.{k}"] for k in sorted(keys, key=int))), tensors["y"]))


def validate_indices(indices: Any, n_train: int | None) -> Tensor:
    """``rec.log_batch`` indices as a CPU int64 tensor of shape ``(n,)``, checked against ``0..n_train-1``."""
    try:
        idx = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TrajectoryError(
            f"log_batch: indices of type {type(indices).__name__} cannot be read as integers ({exc}). Pass a 1-D "
            f"int64 tensor of dataset positions."
        ) from None
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise TrajectoryError(
            f"log_batch: indices must be integer dataset positions, got dtype {idx.dtype}. Pass a 1-D int64 "
            f"tensor (e.g. torch.arange(...) or the sampler's indices), not a mask or float values."
        )
    if idx.dim() == 1 and idx.shape[0] == 0:
        raise TrajectoryError(
            "log_batch: got 0 indices (a batch of 0 samples, e.g. a filter that kept none). A step is split over the "
            "samples of its batch and one over none has no sample to credit, while optimizer.step() would still "
            "move the parameters by momentum or weight decay. Fix: skip such a batch as a whole, before its forward "
            "(`if len(idx) == 0: continue`), so that no optimizer.step() is taken for it."
        )
    if idx.dim() != 1:
        raise TrajectoryError(f"log_batch: indices must be a non-empty 1-D tensor, got shape {tuple(idx.shape)}.")
    idx = idx.detach().to("cpu", torch.long)
    lo, hi = torch.aminmax(idx)
    lo, hi = int(lo), int(hi)
    if lo < 0 or (n_train is not None and hi >= n_train):
        bad = lo if lo < 0 else hi
        allowed = f"0..{n_train - 1}" if n_train is not None else "non-negative"
        raise TrajectoryError(
            f"log_batch: index {bad} is out of range for train_data of {n_train} samples (allowed: {allowed}). Log "
            f"the dataset positions of the batch."
            + (" A negative index counts from the end in torch (X[-1] is the last row), not here. Fix: log "
               "idx % len(train_data), the same rows." if lo < 0 and n_train is not None else "")
        )
    return idx


def validate_weights(weights: Any, idx: Tensor, dtype: torch.dtype, loss: LossRecord | None = None,
                     data: TrainData | None = None) -> Tensor:
    """Sample weights of shape ``idx.shape`` in ``dtype`` on the CPU (default: :func:`default_weights`)."""
    if loss is not None and data is not None:
        refuse_ignored_labels(loss, data, idx, weights)
    if weights is None:
        if loss is not None:
            return default_weights(loss, data, idx, dtype)
        return torch.full((idx.shape[0],), 1.0 / idx.shape[0], dtype=dtype)
    w = torch.as_tensor(weights).detach().to("cpu")
    if not w.is_floating_point() or w.shape != idx.shape:
        raise TrajectoryError(
            f"log_batch: weights must be a float tensor of shape {tuple(idx.shape)} (one per index), got "
            f"dtype {w.dtype} and shape {tuple(w.shape)}."
        )
    if not bool(torch.isfinite(w).all()):
        raise TrajectoryError("log_batch: weights contain NaN or inf; pass finite sample weights.")
    return w.to(dtype)


def refuse_ignored_labels(loss: LossRecord, data: TrainData, idx: Tensor, weights: Any) -> None:
    """Refuse logged samples whose class label is ``ignore_index`` (-100) under a per-sample loss.

    ``F.cross_entropy(out, y)`` skips samples labelled ``-100`` and averages over the others, so the
    batch loss is :math:`\\sum_{k: y_k \\ne -100} \\ell_k / n_{counted}` (docs/maths.md §1): those samples must
    not be logged, or must be logged with weight 0 (then the loss callable must give them a finite value).
    A per-sample loss of one ignored sample is undefined (a gather at -100, or a mean over no counted
    label), so a run that logs one with a weight is refused here, before anything is recorded. Token
    losses (records with ``counts``) count their labels themselves and are not checked; nor is
    data given as a ``Dataset`` (its items are read only where they are needed).

    Raises
    ------
    TrajectoryError
        Naming the ignored positions and the fix.
    """
    if loss.counts is not None or data.is_dataset:
        return
    labels = data._y  # the targets only: slicing the inputs too would copy a batch at every log_batch
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dim() != 1:
        return
    targets = labels[idx.to(labels.device)]
    ignored = (targets == IGNORE_INDEX).cpu()
    if weights is not None:
        w = torch.as_tensor(weights).detach().to("cpu").reshape(-1)
        if w.shape != ignored.shape:
            return  # validate_weights names the wrong shape
        ignored &= w != 0
    if not bool(ignored.any()):
        return
    where = idx.cpu()[ignored].tolist()
    raise TrajectoryError(
        f"log_batch: the samples {where[:8]}{' ...' if len(where) > 8 else ''} are logged with label "
        f"{IGNORE_INDEX} (ignore_index) under loss {loss.name!r}, which gives each logged sample its own loss term: "
        f"an ignored sample has none, and F.cross_entropy's mean runs over the counted samples only. Fix: log "
        f"only the counted samples, keep = y[idx] != {IGNORE_INDEX}; rec.log_batch(idx[keep]) (their mean is "
        f"exactly the loop's loss), or pass weights that are 0 at the ignored samples with a loss callable "
        f"that gives them a finite value."
    )


def default_weights(loss: LossRecord, data: TrainData | None, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """``rec.log_batch`` weights when none are given: ``1/n``, or the token shares of a loss with ``counts``.

    A loss with ``counts`` (e.g. ``causal_lm``) averages over the batch's counted tokens, so
    :math:`w_k = n_k / \\sum_j n_j` needs the targets of the batch (docs/maths.md §1).

    Raises
    ------
    TrajectoryError
        For a loss with ``counts`` when there is no ``train_data`` to count from.
    """
    if loss.counts is None:
        return torch.full((idx.shape[0],), 1.0 / idx.shape[0], dtype=dtype)
    if data is None:
        raise TrajectoryError(
            f"log_batch: loss {loss.name!r} averages over the counted tokens of the batch, so each sample's weight "
            f"is its share of them; without train_data the recorder cannot count them. Pass train_data=(X, y) to "
            f"the recorder, or weights=n_k / n_k.sum() to log_batch (n_k: the counted tokens of sample k)."
        )
    from ..losses import batch_weights

    return batch_weights(loss, data.get(idx)[1], dtype)


def warn_user(logger: logging.Logger, message: str) -> None:
    """Send ``message`` both to ``logger`` (level WARNING) and as an :class:`~explaind.exceptions.ExplaindWarning`.

    The warning names the user's line that led to it (:func:`~explaind.exceptions.warn_at_caller`), e.g. the
    ``optimizer.step()`` whose hook ran the check.
    """
    logger.warning("%s", message)
    warn_at_caller(message)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in evaluation mode inside the block; each module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
