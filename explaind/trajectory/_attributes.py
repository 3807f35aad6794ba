r"""Python attributes a forward can read, fingerprinted at every step.

docs/recording.md, "Python attributes changed between steps", has the user's side.

The engine replays every recorded step with the model as it is when explaining: its parameters are
:math:`\theta_s` and its buffers :math:`\beta_s` (both recorded), but everything else the forward reads is
the final model's. A plain Python attribute the loop changes between steps (a float temperature, an int
``k`` of a top-k, a bool flag, a string mode, ``Dropout.p`` set by a schedule), a submodule swapped for
another (``nn.Identity`` in place of a layer), a submodule put in another mode than the model
(``model.encoder.eval()``) or a forward hook added mid-run makes every earlier step's recomputed
gradient differ from the loop's, and the recorder's gradient check cannot see it (it runs the model as
it is at that step).

:class:`AttributeWatch` takes a fingerprint of that state at the first gradient-enabled forward of every
step (a forward pre-hook, like :class:`~explaind.trajectory._buffers.BufferTracker`): for every module,
each ``__dict__`` entry of a plain type (``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``,
``bytes``, dtypes, devices, enums, numpy scalars as their Python values, functions and classes by
identity, and tuples, lists, sets and dicts of those), its children (``_modules``: names and objects), its
forward and backward hook dictionaries, and whether its ``training`` flag differs from the model's (a
whole-model ``train()`` / ``eval()``, a validation pass, is not a change: the engine sets the mode of the
whole model itself). Tensors are not fingerprinted (parameters and buffers are recorded; a plain tensor
attribute is not watched). :meth:`AttributeWatch.take_changes` compares the fingerprints of consecutive
steps.

What the recorder does with a change is in :mod:`explaind.trajectory._attribute_check`.
"""

from __future__ import annotations

import copy
import enum
import fnmatch
import numbers
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._common import FirstForward, ModelHook
from ._tensor_watch import UNWATCHED, Seen, describe_object_change, describe_tensor, is_plain_object, tensor_ids

__all__ = ["ABSENT", "AttributeWatch", "Change", "Snapshot", "snapshot", "differences", "restore_value", "IGNORED_KEYS",
           "HOOK_KEYS"]

#: ``__dict__`` entries never fingerprinted: tensors recorded elsewhere, torch's bookkeeping no forward reads,
#: and the plumbing Lightning and Hugging Face change during training (trainer references, logging state,
#: issued-warning registries).
IGNORED_KEYS = frozenset({
    "_parameters", "_buffers", "_non_persistent_buffers_set", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_is_full_backward_hook", "_compiled_call_impl",
    "training",  # fingerprinted relative to the model's own flag (see the module docstring)
    # Hugging Face PreTrainedModel: a registry of warnings issued once
    "warnings_issued",
})

#: Hook dictionaries of ``nn.Module`` a forward or backward runs; fingerprinted as (handle id, hook object), except
#: explaind's own (:class:`~explaind.trajectory._common.ModelHook`: the recorder's and the integrations').
HOOK_KEYS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
             "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")

_HOOKS = frozenset(HOOK_KEYS)

#: Modules of the framework base classes whose ``__init__`` attributes are plumbing (Lightning's LightningModule).
FRAMEWORK_PREFIXES = ("lightning.", "pytorch_lightning.", "lightning_fabric.")

_SCALARS = (type(None), bool, int, str, bytes, torch.dtype, torch.device, torch.layout, torch.memory_format,
            enum.Enum, type)
_EXACT = frozenset({type(None), bool, int, str, bytes, torch.dtype, torch.device, torch.layout, torch.memory_format})
_CALLABLES = frozenset({types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.BuiltinMethodType})
_CONTAINERS = frozenset({tuple, list, set, frozenset, dict})
_MUTABLE = frozenset({list, set, dict})
_MAX_ITEMS = 256
_UNWATCHED = UNWATCHED
#: ``Change.old`` / ``Change.new`` of an entry that did not exist then.
ABSENT = type("Absent", (), {"__repr__": lambda self: "absent"})()


def _freeze(value: Any, depth: int = 0, seen: Seen | None = None) -> Any:
    """A comparable form of a plain value (``_UNWATCHED`` for anything else: other objects, large containers);
    tensors by :func:`~explaind.trajectory._tensor_watch.tensor_signature` and configs by their fields when
    ``seen`` (one snapshot's context) is given."""
    kind = type(value)
    if kind in _EXACT:
        return (kind, value)
    if kind is float:
        return ("float", value.hex()) if value == value else ("float", "nan")
    if kind is complex:
        return ("complex", value.real.hex(), value.imag.hex())
    if kind in _CALLABLES:
        return ("callable", id(getattr(value, "__func__", value)), id(getattr(value, "__self__", None)))
    if kind in _CONTAINERS and depth < 3 and len(value) <= _MAX_ITEMS:
        if kind is dict:
            frozen: Any = tuple((_freeze(k, depth + 1, seen), _freeze(v, depth + 1, seen)) for k, v in value.items())
            flat: Any = (y for kv in frozen for y in kv)
        else:
            frozen = (frozenset if kind in (set, frozenset) else tuple)(_freeze(v, depth + 1, seen) for v in value)
            flat = frozen
        return _UNWATCHED if any(x is _UNWATCHED for x in flat) else (kind, frozen)
    if seen is not None and depth < 3 and is_plain_object(value):
        return seen.object(value, lambda v: _freeze(v, depth + 1, seen))
    if isinstance(value, torch.Tensor):
        return _UNWATCHED if seen is None else seen.tensor(value)
    if isinstance(value, _SCALARS):  # subclasses: enums, an int subclass
        return (kind, value)
    if isinstance(value, numbers.Number):  # numpy scalars
        plain = int(value) if isinstance(value, numbers.Integral) else \
            float(value) if isinstance(value, numbers.Real) else complex(value)
        return ("number", _freeze(plain, depth))
    return _UNWATCHED


def _framework_keys(module: nn.Module) -> frozenset[str]:
    """``__dict__`` keys never fingerprinted for ``module``'s class: :data:`IGNORED_KEYS` and those a framework base
    class sets in its ``__init__`` (Lightning's plumbing); cached per class."""
    cls = type(module)
    if cls not in _SKIPPED:
        keys: set[str] = set()
        for base in cls.__mro__:
            if base.__module__.startswith(FRAMEWORK_PREFIXES):
                keys.update(_init_keys(base))
        _SKIPPED[cls] = frozenset(keys - _init_keys(nn.Module)) | IGNORED_KEYS  # torch's own entries stay watched
    return _SKIPPED[cls]


_SKIPPED: dict[type, frozenset[str]] = {}
_INIT_KEYS: dict[type, frozenset[str]] = {}


def _init_keys(cls: type) -> frozenset[str]:
    """The attributes a bare instance of ``cls`` holds (cached; empty when it needs arguments)."""
    if cls not in _INIT_KEYS:
        try:
            _INIT_KEYS[cls] = frozenset(vars(cls()))
        except Exception:  # noqa: BLE001 - a base class that cannot be built bare contributes no names
            _INIT_KEYS[cls] = frozenset()
    return _INIT_KEYS[cls]


@dataclass(frozen=True)
class Change:
    """One fingerprinted entry that differs between two steps.

    ``path`` is the module's name in the model (``""``: the model), ``key`` the ``__dict__`` entry
    (``"training"`` for the mode relative to the model's, ``"_modules"`` for the children, a hook
    dictionary's name), ``old``/``new`` the values (``old`` restores the entry; :data:`ABSENT` when there was none).
    """

    path: str
    key: str
    old: Any
    new: Any
    module: nn.Module
    #: False when ``old`` cannot set the entry back: a plain tensor too large to clone was changed in place.
    testable: bool = True

    @property
    def name(self) -> str:
        """``path.key`` (``key`` alone on the model itself)."""
        return f"{self.path}.{self.key}" if self.path else self.key

    def names(self) -> list[str]:
        """:attr:`name`, or for a config object ``name.field`` of each field that differs."""
        if is_plain_object(self.old) and is_plain_object(self.new):
            a, b = vars(self.old), vars(self.new)
            return [f"{self.name}.{k}" for k in dict.fromkeys([*a, *b]) if k not in a or k not in b or
                    _freeze(a[k]) != _freeze(b[k]) or isinstance(a[k], torch.Tensor)]
        return [self.name]

    def describe(self) -> str:
        """The change in words: ``name (Class): old -> new``."""
        owner = f"{self.name} ({type(self.module).__name__})"
        if self.key == "training":
            return f"{owner}: {'same mode as' if self.old else 'other mode than'} the model -> " \
                   f"{'same mode as' if self.new else 'other mode than'} the model"
        if self.key == "_modules":
            return f"{owner}: children {_children(self.old)} -> {_children(self.new)}"
        if self.key in HOOK_KEYS:
            return f"{owner}: {_count(self.old)} -> {_count(self.new)} hook(s)"
        if is_plain_object(self.old) and is_plain_object(self.new):
            return f"{owner}: {describe_object_change(self.old, self.new)}"
        if isinstance(self.old, torch.Tensor) or isinstance(self.new, torch.Tensor):
            how = "changed in place, too large to set back for a test; " if not self.testable else \
                "values changed; " if isinstance(self.old, torch.Tensor) and isinstance(self.new, torch.Tensor) else ""
            return f"{owner}: {describe_tensor(self.old)} -> {describe_tensor(self.new)} ({how}a plain tensor " \
                   f"attribute, not a buffer)"
        return f"{owner}: {_short(self.old)} -> {self._new_text()}"

    def _new_text(self) -> str:
        """``new`` in words; a value that is no plain one (a tensor, an object) is named by its type, not "absent"."""
        if self.new is ABSENT and self.key in vars(self.module):
            value = vars(self.module)[self.key]
            shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
            return f"a {type(value).__name__}{shape} (not a plain value: not watched)"
        return _short(self.new)


def _children(modules: Any) -> str:
    if not isinstance(modules, dict):
        return "none"
    return "{" + ", ".join(f"{k}: {type(v).__name__}" for k, v in list(modules.items())[:6]) + \
        (", ..." if len(modules) > 6 else "") + "}"


def _count(hooks: Any) -> int:
    """The hooks of a hook dictionary other than explaind's own."""
    return sum(type(h) is not ModelHook for h in hooks.values()) if isinstance(hooks, dict) else 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Snapshot:
    """A fingerprint of the watched state: ``frozen[(path, key)]`` to compare, ``values[(path, key)]`` to restore."""

    __slots__ = ("frozen", "values", "modules", "tensors", "referenced", "restores")

    def __init__(self) -> None:
        self.frozen: dict[tuple[str, str], Any] = {}
        self.values: dict[tuple[str, str], Any] = {}
        self.modules: dict[str, nn.Module] = {}
        #: plain tensors' signatures by id; those kept by reference (too large to clone), which cannot be set back
        self.tensors: dict[int, Any] = {}
        self.referenced: dict[int, Any] = {}
        #: plain tensors' restore values by id (reused by the next snapshot where a signature is unchanged)
        self.restores: dict[int, Any] = {}


class _Empty:
    """The restore value of an empty container (most hook dictionaries): a new one of its class."""

    __slots__ = ("cls",)

    def __init__(self, cls: type):
        self.cls = cls

    def __repr__(self) -> str:
        return f"{self.cls.__name__}()"


def restore_value(value: Any) -> Any:
    """The object an entry is set back to from its snapshot's value (a new empty container for :class:`_Empty`)."""
    return value.cls() if isinstance(value, _Empty) else value


_EMPTIES: dict[type, _Empty] = {}


def _copy(value: Any) -> Any:
    """What restores a container entry later: a shallow copy (it may be edited in place), :class:`_Empty` if empty."""
    if value:
        return copy.copy(value)
    cls = type(value)
    if cls not in _EMPTIES:
        _EMPTIES[cls] = _Empty(cls)
    return _EMPTIES[cls]


def snapshot(model: nn.Module, ignored: Callable[[str, str], bool] | None = None,
             previous: Snapshot | None = None) -> Snapshot:
    """The fingerprint of ``model`` now (see the module docstring).

    Parameters
    ----------
    model : nn.Module
    ignored : callable, optional
        ``ignored(path, key)``: whether an entry is left out (``TrajectoryRecorder(ignore_attributes=...)``).
    previous : Snapshot, optional
        An earlier snapshot of the same model: plain tensors whose signature did not change keep its restore values
        (no new clone per step).
    """
    snap = Snapshot()
    seen = Seen(model, None if previous is None else (previous.tensors, previous.restores))
    root = model.training
    frozen_of, values = snap.frozen, snap.values
    for path, module in model.named_modules(remove_duplicate=True):
        snap.modules[path] = module
        skipped = _framework_keys(module)
        for key, value in module.__dict__.items():
            if key in skipped:
                continue
            if key in _HOOKS:
                frozen: Any = tuple((k, h) for k, h in value.items() if type(h) is not ModelHook) if value else ()
                restore = _copy(value)
            elif key == "_modules":
                frozen, restore = tuple(value.items()), value.copy()  # children compared by identity
            else:
                met = seen.met
                frozen = _freeze(value, 0, seen)
                if frozen is _UNWATCHED:
                    continue
                restore = seen.restore(value) if seen.met != met else _copy(value) if type(value) in _MUTABLE else value
            if ignored is not None and ignored(path, key):
                continue
            frozen_of[(path, key)] = frozen
            values[(path, key)] = restore
        if path and (ignored is None or not ignored(path, "training")):
            frozen_of[(path, "training")] = values[(path, "training")] = module.training == root
    snap.tensors, snap.referenced, snap.restores = seen.tensors, seen.referenced, seen.restores_of_tensors()
    return snap


class _Ignored:
    """``ignored(path, key)`` for ``fnmatch`` patterns of ``path.key`` names, cached per entry."""

    def __init__(self, patterns: Sequence[str]):
        self.patterns, self._seen = tuple(patterns), {}

    def __call__(self, path: str, key: str) -> bool:
        hit = self._seen.get((path, key))
        if hit is None:
            name = f"{path}.{key}" if path else key
            hit = self._seen[(path, key)] = any(fnmatch.fnmatchcase(name, p) for p in self.patterns)
        return hit


def differences(old: Snapshot, new: Snapshot) -> list[Change]:
    """The entries of ``new`` that differ from ``old`` (changed, added or gone), as :class:`Change`; only those of
    modules that are the same objects in both (a module added, removed or swapped shows in its parent's children)."""
    if old.frozen == new.frozen:
        return []
    edited = {k for k, sig in old.referenced.items() if new.tensors.get(k, sig) != sig}  # cannot be set back
    out = []
    for entry in dict.fromkeys([*old.frozen, *new.frozen]):
        a, b = old.frozen.get(entry, _UNWATCHED), new.frozen.get(entry, _UNWATCHED)
        module = new.modules.get(entry[0])
        if a == b or module is None or module is not old.modules.get(entry[0]):
            continue  # a module added, removed or swapped is its parent's "_modules" change
        testable = not (edited and edited & tensor_ids(a))
        out.append(Change(entry[0], entry[1], old.values.get(entry, ABSENT), new.values.get(entry, ABSENT), module,
                          testable))
    return out


class AttributeWatch:
    """The fingerprint of the model at each step's first gradient-enabled forward, compared step to step.

    Parameters
    ----------
    model : nn.Module
    ignore : sequence of str
        ``fnmatch`` patterns of ``path.key`` names not watched (``TrajectoryRecorder(ignore_attributes=...)``).
    """

    def __init__(self, model: nn.Module, ignore: Sequence[str] = ()):
        self.model = model
        self.ignore = tuple(ignore)
        self._ignored = _Ignored(self.ignore) if self.ignore else None
        self.base: Snapshot | None = None  # what the last accepted step's forward saw
        self._seen: Snapshot | None = None
        self._pending: Snapshot | None = None
        self.refused = False  # a step was refused: the end of the recording warns about nothing more
        self.counts: dict[str, int] = {}  # changes seen per entry name (tested at the 1st, 2nd, 4th, ...)
        self.unread: set[str] = set()  # entry names that changed and that the test forward found unread
        self._forward = FirstForward(model, self._first_forward)

    @property
    def enabled(self) -> bool:
        """Whether anything is watched (``ignore_attributes=("*",)`` turns the watch off)."""
        return "*" not in self.ignore

    def start(self) -> None:
        """Watch the next gradient-enabled forward (the first step's)."""
        self.base, self._seen = None, None
        self._forward.arm()
        if self.enabled:
            self._forward.attach()

    def stop(self) -> None:
        """Remove the forward pre-hook."""
        self._forward.detach()

    def _first_forward(self) -> None:
        self._seen = snapshot(self.model, self._ignored, self.base)

    def arm(self) -> None:
        """After a step: fingerprint the next step's first gradient-enabled forward."""
        self._forward.arm()

    def take_changes(self) -> list[Change]:
        """What differs between this step's forward and the last accepted step's (empty at the first step)."""
        if not self.enabled:
            return []
        seen = self._seen if self._seen is not None else snapshot(self.model, self._ignored, self.base)
        self._seen = None
        if self.base is None:
            self.base = seen
            return []
        changes = differences(self.base, seen)
        self._pending = seen
        return changes

    def accept(self) -> None:
        """The changes :meth:`take_changes` returned are harmless: compare the next step with this one."""
        if self._pending is not None:
            self.base, self._pending = self._pending, None

    def final_changes(self) -> list[Change]:
        """What differs between the model now and the last accepted step's forward (when recording ends)."""
        if not self.enabled or self.base is None:
            return []
        return differences(self.base, snapshot(self.model, self._ignored))
