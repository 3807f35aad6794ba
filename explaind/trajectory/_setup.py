"""Setting up a recording: the recorder's arguments checked, the store directory prepared, and the error a
refused or failing set-up raises.

:func:`framework_originals` finds the torch model and optimizer inside the wrappers of Lightning Fabric and
Hugging Face accelerate: ``fabric.setup(model, optimizer)`` returns a ``_FabricModule`` and a ``Fabric<Optimizer>``
(a class made on the fly that subclasses the wrapped optimizer's class), ``accelerator.prepare(...)`` an
``AcceleratedOptimizer`` (and, in one process, the model itself). Both wrappers step the optimizer they wrap,
whose hooks the recorder uses, and the adapters are matched by the exact optimizer class, so the recorder records
the wrapped objects. The wrappers are recognised by their class names and modules (neither framework is imported
here); a ``_FabricModule`` of ``Fabric(precision="bf16-true")`` or ``"16-true"`` (half-precision parameters) is
refused, as the Lightning callback refuses those precisions. The raw torch module of such a run, given to the
recorder instead, fails in the first gradient check, where :func:`refuse_dtype_mismatch` names the cause.

:func:`refuse_invalid_arguments` refuses a model, optimizer, loss or option the recorder cannot record
(``ConfigError``) before any hook is attached or file written.

:func:`prepare_directory` decides what a recorder may do with ``store=``: resume an existing store
(``resume=True``), replace it (``overwrite=True``, only a valid store and only its files), reuse an
empty directory or one an interrupted set-up left (see ``_layout``), and refuse anything else. A
directory that cannot be written (read-only, no permission, no space) fails with
:func:`setup_error`, a :class:`~explaind.exceptions.TrajectoryError` naming the path, the system's
error and the fix, instead of a bare ``OSError``; nothing was recorded then.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..exceptions import ConfigError, TrajectoryError
from ..models import refuse_renormalising_embeddings, refuse_script_modules, refuse_sparse_embeddings
from ..unsupported import refuse_unreplayable
from ..unsupported_layers import refuse_unrecordable_layers
from ._index import recorded_files
from ._io import store_root
from ._layout import JOURNAL, SETUP, remove_store, setup_leftover, unmarked_setup
from ._random import loss_generators
from .lock import LOCK, busy_message, live_writer
from .store import is_store, read_manifest

__all__ = ["framework_originals", "prepare_directory", "refuse_invalid_arguments", "setup_error", "store_root"]

logger = logging.getLogger("explaind.trajectory.store")


def setup_error(root: Path, exc: OSError) -> TrajectoryError:
    """The error of a store directory the recorder could not set up (``exc``: the system's error)."""
    return TrajectoryError(
        f"Cannot set up the trajectory store at {str(root)!r}: {type(exc).__name__}: {exc}. Nothing was recorded "
        f"and nothing in the directory was deleted. Fix: pass a store path in a writable directory with free space "
        f"(check its permissions and that the file system is not mounted read-only), or store=None to record in "
        f"memory."
    )


def refuse_non_bool(name: str, value: Any, does: str) -> None:
    """Raise :class:`ConfigError` when the recorder's on/off argument ``name`` is not a bool: a string such as
    ``"false"`` counts as true in Python, and ``name=True`` ``does`` (e.g. "deletes the stored run")."""
    if not isinstance(value, bool | np.bool_):
        raise ConfigError(f"{name}={value!r} is a {type(value).__name__}; allowed: True or False (a value such as "
                          f"'false' would count as true, and {name}=True {does}). Nothing was written. Fix: pass "
                          f"{name}=True or {name}=False.")


def prepare_directory(root: Path, *, overwrite: bool, resume: bool) -> bool:
    """Make ``root`` ready for recording; returns ``True`` when an existing store is resumed.

    Raises
    ------
    ConfigError
        When ``overwrite`` or ``resume`` is not a bool: a string such as ``"false"`` would count as true, and
        ``overwrite`` deletes the stored run (docs/recording.md, "Strangers' files, round 9").
    TrajectoryError
        When the directory is refused (see :func:`_prepare`) or cannot be written (:func:`setup_error`).
    """
    refuse_non_bool("overwrite", overwrite, "deletes the stored run")
    refuse_non_bool("resume", resume, "appends to the stored run")
    _refuse_long_path(root)
    if os.path.islink(root) and not os.path.exists(root):
        raise TrajectoryError(
            f"store={str(root)!r} is a symbolic link to {os.readlink(root)!r}, which does not exist or leads back to "
            f"itself (a loop); a recording does not create a directory behind a link. Nothing was recorded. Fix: "
            f"create the directory the link names, or pass the path of a directory (or of a new one) instead.")
    try:
        return _prepare(root, overwrite=overwrite, resume=resume)
    except OSError as exc:
        raise setup_error(root, exc) from exc


#: the longest name a writer creates inside a store: a checkpoint state's temporary file (pid and thread id at most
#: 10 and 20 digits; ``_io.temporary_path``)
LONGEST_FILE = "/optimizer/checkpoint-000000.safetensors.tmp-" + "9" * 10 + "-" + "9" * 20


def _refuse_long_path(root: Path) -> None:
    """Refuse a store path whose files would pass the system's path length limit, before anything is written.

    Each file of a store is written under a temporary name beside it; on a path close to ``PATH_MAX`` the
    start files would fit and a later step's state file fail mid-run, where resuming fails again.
    """
    full = os.fsencode(os.path.abspath(root))
    base = Path(os.path.abspath(root))
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        limit = os.pathconf(base, "PC_PATH_MAX") - 1  # the limit counts the terminating NUL
    except (OSError, ValueError):
        return  # no limit known: the system's own error names it
    longest = len(full) + len(LONGEST_FILE)
    if longest > limit:
        raise TrajectoryError(
            f"store={str(root)!r} is {len(full)} bytes long, and the files a recording writes in it would reach "
            f"{longest} bytes (a temporary name such as 'optimizer/checkpoint-000123.safetensors.tmp-<pid>-<thread>'"
            f"), more than the {limit} this file system allows for a path (PATH_MAX). Nothing was recorded. Allowed: a "
            f"store path of at most {limit - len(LONGEST_FILE)} bytes. Fix: choose a shorter store path (a symbolic "
            f"link to the directory is followed).")


def _prepare(root: Path, *, overwrite: bool, resume: bool) -> bool:
    """What :func:`prepare_directory` does, raising the system's ``OSError``.

    An existing store is resumed with ``resume=True``, replaced with ``overwrite=True`` (only a
    valid explaind store, and only its own files are deleted) and otherwise refused. A directory
    that an interrupted set-up or replacement left (the set-up marker, no manifest; see
    ``_layout``) holds no store: its explaind files are deleted and recording starts anew (also
    with ``resume=True``); other files in it need ``overwrite=True`` and stay. Any other non-empty
    directory that is not a store is refused, and nothing is done while another writer holds the
    store's lock.
    """
    if root.exists() and not root.is_dir():
        raise TrajectoryError(f"store={str(root)!r} is a file; pass a directory path for the trajectory store.")
    holder = live_writer(root) if root.is_dir() else None
    if holder is not None:
        raise TrajectoryError(busy_message(root, holder))
    if is_store(root):
        if resume or overwrite:
            _refuse_unwritable(root, "resume=True" if resume else "overwrite=True")
        if resume:
            return True
        if overwrite:
            try:
                manifest = read_manifest(root)
            except TrajectoryError as exc:
                raise TrajectoryError(
                    f"overwrite=True deletes only a valid explaind trajectory store, and {str(root)!r} is not one "
                    f"({exc}). Nothing was deleted; choose another store path or remove the directory yourself."
                ) from None
            remove_store(root, manifest)
        else:
            raise TrajectoryError(
                f"A trajectory is already stored at {str(root)!r}. Pass overwrite=True to replace it, resume=True to "
                f"continue it, or choose another store path."
            )
    elif root.is_dir():
        return _reuse_directory(root, overwrite=overwrite, resume=resume)
    elif resume:
        raise TrajectoryError(
            f"resume=True but no trajectory is stored at {str(root)!r}. Pass resume=False to start a new recording."
        )
    root.mkdir(parents=True, exist_ok=True)
    return False


def _refuse_unwritable(root: Path, option: str) -> None:
    """Refuse ``option`` on a stored run that this process cannot write (a read-only mount, no write permission)
    before anything is done: the run stays readable, and the fix is to make it writable or to resume a copy."""
    journal = root / JOURNAL
    if os.access(root, os.W_OK) and (not journal.exists() or os.access(journal, os.W_OK)):
        return
    try:
        read_only = bool(os.statvfs(root).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "it is on a file system mounted read-only" if read_only else "this user has no write permission there"
    raise TrajectoryError(
        f"{option} needs to write into the trajectory store {str(root)!r}, and {why}. Nothing was changed; the stored "
        f"run can still be read (Trajectory.load, verify(), explaind replicate). Fix: make the store writable "
        f"(mount it read-write, or give this user write permission), or copy it to a writable place (cp -a) and "
        f"{'resume' if option == 'resume=True' else 'overwrite'} the copy.")


def _reuse_directory(root: Path, *, overwrite: bool, resume: bool) -> bool:
    """Prepare an existing directory without a manifest: empty, or left by an interrupted set-up (see ``_layout``)."""
    marked, foreign = setup_leftover(root)
    unmarked = not marked and unmarked_setup(root)  # a copy taken while a store was set up: nothing recorded
    if unmarked and not overwrite:
        raise TrajectoryError(
            f"store={str(root)!r} holds the start files and an empty journal of a recording that recorded no step, "
            f"without its manifest.json or its set-up marker {SETUP}: a copy taken while that recording set its store "
            f"up (or a sync that skipped the marker), or an interrupted set-up. Nothing was recorded there; nothing "
            f"was changed. Pass overwrite=True to delete those files and record anew, or choose another store path.")
    marked = marked or unmarked
    if not marked:
        foreign = sorted(p.name for p in root.iterdir() if not p.name.startswith(LOCK))
    listed = ", ".join(repr(f) for f in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    recorded = "" if marked else recorded_files(root)
    if recorded:
        raise TrajectoryError(
            f"store={str(root)!r} holds {recorded} of a recording whose manifest.json is missing (deleted or lost), "
            f"so it can be neither resumed nor replaced safely; nothing was changed. Fix: restore manifest.json from a "
            f"copy of the store to read or resume it, or choose another store path."
        )
    if foreign and not marked:
        raise TrajectoryError(
            f"store={str(root)!r} is a non-empty directory that is not an explaind trajectory store ({listed}); "
            f"refusing to write into it. Choose a new or empty directory."
        )
    if foreign and not overwrite:
        raise TrajectoryError(
            f"store={str(root)!r} holds the files of a recording interrupted while its store was set up or replaced "
            f"(no store is left there) and files that are not explaind's ({listed}). Pass overwrite=True to delete "
            f"the interrupted recording's files (the others stay), or choose another store path."
        )
    started = marked or any(p.name.startswith(LOCK) for p in root.iterdir())
    if resume and not started:
        raise TrajectoryError(
            f"resume=True but no trajectory is stored at {str(root)!r}. Pass resume=False to start a new recording."
        )
    if marked:
        logger.warning("%s holds the files of a recording interrupted while its store was set up or replaced; "
                       "no store is left there, so they are deleted and recording starts anew.", root)
        remove_store(root, None)
    elif resume:
        logger.warning("resume=True: the recording at %s was interrupted before anything was recorded; starting "
                       "anew.", root)
    return False


def refuse_invalid_arguments(model: Any, optimizer: Any, *, loss: Any, audit: Any, grad_scaler: Any,
                             switches: dict[str, Any] | None = None) -> None:
    """Refuse what a :class:`~explaind.trajectory.recorder.TrajectoryRecorder` cannot record, before anything starts.

    Raises
    ------
    ConfigError
        ``model`` not an ``nn.Module``, ``optimizer`` not a ``torch.optim.Optimizer``, ``audit`` not one of
        ``'auto'``, ``True``, ``False``, a value of ``switches`` (``{"fsync": fsync, ...}``, the recorder's
        on/off arguments) not a bool, ``grad_scaler`` not a ``torch.amp.GradScaler``, embeddings that
        renormalise their weights in the forward (``max_norm``) or have sparse gradients, complex parameters,
        ``nn.RReLU`` (:mod:`explaind.unsupported`), lazy modules before their first forward and
        ``nn.CrossMapLRN2d`` (:mod:`explaind.unsupported_layers`), or a loss callable
        holding its own ``torch.Generator`` (its draws cannot be split over samples); each message names the
        value, what is allowed and the fix.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}. The recorder observes "
            f"optimizer.step(), so a loop that updates the parameters by hand (p -= lr * p.grad under no_grad) "
            f"records nothing. Fix: torch.optim.SGD(model.parameters(), lr=lr) makes the same update; call "
            f"optimizer.step() where the loop wrote it (docs/recording.md lists the optimizers with adapters).")
    refuse_unrecordable_layers(model, "TrajectoryRecorder")
    if not (audit is True or audit is False or audit == "auto"):
        raise ConfigError(f"audit={audit!r} is not allowed. Choose one of: 'auto', True, False.")
    for name, value in (switches or {}).items():
        refuse_non_bool(name, value, f"switches {name} on")
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise ConfigError(
            f"grad_scaler must be a torch.amp.GradScaler (the one the loop calls scaler.step with), got "
            f"{type(grad_scaler).__name__}."
        )
    refuse_renormalising_embeddings(model, "TrajectoryRecorder")
    refuse_sparse_embeddings(model, "TrajectoryRecorder")
    refuse_script_modules(model, "TrajectoryRecorder")
    refuse_unreplayable(model, "TrajectoryRecorder")
    drawn = loss_generators(loss)
    if drawn:
        raise ConfigError(
            f"loss: the loss callable holds the torch.Generator(s) {drawn}. explaind applies the loss to one "
            f"sample at a time to split the gradient over samples, so random draws made by the loss cannot be "
            f"split exactly. Allowed: a loss that draws no random numbers. Fix: draw the randomness in the "
            f"model's forward, from a generator a module holds (found, captured and replayed), or drop it.")


#: (module, class name) of the wrappers whose wrapped object is the attribute named: optimizers, then models.
_OPTIMIZER_WRAPPERS = {("lightning.fabric.wrappers", "_FabricOptimizer"): "optimizer",
                       ("lightning_fabric.wrappers", "_FabricOptimizer"): "optimizer",
                       ("accelerate.optimizer", "AcceleratedOptimizer"): "optimizer"}
_MODEL_WRAPPERS = {("lightning.fabric.wrappers", "_FabricModule"): "module",
                   ("lightning_fabric.wrappers", "_FabricModule"): "module"}


def _wrapped(obj: Any, wrappers: dict[tuple[str, str], str]) -> Any:
    """The object inside ``obj`` when one of its classes is a wrapper of ``wrappers``; ``obj`` otherwise."""
    for cls in type(obj).__mro__:
        attribute = wrappers.get((cls.__module__, cls.__name__))
        if attribute is not None:
            return _wrapped(getattr(obj, attribute), wrappers)
    return obj


def framework_originals(model: Any, optimizer: Any) -> tuple[Any, Any]:
    """``(model, optimizer)`` with Fabric's and accelerate's wrappers replaced by the objects they wrap.

    Parameters
    ----------
    model : nn.Module
        The model, or the ``_FabricModule`` that ``fabric.setup`` returned.
    optimizer : torch.optim.Optimizer
        The optimizer, or the wrapper that ``fabric.setup`` or ``accelerator.prepare`` returned.

    Returns
    -------
    tuple
        The torch model and optimizer the loop trains through the wrappers.
    """
    refuse_half_precision(model)
    return _wrapped(model, _MODEL_WRAPPERS), _wrapped(optimizer, _OPTIMIZER_WRAPPERS)


def _float_dtypes(x: Any) -> set[torch.dtype]:
    """The floating dtypes of the tensors in ``x`` (a tensor, or a mapping, tuple or list of them)."""
    if isinstance(x, torch.Tensor):
        return {x.dtype} if x.is_floating_point() else set()
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
    return set().union(*(_float_dtypes(v) for v in values))


def refuse_dtype_mismatch(exc: RuntimeError, params: dict[str, torch.Tensor], inputs: Any, step: int) -> None:
    """Raise a :class:`ConfigError` naming the cause when the gradient check of ``step`` failed with torch's dtype
    error because the parameters are held in half precision and the recorder's ``train_data`` is not.

    That is the raw module of ``Fabric(precision="bf16-true")`` or ``"16-true"`` given to the recorder: Fabric's
    wrapper converts the loop's inputs, the recorder's ``train_data`` stays as given. Anything else returns.
    """
    half = {p.dtype for p in params.values()} & {torch.bfloat16, torch.float16}
    given = _float_dtypes(inputs) - half
    text = str(exc)
    if not half or not given or not ("dtype" in text or "scalar type" in text):
        return
    names = lambda ds: ", ".join(sorted(str(d).removeprefix("torch.") for d in ds))  # noqa: E731
    raise ConfigError(
        f"Step {step}'s gradient check: the model's parameters are {names(half)} but the recorder's train_data holds "
        f"{names(given)} inputs, and the model fails on them (torch: {text.splitlines()[0]}). This is the torch "
        f"module of Fabric(precision='bf16-true') or '16-true' given to the recorder: Fabric's wrapper converts the "
        f"loop's inputs, not the recorder's train_data, and parameters held in half precision round every update "
        f"to 8 or 11 significant bits, which no decomposition of the steps over samples reproduces. Allowed: "
        f"'64-true' (with torch's default dtype float64), '32-true', 'bf16-mixed' (autocast with float32 weights). "
        f"Fix: Fabric(precision='bf16-mixed'), or '32-true' with the model built in float64 for float64 exactness."
    ) from exc


def refuse_half_precision(model: Any) -> None:
    """Refuse a Fabric module whose parameters Fabric keeps in bfloat16 or float16 (``precision="bf16-true"``).

    Raises
    ------
    ConfigError
        Naming the precision, the allowed ones and the fix. Before, the recorder's first gradient check failed with
        torch's dtype error (the loop's inputs are converted by Fabric, the recorder's ``train_data`` not).
    """
    if _wrapped(model, _MODEL_WRAPPERS) is model:
        return
    precision = str(getattr(getattr(getattr(model, "_strategy", None), "precision", None), "precision", ""))
    if precision in ("bf16-true", "16-true"):
        raise ConfigError(
            f"Fabric(precision={precision!r}) holds the parameters themselves in "
            f"{'bfloat16' if precision.startswith('bf') else 'float16'}: every update is rounded to 8 or 11 "
            f"significant bits, which no decomposition of the steps over samples reproduces (and Fabric converts the "
            f"loop's inputs, not the recorder's train_data). Allowed: '64-true' (with torch's default dtype float64), "
            f"'32-true', 'bf16-mixed' (autocast with float32 weights, recorded with the autocast tolerance). Fix: "
            f"Fabric(precision='bf16-mixed'), or '32-true' with the model built in float64 for float64 exactness."
        )
