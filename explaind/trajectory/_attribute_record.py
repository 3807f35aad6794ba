r"""The attribute fingerprint a recording keeps, compared when the model meets the recording again.

docs/recording.md, "Python attributes changed between steps", has the user's side.

The engine replays every recorded step with the model as it is when explaining (docs/maths.md §1: :math:`g` and
:math:`\ell_k` are evaluated at the recorded :math:`\theta_s`, :math:`\beta_s`, with everything else the forward
reads taken from the model object). A plain attribute edited after ``with rec:`` ended (a temperature, a
``Dropout.p``, a submodule swapped, a config field, a plain tensor) therefore changes every step's replay. The
recorder keeps the fingerprint of the last step's forward (:class:`~explaind.trajectory._attributes.Snapshot`) in a
process-independent form, :func:`record_of`: one text per entry name (``path.key``; a config object's fields as
``path.key.field``), values written exactly (``repr`` of plain values, floats round-trip; functions and classes by
their qualified names; children by class; hooks by count and names; plain tensors by shape, dtype and the value
checksums of :mod:`~explaind.trajectory._tensor_watch`; the submodules' modes are left out, see :func:`check_model`).

It is kept on the in-memory trajectory and, for a store, in :data:`FILE` (JSON, written atomically when a clean
recording ends). :func:`check_model` compares it with the model given to ``Trajectory.load(path, model)`` and to
the estimators' ``fit`` and warns (:class:`~explaind.exceptions.ExplaindWarning`) naming every entry with its
recorded and current value and the fix; a store without the file (recorded before it existed, or a recording that
stopped on an error) is not compared (logged at INFO).

Since round 8 (docs/recording.md, "Strangers' files, round 8") the file holds the run's identity (``run_id``, the
manifest's; ``null`` for a store written before schema 3) and the XXH3-128 checksum of everything else
(``checksum``, over the JSON with sorted keys), and is read as a regular file of the store (never through a
symbolic link, never blocking on a FIFO, at most :data:`~explaind.trajectory._index.MAX_INDEX_BYTES`). A file that
cannot be read, is not what explaind writes, fails its checksum or names another run is not used, with a warning
naming the file, the problem and the fix (the check is then skipped; the recording itself does not depend on the
file). A file without the two keys (written before round 8) is read as before.

The values of the parameters and buffers are no attributes: the engine takes them from the recording
(:math:`\theta_s`, :math:`\beta_s`). A recorder also keeps, on the trajectory it returns, :func:`final_state`: a
checksum of every parameter and buffer of its model object as ``with rec:`` left it. :func:`check_final_state`
compares it at every estimator's ``fit`` when the estimator replays that same object, and warns naming what changed
since (training continued outside the recorder, ``torch.optim.swa_utils.update_bn``, ``load_state_dict``) and now
differs from the trajectory's last state (a store another recorder resumed ends later): the replica and the scores
explain the recorded last state, no longer the model the user holds. A model given to
``Trajectory.load`` is not compared (a fresh instance holds other values by design).
"""

from __future__ import annotations

import enum
import glob
import hashlib
import json
import logging
import types
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from ..exceptions import TrajectoryError
from ._attributes import HOOK_KEYS, Snapshot, _Ignored, snapshot
from ._checksum import checksum as file_checksum
from ._common import ModelHook, warn_user
from ._index import MAX_INDEX_BYTES, strict_json
from ._io import read_confined
from ._layout import ATTRIBUTES
from ._tensor_watch import block_sums, checksum, is_plain_object

__all__ = ["FILE", "record_of", "save_record", "check_model", "keep_record", "final_state", "check_final_state"]

logger = logging.getLogger("explaind.trajectory")

#: The store's file holding the fingerprint (``{"format": 2, "ignore": [...], "entries": {name: text}}``).
FILE = ATTRIBUTES
#: Format 2 digests a plain tensor's checksum (row and column sums); format 1 (before) its 16 block sums, which
#: :func:`check_model` still compares (:func:`_digest`).
_FORMAT = 2
_FORMATS = (1, 2)
_DEPTH = 4


def _name(value: Any) -> str:
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__qualname__)}"


def _digest(value: torch.Tensor, legacy: bool) -> str:
    """A digest of the value checksum of a plain tensor (``legacy``: of its block sums, as format 1 kept it)."""
    sums = block_sums(value) if legacy else checksum(value)
    if sums is None:
        return "unhashed"
    return hashlib.blake2b(repr(sums).encode(), digest_size=6).hexdigest()


def _text(value: Any, depth: int = 0, legacy: bool = False) -> str:
    """An exact, process-independent text of a fingerprinted value (``legacy``: tensors digested as format 1)."""
    if value is None or isinstance(value, bool | int | float | complex | str | bytes) and \
            not isinstance(value, enum.Enum):
        return repr(value)
    if isinstance(value, torch.dtype | torch.device | torch.layout | torch.memory_format | enum.Enum):
        return repr(value)
    if isinstance(value, type):
        return f"<class {_name(value)}>"
    if isinstance(value, types.MethodType):
        return f"<method {_name(value.__func__)} of {_name(type(value.__self__))}>"
    if callable(value) and isinstance(value, types.FunctionType | types.BuiltinFunctionType):
        return f"<function {_name(value)}>"
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} {_digest(value, legacy)}>"
    if depth < _DEPTH and isinstance(value, list | tuple | set | frozenset | dict):
        if isinstance(value, dict):
            inner = ", ".join(f"{_text(k, depth + 1, legacy)}: {_text(v, depth + 1, legacy)}"
                              for k, v in value.items())
            return "{" + inner + "}"
        items = [_text(v, depth + 1, legacy) for v in value]
        if isinstance(value, set | frozenset):
            items.sort()
        return f"{type(value).__name__}[{', '.join(items)}]"
    if depth < _DEPTH and is_plain_object(value):
        fields = ', '.join(f'{k}={_text(v, depth + 1, legacy)}' for k, v in vars(value).items())
        return f"{type(value).__name__}({fields})"
    return f"<{type(value).__name__}>"


def record_of(snap: Snapshot, legacy: bool = False) -> dict[str, str]:
    """The process-independent form of ``snap`` (module docstring): ``{entry name: text}`` (``legacy``: plain tensors
    digested as a format-1 record kept them, to compare with one)."""
    out: dict[str, str] = {}
    for (path, key), value in snap.values.items():
        name = f"{path}.{key}" if path else key
        if key == "training":
            continue  # see check_model
        if key == "_modules":
            out[name] = "{" + ", ".join(f"{k}: {type(m).__qualname__}" for k, m in value.items()) + "}"
        elif key.endswith(("_with_kwargs", "_always_called")):
            continue  # flags of the hooks in the dictionaries above (explaind's own among them)
        elif key in HOOK_KEYS:
            hooks = value.values() if isinstance(value, dict) else ()
            out[name] = f"hooks[{', '.join(_name(h) for h in hooks if type(h) is not ModelHook)}]"
        elif is_plain_object(value):
            out.update({f"{name}.{k}": _text(v, 0, legacy) for k, v in vars(value).items()})
        else:
            out[name] = _text(value, 0, legacy)
    return out


def keep_record(snap: Snapshot | None, ignore: tuple[str, ...], unread: set[str]) -> dict[str, Any] | None:
    """The record a recording keeps (``None`` when the watch saw no step or was off): ``unread`` names the entries
    that changed during the recording and that its test forward found unread (a tensor the forward only writes, a
    counter): left out, as ``ignore`` patterns, so a later change of them is no alarm."""
    if snap is None:
        return None
    patterns = [*ignore, *sorted(glob.escape(n) for n in unread), *sorted(f"{glob.escape(n)}.*" for n in unread)]
    return {"format": _FORMAT, "ignore": patterns, "entries": record_of(snap)}


def _sealed(body: dict[str, Any]) -> str:
    """The checksum of a record's content (everything but ``checksum``, as JSON with sorted keys)."""
    return file_checksum(json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True).encode())


def save_record(root: Path, record: dict[str, Any] | None, *, fsync: bool = True, run_id: str | None = None) -> None:
    """Write ``record`` to the store's :data:`FILE`, bound to the run ``run_id`` and checksummed (or remove a
    stale one when there is none)."""
    path = Path(root) / FILE
    if record is None:
        path.unlink(missing_ok=True)
        return
    body = {**record, "run_id": run_id}
    atomic_write(path, json.dumps({**body, "checksum": _sealed(body)}, sort_keys=True), fsync=fsync)


def _problem(record: Any, run_id: str | None) -> str | None:
    """What is wrong with a record read from :data:`FILE` of the run ``run_id`` (``None``: nothing)."""
    if not (isinstance(record, dict) and record.get("format") in _FORMATS and isinstance(record.get("entries"), dict)
            and all(isinstance(v, str) for v in record["entries"].values()) and isinstance(record.get("ignore"), list)):
        return ("is not an attribute fingerprint explaind writes (allowed: an object with 'format' 1 or 2, "
                "'entries' of texts and 'ignore')")
    if "checksum" not in record and "run_id" not in record:
        return None  # written before round 8: read as before
    if record.get("checksum") != _sealed(record):
        return (f"does not match its checksum (it records {record.get('checksum')!r}, its content has "
                f"{_sealed(record)!r}): it was modified after the recording")
    if record.get("run_id") != run_id:
        return (f"belongs to the run {record.get('run_id')!r}, but the store's manifest names the run {run_id!r}: the "
                f"file (or the manifest) was replaced")
    return None


def _stored(traj: Any) -> dict[str, Any] | None:
    """The record of ``traj``: kept on it, or read from its store's :data:`FILE` (``None``: none, or not usable,
    with a warning naming why)."""
    record = getattr(traj, "attribute_record", None)
    if record is not None:
        return record
    root = getattr(traj, "root", None)
    if root is None:
        return None
    try:
        data = read_confined(Path(root), FILE, MAX_INDEX_BYTES, "The attribute fingerprint")
        record = strict_json(data)
    except FileNotFoundError:
        logger.info("The store %s keeps no attribute fingerprint (%s): changes to the model's plain attributes "
                    "after recording are not checked.", root, FILE)
        return None
    except (TrajectoryError, OSError, ValueError) as exc:
        problem: str | None = f"cannot be read ({exc})"
    else:
        manifest = getattr(traj, "manifest", None)
        problem = _problem(record, getattr(manifest, "run_id", None))
    if problem is None:
        return record
    warn_user(logger, f"The attribute fingerprint {FILE!r} of the store {str(root)!r} {problem}. Changes to the "
                      f"model's plain attributes since the recording are therefore not checked. Fix: restore "
                      f"{FILE} from a copy of the store, or delete it to silence this warning (it is read for this "
                      f"check only: the recorded steps do not depend on it).")
    return None


def check_model(traj: Any, model: nn.Module | None, who: str, same_layout: bool = False) -> None:
    """Warn when ``model``'s plain attributes, children, hooks, plain tensors or config fields differ from the
    recording's last step (submodules' modes are not compared: ``model.eval()`` after training puts a submodule
    that trained in another mode into the model's, and the engine sets the modes itself).

    Parameters
    ----------
    traj : Trajectory
        Holds the record (in memory, or in its store's :data:`FILE`).
    model : nn.Module or None
        The model the engine will replay the steps with (``None``: nothing is compared).
    who : str
        The caller named in the warning (``"Trajectory.load"``, ``"InfluenceEstimator.fit"``).
    same_layout : bool
        Compare only when ``model`` has the recorded modules (names): another model given to ``fidelity_report``
        (an ``AveragedModel`` wrapping a copy) is measured there, not compared here.
    """
    if model is None:
        return
    record = _stored(traj)
    if record is None:
        return
    ignore = tuple(p for p in record["ignore"] if isinstance(p, str))
    ignored = _Ignored(ignore) if ignore else None
    now = record_of(snapshot(model, ignored), legacy=record["format"] == 1)
    was: dict[str, str] = record["entries"]
    if same_layout and {k for k in was if k.endswith("._modules") or k == "_modules"} != \
            {k for k in now if k.endswith("._modules") or k == "_modules"}:
        return
    differ = [k for k in dict.fromkeys([*was, *now]) if was.get(k) != now.get(k)
              and not (ignored is not None and ignored(*k.rpartition(".")[::2]))]
    if not differ:
        return
    listed = "; ".join(f"{k}: {_short(was.get(k))} -> {_short(now.get(k))}" for k in differ[:8])
    more = f"; and {len(differ) - 8} more" if len(differ) > 8 else ""
    warn_user(logger, f"{who}: the model's state outside its parameters and buffers differs from the recording's last "
                      f"step: {listed}{more}. The engine replays every recorded step with the model as it is now, so "
                      f"if the forward reads these the replica and the scores are inexact (the residual share "
                      f"measures it). Fix: set them back to the recorded values before explaining (or pass the "
                      f"model as it was recorded); a deliberate change the forward does not read can be left out "
                      f"by recording with TrajectoryRecorder(ignore_attributes=[...]), or this warning silenced "
                      f"with warnings.filterwarnings('ignore', message='.*differs from the recording')."
                      f"{_cache_hint([k for k in differ if _filled_cache(was.get(k), now.get(k))])}")


def _filled_cache(was: str | None, now: str | None) -> bool:
    """Whether an entry was an empty container (or absent) when recorded and holds tensors now: a cache the forward
    fills in evaluation mode (LeViT's ``attention_bias_cache``)."""
    return was in (None, "<_Empty>") and now is not None and "<tensor " in now


def _cache_hint(names: list[str]) -> str:
    """The fix for caches a forward fills (``""`` without any): setting them back once is not enough."""
    if not names:
        return ""
    module, _, attr = names[0].rpartition(".")
    return (f" {names[0]}{' and ' + str(len(names) - 1) + ' more' if len(names) > 1 else ''} was empty when "
            f"recorded and holds tensors now: a cache the forward fills (in evaluation mode) and then reads instead "
            f"of the parameters. Emptying it once before explaining is not enough: the engine's first forward fills "
            f"it again from the parameters of that moment and every later step reads those. Empty it around every "
            f"forward, with hooks registered before recording (hooks are part of the recorded state), e.g. for each "
            f"module m holding it (here model.get_submodule({module!r})): "
            f"m.register_forward_pre_hook(lambda m, args: setattr(m, {attr!r}, {{}})) and "
            f"m.register_forward_hook(lambda m, args, out: setattr(m, {attr!r}, {{}})).")


def _short(text: str | None) -> str:
    if text is None:
        return "absent"
    return text if len(text) <= 120 else text[:117] + "..."


def _signature(t: torch.Tensor) -> tuple[Any, ...]:
    """The value checksum of ``t`` (:func:`~explaind.trajectory._tensor_watch.checksum`); its version counter and
    storage where it has none (a tensor above the checksum's size limit)."""
    sums = checksum(t.detach())
    return ("sum", sums) if sums is not None else ("version", t._version, t.data_ptr())


def final_state(model: nn.Module) -> dict[str, Any]:
    """The signature of every parameter and buffer of ``model`` (and the object itself, weakly), as ``with rec:``
    left it: compared by :func:`check_final_state`."""
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {"model": weakref.ref(model), "tensors": {n: _signature(t) for n, t in named.items()}}


def _relative_change(now: torch.Tensor, was: torch.Tensor | None) -> str:
    if was is None or was.shape != now.shape:
        return ""
    now64, was64 = now.detach().double().cpu(), was.detach().double().cpu()
    scale = float(was64.abs().max()) if was64.numel() else 0.0
    return f" (relative change {float((now64 - was64).abs().max()) / max(scale, 1e-300):.3g})"


def check_final_state(traj: Any, model: nn.Module | None, who: str) -> None:
    """Warn when ``model`` is the recorded model object and a parameter or buffer of it changed after ``with rec:``
    ended (module docstring); nothing for another model object or a trajectory without :func:`final_state`."""
    kept = getattr(traj, "final_state", None)
    if model is None or kept is None or kept["model"]() is not model:
        return
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    changed = [n for n, sig in kept["tensors"].items() if n in named and _signature(named[n]) != sig]
    if not changed:
        return
    try:  # the recorded last state (a store another recorder resumed and extended ends later: compared there)
        last = {**traj.constants(), **traj.params(traj.n_steps), **traj.buffers(traj.n_steps)}
    except Exception:  # noqa: BLE001 - without the recorded values the checksums decide alone
        last = {}
    changed = [n for n in changed if n not in last or last[n].shape != named[n].shape
               or not torch.equal(last[n].detach().cpu(), named[n].detach().cpu())]
    if not changed:
        return
    kinds = dict.fromkeys(n for n, _ in model.named_buffers())
    listed = ", ".join(f"{'buffer' if n in kinds else 'parameter'} {n}{_relative_change(named[n], last.get(n))}"
                       for n in changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    warn_user(logger, f"{who}: the model's {listed} changed after `with rec:` ended (training continued outside the "
                      f"recorder, torch.optim.swa_utils.update_bn, load_state_dict, LoRA's merge W += B A or a hand "
                      f"edit). The trajectory ends at the values its last step left, traj.params(traj.n_steps) and "
                      f"traj.buffers(traj.n_steps): the replica and the scores explain that model, not the one you "
                      f"hold now (a merge that keeps the function, as LoRA's, keeps its outputs too, but the scores "
                      f"per parameter are the unmerged factors'). Fix: make such changes on a copy "
                      f"(torch.optim.swa_utils.update_bn(loader, copy.deepcopy(model)), a merged copy of a LoRA "
                      f"model), or load the recorded values back before comparing: "
                      f"model.load_state_dict({{**model.state_dict(), **traj.constants(), **traj.params(traj.n_steps), "
                      f"**traj.buffers(traj.n_steps)}}) (traj.constants(): the frozen parameters); "
                      f"steps trained after `with rec:` are explained by recording "
                      f"them too.")
