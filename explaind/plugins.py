"""The plugin manager and the registries built from it.

Nothing here runs at import time: the manager is created, the built-in plugins registered and
the ``explaind`` entry-point group scanned on the first registry look-up, then cached.

Environment switches (read when the manager is built; call :func:`reset_plugins` after
changing them):

``EXPLAIND_DISABLE_PLUGINS``
    ``1``/``all``/``*`` skips every third-party (entry-point) plugin; otherwise a
    comma-separated list of plugin names (built-in or third-party) to skip.
``EXPLAIND_LOAD_PLUGINS``
    Comma-separated list of entry-point plugin names; when set, only those third-party
    plugins are loaded (the built-ins always are, unless disabled by name); a name that no
    installed plugin has triggers an :class:`~explaind.exceptions.ExplaindWarning`.

Failures: a third-party plugin that fails to import, does not match the hook specifications,
raises in a registration hook or returns malformed records is skipped with an
:class:`~explaind.exceptions.ExplaindWarning` naming it. Built-in and in-process plugins fail
with :class:`~explaind.exceptions.PluginError`, and so does a name registered twice for the
same kind (the message names both plugins).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from ._weight_writes import wrapper_note
from .exceptions import PluginError, UnknownEntryError, warn_at_caller
from .records import KIND_NAMES, NAME_PATTERN, RECORD_TYPES

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "get_plugin_manager",
    "get_registry",
    "get_plugins",
    "get_entry",
    "list_entries",
    "adapter_optimizer_classes",
    "reset_plugins",
    "register_plugin",
    "unregister_plugin",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "explaind"

#: First-party plugin modules, registered in this order before any third-party plugin.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "explaind_losses",
    "explaind_optimizers",
    "explaind_architectures",
    "explaind_pruning",
)

#: kind -> registration hook name
KIND_HOOKS: dict[str, str] = {
    "optimizer_adapter": "explaind_optimizer_adapters",
    "architecture": "explaind_architectures",
    "loss": "explaind_losses",
    "pruning_strategy": "explaind_pruning_strategies",
}


class _CoreFallback:
    """The core's own implementation of the adapter resolution hook (tried last)."""

    @hookspecs.hookimpl(trylast=True)
    def explaind_resolve_optimizer_adapter(self, optimizer: Any) -> Any:
        registry = get_registry()
        named = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
        for record in registry.entries["optimizer_adapter"].values():
            if type(optimizer) in record.optimizer_classes or named in record.optimizer_class_names:
                return record
        return None


@dataclass
class Registry:
    """Entries of every kind collected from the loaded plugins."""

    entries: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: {} for k in KIND_HOOKS})
    owners: dict[tuple[str, str], str] = field(default_factory=dict)
    plugins: list[dict[str, Any]] = field(default_factory=list)


_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_registry: Registry | None = None
_extra_plugins: list[tuple[str, Any]] = []


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def _plugin_version(module: Any, dist_version: str | None) -> str:
    if dist_version:
        return dist_version
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return md.version("explaind")
    except md.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def _register_first_party(pm: pluggy.PluginManager, module: Any, name: str) -> None:
    """Register a built-in or in-process plugin; a mismatch with the hookspecs is a loud :class:`PluginError`."""
    try:
        pm.register(module, name=name)
        pm.check_pending()
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f"Plugin {name!r} cannot be registered: {exc}") from exc


def _skip_warning(name: str, where: str, exc: BaseException) -> None:
    warn_at_caller(
        f"Skipping plugin {name!r} ({where}): {type(exc).__name__}: {exc}. Fix or uninstall it, or hide it with "
        f"EXPLAIND_DISABLE_PLUGINS={name}.")


def _build_manager() -> tuple[pluggy.PluginManager, list[tuple[str, Any, str]], set[str]]:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    disabled = _env_list("EXPLAIND_DISABLE_PLUGINS") or []
    disable_all_third_party = any(d.lower() in {"1", "all", "*", "true"} for d in disabled)
    only = _env_list("EXPLAIND_LOAD_PLUGINS")
    loaded: list[tuple[str, Any, str]] = []  # (name, module, version)
    third_party: set[str] = set()
    pm.register(_CoreFallback(), name="explaind.core")

    for modname in BUILTIN_PLUGINS:
        if modname in disabled:
            continue
        module = importlib.import_module(modname)
        _register_first_party(pm, module, modname)
        loaded.append((modname, module, _plugin_version(module, None)))

    for modname, module in _extra_plugins:
        if modname in disabled:
            continue
        _register_first_party(pm, module, modname)
        loaded.append((modname, module, _plugin_version(module, None)))

    if not disable_all_third_party:
        seen: set[str] = set()
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            seen.add(ep.name)
            if ep.name in disabled or (only is not None and ep.name not in only):
                continue
            module = None
            try:
                module = ep.load()
                pm.register(module, name=ep.name)
                pm.check_pending()
            except Exception as exc:  # a broken third-party plugin must not break the library
                if module is not None and pm.get_name(module) == ep.name:
                    pm.unregister(module)
                _skip_warning(ep.name, f"entry point {ep.value!r}", exc)
                continue
            version = ep.dist.version if ep.dist is not None else None
            loaded.append((ep.name, module, _plugin_version(module, version)))
            third_party.add(ep.name)
        missing = sorted(set(only or ()) - seen)
        if missing:
            warn_at_caller(
                f"EXPLAIND_LOAD_PLUGINS names {', '.join(map(repr, missing))}, but no installed plugin has that "
                f"entry-point name. Installed: {', '.join(sorted(seen)) or '(none)'}.")
    return pm, loaded, third_party


def _validate_record(kind: str, record: Any, plugin: str) -> None:
    expected = RECORD_TYPES[kind]
    if not isinstance(record, expected):
        raise PluginError(
            f"Plugin {plugin!r} returned {type(record).__name__} from {KIND_HOOKS[kind]}(); "
            f"expected {expected.__name__} records."
        )
    if not isinstance(record.name, str) or not NAME_PATTERN.match(record.name):
        raise PluginError(
            f"Plugin {plugin!r} registered the {KIND_NAMES[kind]} name {record.name!r}; names must match "
            f"{NAME_PATTERN.pattern} (lower case letters, digits, '_' or '-')."
        )


def _plugin_records(pm: pluggy.PluginManager, plugin: str, module: Any) -> dict[str, list[Any]]:
    """Call the registration hooks of one plugin and validate what they return."""
    records: dict[str, list[Any]] = {}
    for kind, hook_name in KIND_HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin is not module:
                continue
            result = impl.function()
            if result is None:
                continue
            if not isinstance(result, (list, tuple)):
                raise PluginError(
                    f"Plugin {plugin!r} returned {type(result).__name__} from {hook_name}(); expected a list of "
                    f"{RECORD_TYPES[kind].__name__} records."
                )
            for record in result:
                _validate_record(kind, record, plugin)
            records.setdefault(kind, []).extend(result)
    return records


def _collect(pm: pluggy.PluginManager, loaded: list[tuple[str, Any, str]], third_party: set[str]) -> Registry:
    registry = Registry()
    for name, module, version in loaded:
        try:
            records = _plugin_records(pm, name, module)
        except Exception as exc:
            if name not in third_party:
                if isinstance(exc, PluginError):
                    raise
                raise PluginError(f"Plugin {name!r} failed while registering its entries: {exc!r}") from exc
            _skip_warning(name, "its registration hooks failed", exc)
            pm.unregister(module)
            continue
        entries: dict[str, list[str]] = {}
        for kind, kind_records in records.items():
            for record in kind_records:
                key = (kind, record.name)
                if key in registry.owners:
                    raise PluginError(
                        f"Duplicate {KIND_NAMES[kind]} {record.name!r}: registered by plugin "
                        f"{registry.owners[key]!r} and by plugin {name!r}. Uninstall one of them or "
                        f"disable one with EXPLAIND_DISABLE_PLUGINS={name}."
                    )
                registry.owners[key] = name
                registry.entries[kind][record.name] = record
                entries.setdefault(kind, []).append(record.name)
        registry.plugins.append(
            {"name": name, "version": version, "entries": {k: sorted(v) for k, v in entries.items()}}
        )
    return registry


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the cached plugin manager, building it on first use."""
    get_registry()
    assert _manager is not None
    return _manager


def get_registry() -> Registry:
    """Return the cached registry of every kind, loading plugins on first use."""
    global _manager, _registry
    with _lock:
        if _registry is None:
            pm, loaded, third_party = _build_manager()
            _manager = pm
            try:
                _registry = Registry()  # guards re-entrant look-ups from the fallback hook
                _registry = _collect(pm, loaded, third_party)
            except Exception:
                _manager, _registry = None, None
                raise
        return _registry


def reset_plugins() -> None:
    """Forget the cached manager and registry (after installing plugins or changing env switches)."""
    global _manager, _registry
    with _lock:
        _manager, _registry = None, None


def register_plugin(module: Any, name: str | None = None) -> None:
    """Register an in-process plugin object (for tests and notebooks) and rebuild the registry.

    Parameters
    ----------
    module : object
        Any object or module carrying ``@explaind.hookimpl`` functions.
    name : str, optional
        Plugin name shown by :func:`get_plugins`; defaults to the module's ``__name__``.
    """
    plugin_name = name or getattr(module, "__name__", type(module).__name__)
    with _lock:
        taken = {n for n, _ in _extra_plugins} | set(BUILTIN_PLUGINS)
        if plugin_name in taken:
            raise PluginError(
                f"A plugin named {plugin_name!r} is already registered. Pass another name=, or call "
                f"unregister_plugin({plugin_name!r}) first."
            )
        _extra_plugins.append((plugin_name, module))
        reset_plugins()
        try:
            get_registry()  # fail now, naming the plugin, rather than at the next look-up
        except Exception:
            _extra_plugins.pop()
            reset_plugins()
            raise


def unregister_plugin(name: str) -> None:
    """Remove a plugin added with :func:`register_plugin`."""
    with _lock:
        _extra_plugins[:] = [(n, m) for n, m in _extra_plugins if n != name]
        reset_plugins()


def get_plugins() -> list[dict[str, Any]]:
    """List the loaded plugins.

    Returns
    -------
    list of dict
        One dict per plugin with keys ``name``, ``version`` and ``entries`` (kind -> sorted
        entry names), built-ins first.
    """
    return [dict(p, entries={k: list(v) for k, v in p["entries"].items()}) for p in get_registry().plugins]


def _check_kind(kind: str) -> None:
    if kind not in KIND_HOOKS:
        choices = ", ".join(sorted(KIND_HOOKS))
        hint = difflib.get_close_matches(kind, list(KIND_HOOKS), n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise UnknownEntryError(f"Unknown entry kind {kind!r}. Choose one of: {choices}.{extra}")


def list_entries(kind: str) -> list[str]:
    """Sorted names registered for ``kind``."""
    _check_kind(kind)
    return sorted(get_registry().entries[kind])


def get_entry(kind: str, name: str) -> Any:
    """Look up a registered record.

    Parameters
    ----------
    kind : {"optimizer_adapter", "architecture", "loss", "pruning_strategy"}
    name : str
        Entry name.

    Returns
    -------
    record
        The frozen record registered under ``name``.

    Raises
    ------
    UnknownEntryError
        For an unknown kind or name; the message lists the choices and the closest match.
    """
    _check_kind(kind)
    entries = get_registry().entries[kind]
    if name in entries:
        return entries[name]
    choices = sorted(entries)
    hint = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
    extra = f" Did you mean {hint[0]!r}?" if hint else ""
    listed = ", ".join(choices) if choices else "(none registered)"
    raise UnknownEntryError(
        f"Unknown {KIND_NAMES[kind]} {name!r}. Choose one of: {listed}.{extra} "
        f"Third-party entries are added by installing a plugin that registers them under the "
        f"'{ENTRY_POINT_GROUP}' entry-point group (see docs/plugins.md)."
    )


def resolve_optimizer_adapter(optimizer: Any) -> Any:
    """Return the adapter record for a live optimizer, asking every plugin (first result wins).

    Raises
    ------
    UnknownEntryError
        When no plugin handles ``type(optimizer)``; the message lists the registered adapters.
    """
    record = get_plugin_manager().hook.explaind_resolve_optimizer_adapter(optimizer=optimizer)
    if record is not None:
        return record
    names = list_entries("optimizer_adapter")
    records = get_registry().entries["optimizer_adapter"].values()
    handled = sorted({c.__name__ for r in records for c in r.optimizer_classes}
                     | {n for r in records for n in r.optimizer_class_names})
    raise UnknownEntryError(
        f"No optimizer adapter handles {type(optimizer).__module__}.{type(optimizer).__name__}. "
        f"Registered adapters: {', '.join(names)} (for {', '.join(handled)}).{_subclass_note(optimizer, records)}"
        f"{_not_elementwise_note(optimizer)}{wrapper_note(optimizer)} "
        f"To support another optimizer, write a plugin implementing explaind_optimizer_adapters() and register it "
        f"under the '{ENTRY_POINT_GROUP}' entry-point group (see docs/plugins.md)."
    )


def _not_elementwise_note(optimizer: Any) -> str:
    """For torch's LBFGS, which no adapter can express: why, and how to explain such a run all the same."""
    if not isinstance(optimizer, _torch_lbfgs()):
        return ""
    return (" No adapter can express torch.optim.LBFGS: its direction mixes the coordinates through the stored "
            "curvature pairs (no elementwise coefficient of docs/maths.md §3), and one step evaluates the closure "
            "up to max_iter times at other parameters (not one gradient at theta_s). Fix: train with an elementwise "
            "optimizer (SGD, Adam, ...) to split the run over samples; or keep the LBFGS run, save the parameters "
            "after every step and explain it as Trajectory.from_checkpoints([...], model=...): the replica and the "
            "step, group and param scores are exact along the steps (docs/recording.md, 'Runs that were not "
            "recorded').")


def _torch_lbfgs() -> type:
    """``torch.optim.LBFGS`` (imported on use: the plugin manager does not import torch at import time)."""
    import torch

    return torch.optim.LBFGS


def _subclass_note(optimizer: Any, records: Any) -> str:
    """For a subclass of a class an adapter handles: why that adapter is not used, and the fix."""
    cls = type(optimizer)
    parent = next((c for c in cls.__mro__[1:] for r in records if c in r.optimizer_classes), None)
    if parent is None:
        return ""
    def inherited(k: str, v: Any) -> bool:  # torch wraps a class's step in a profiling hook on first use
        while v is not None and v is not getattr(parent, k, None):
            v = getattr(v, "__wrapped__", None)
        return v is not None

    own = sorted({k for c in cls.__mro__[:cls.__mro__.index(parent)] for k, v in vars(c).items()
                  if callable(v) and not k.startswith("__") and not inherited(k, v)})
    defines = f"it defines {', '.join(own)}" if own else "it defines no method of its own"
    return (f" {cls.__name__} subclasses {parent.__module__}.{parent.__name__}: adapters are matched by the exact "
            f"class, since a subclass may change the update ({defines}). If its update is "
            f"{parent.__name__}'s, build {parent.__module__}.{parent.__name__} itself with the same arguments "
            f"(the same run, exactly recorded); otherwise its update needs an adapter of its own.")


def adapter_optimizer_classes(record: Any) -> tuple[type, ...]:
    """The optimizer classes of an adapter record: its ``optimizer_classes``, then each class of its
    ``optimizer_class_names`` whose module imports (an optional dependency that is not installed is left out).

    Parameters
    ----------
    record : OptimizerAdapterRecord
        A registered record (only names a record lists are imported, never a name read from a file).

    Returns
    -------
    tuple of type
    """
    found = list(record.optimizer_classes)
    for name in record.optimizer_class_names:
        module, _, qualname = name.rpartition(".")
        try:
            obj: Any = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError, ValueError) as exc:  # ValueError: no module part in the name
            logger.debug("optimizer class %s of adapter %r is not available: %s", name, record.name, exc)
            continue
        if isinstance(obj, type) and obj not in found:
            found.append(obj)
    return tuple(found)
