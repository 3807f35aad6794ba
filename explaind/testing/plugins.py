"""The plugin conformance suite: generic checks and the runners.

A plugin is any module or object carrying ``@explaind.hookimpl`` functions. The suite loads it
into a *fresh* pluggy manager holding only the explaind hook specifications (the global
registry is not touched), calls its registration hooks and derives the checks:

``hooks_match_specs``
    Registration succeeds (pluggy validates every hook name and argument name against
    :mod:`explaind.hookspecs`), no function is named like a hook but lacks the marker, and
    the plugin implements at least one hook.
``records_well_formed``
    Every registration hook returns a list of the record type of its kind; names match
    :data:`explaind.records.NAME_PATTERN` and are unique per kind; descriptions are
    non-empty; implementations are callable; configs are pydantic models.
``<kind>:<name>:config``
    Convention: **every config field has a default**, so ``Config()`` builds a working
    example the suite (and tools such as the CLI) can use. The model forbids unknown fields
    and round-trips through JSON (what trajectory manifests store).
``<kind>:<name>:<check>``
    Kind-specific checks, found through :data:`KIND_CHECKS` (e.g. architectures are checked
    for ``functional_call``/``vmap``/``jvp`` support and seed determinism, losses for
    per-sample means equal to the reference batch loss).

Adding checks for another kind takes one line in :data:`KIND_CHECKS`: the value names a
function ``factory(record, plugin: InspectedPlugin) -> iterable of (check_name, callable)``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from .. import hookspecs
from ..exceptions import ExplaindError
from ..plugins import KIND_HOOKS
from ..records import KIND_NAMES, NAME_PATTERN, RECORD_TYPES

__all__ = [
    "PluginCheckError",
    "InspectedPlugin",
    "KIND_CHECKS",
    "inspect_plugin",
    "plugin_checks",
    "check_plugin",
    "parametrize_plugin_checks",
]

Check = tuple[str, Callable[[], None]]

#: kind -> ``"module:function"`` of the factory producing that kind's record checks.
KIND_CHECKS: dict[str, str] = {
    "architecture": "explaind.testing.architectures:architecture_checks",
    "loss": "explaind.testing.losses:loss_checks",
    "optimizer_adapter": "explaind.testing.adapter_start:optimizer_adapter_checks",
    "pruning_strategy": "explaind.testing.pruning:pruning_strategy_checks",
}


class PluginCheckError(ExplaindError, AssertionError):
    """A plugin failed one or more conformance checks.

    Attributes
    ----------
    failures : list of (str, str)
        ``(check name, message)`` for every failed check.
    """

    def __init__(self, message: str, failures: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.failures: list[tuple[str, str]] = failures or []


@dataclass
class InspectedPlugin:
    """A plugin loaded into a fresh manager, with the records its hooks returned.

    Attributes
    ----------
    name : str
        Label used in check names and messages.
    plugin : object
        The module or object under test.
    registration_error : str or None
        Pluggy's validation error, when registration failed.
    records : dict
        kind -> list of whatever the kind's registration hook returned.
    hook_errors : dict
        kind -> message, when the hook raised or returned something other than a list.
    """

    name: str
    plugin: Any
    registration_error: str | None = None
    implemented_hooks: list[str] = field(default_factory=list)
    unmarked_hooks: list[str] = field(default_factory=list)
    records: dict[str, list[Any]] = field(default_factory=dict)
    hook_errors: dict[str, str] = field(default_factory=dict)

    def own_record(self, kind: str, name: str) -> Any:
        """This plugin's record of ``kind`` named ``name``, or ``None``."""
        return next((r for r in self.records.get(kind, []) if getattr(r, "name", None) == name), None)


def _fail(message: str) -> None:
    raise PluginCheckError(message)


def _spec_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith(f"{hookspecs.PROJECT_NAME}_")]


def inspect_plugin(plugin: Any, name: str | None = None) -> InspectedPlugin:
    """Load ``plugin`` (an object, a module or an importable module name) into a fresh manager."""
    if isinstance(plugin, str):
        name = name or plugin
        plugin = importlib.import_module(plugin)
    label = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    inspected = InspectedPlugin(name=label, plugin=plugin)
    marker = f"{hookspecs.PROJECT_NAME}_impl"
    for spec in _spec_names():
        obj = getattr(plugin, spec, None)
        if callable(obj) and not hasattr(obj, marker):
            inspected.unmarked_hooks.append(spec)

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    try:
        pm.register(plugin, name=label)
        pm.check_pending()
    except (pluggy.PluginValidationError, ValueError) as exc:
        inspected.registration_error = str(exc)
        return inspected
    inspected.implemented_hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
    for kind, hook_name in KIND_HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            try:
                result = impl.function()
            except Exception as exc:
                inspected.hook_errors[kind] = f"{hook_name}() raised {type(exc).__name__}: {exc}"
                continue
            if not isinstance(result, (list, tuple)):
                inspected.hook_errors[kind] = (
                    f"{hook_name}() returned {type(result).__name__}; it must return a list of "
                    f"{RECORD_TYPES[kind].__name__} (possibly empty)."
                )
                continue
            inspected.records.setdefault(kind, []).extend(result)
    return inspected


# ---------------------------------------------------------------------------- generic checks
def _check_hooks(inspected: InspectedPlugin) -> None:
    problems = []
    if inspected.registration_error:
        problems.append(f"the hook implementations do not match explaind.hookspecs: {inspected.registration_error}")
    for spec in inspected.unmarked_hooks:
        problems.append(f"{spec} is defined but not decorated with @explaind.hookimpl, so it is never called")
    if not inspected.registration_error and not inspected.implemented_hooks:
        problems.append(f"no hook is implemented; implement at least one of: {', '.join(_spec_names())}")
    if problems:
        _fail(f"Plugin {inspected.name!r}: " + "; ".join(problems) + ".")


def _record_problems(kind: str, record: Any) -> list[str]:
    expected = RECORD_TYPES[kind]
    if not isinstance(record, expected):
        return [f"{KIND_HOOKS[kind]}() returned a {type(record).__name__}; expected {expected.__name__}"]
    label = f"{KIND_NAMES[kind]} {record.name!r}"
    problems = []
    if not isinstance(record.name, str) or not NAME_PATTERN.match(record.name):
        problems.append(f"{label}: the name must match {NAME_PATTERN.pattern}")
    if not isinstance(record.description, str) or not record.description.strip():
        problems.append(f"{label}: the description is empty; give one sentence for listings")
    if not callable(record.implementation):
        problems.append(f"{label}: implementation {record.implementation!r} is not callable")
    if not (isinstance(record.config, type) and issubclass(record.config, BaseModel)):
        problems.append(f"{label}: config must be a pydantic BaseModel subclass, got {record.config!r}")
    if kind == "architecture":
        if not isinstance(record.loss, str):
            problems.append(f"{label}: loss must be a registered loss name, got {record.loss!r}")
        if record.example_input is not None and not callable(record.example_input):
            problems.append(f"{label}: example_input must be callable")
        if record.parameter_count is not None and not callable(record.parameter_count):
            problems.append(f"{label}: parameter_count must be callable")
    if kind == "optimizer_adapter":
        classes = record.optimizer_classes
        if not isinstance(classes, tuple) or not all(isinstance(c, type) for c in classes):
            problems.append(f"{label}: optimizer_classes must be a tuple of optimizer classes, got {classes!r}")
        names = record.optimizer_class_names
        if not isinstance(names, tuple) or not all(isinstance(n, str) and "." in n for n in names):
            problems.append(f"{label}: optimizer_class_names must be a tuple of 'module.ClassName' strings, got "
                            f"{names!r}")
    return problems


def _check_records(inspected: InspectedPlugin) -> None:
    if inspected.registration_error:
        _fail(f"Plugin {inspected.name!r}: records cannot be read because registration failed.")
    problems = [f"{msg}" for msg in inspected.hook_errors.values()]
    for kind, records in inspected.records.items():
        seen: set[str] = set()
        for record in records:
            problems += _record_problems(kind, record)
            name = getattr(record, "name", None)
            if name in seen:
                problems.append(f"{KIND_NAMES[kind]} {name!r} is registered twice")
            seen.add(name)
    if problems:
        _fail(f"Plugin {inspected.name!r} has malformed records:\n" + "\n".join(f"  - {p}" for p in problems))


def _check_config(kind: str, record: Any) -> None:
    label = f"{KIND_NAMES[kind]} {record.name!r}: config {record.config.__name__}"
    model: type[BaseModel] = record.config
    try:
        config = model()
    except ValidationError as exc:
        missing = [".".join(map(str, e["loc"])) for e in exc.errors()]
        _fail(
            f"{label} cannot be built from defaults (fields without a usable default: {missing}). Convention: "
            f"every config field has a default, so Config() is a working example."
        )
    data = json.loads(config.model_dump_json())
    try:
        model.model_validate({**data, "__not_a_field__": 1})
    except ValidationError:
        pass
    else:
        _fail(f"{label} accepts unknown fields; set model_config = ConfigDict(extra='forbid').")
    text = config.model_dump_json()
    for how, back in (("model_validate_json", lambda: model.model_validate_json(text)),
                      ("model_validate of the JSON dict", lambda: model.model_validate(json.loads(text)))):
        try:
            restored = back()
        except ValidationError as exc:
            _fail(f"{label} does not round-trip through JSON ({how} failed: {exc}).")
        if restored != config:
            _fail(f"{label} does not round-trip through JSON: {how} gave {restored!r}, expected {config!r}.")


def _kind_factory(kind: str) -> Callable[..., Iterable[Check]] | None:
    target = KIND_CHECKS.get(kind)
    if target is None:
        return None
    module_name, func = target.split(":")
    return getattr(importlib.import_module(module_name), func)


# ---------------------------------------------------------------------------- runners
def plugin_checks(plugin: Any, name: str | None = None) -> Iterator[Check]:
    """Yield ``(check_name, check)`` pairs for every conformance check of ``plugin``.

    Parameters
    ----------
    plugin : module, object or str
        The plugin, or the name of a module to import.
    name : str, optional
        Label for messages (default: the module name).

    Yields
    ------
    (str, callable)
        ``check()`` returns ``None`` or raises :class:`PluginCheckError` (any other exception
        is a failure too).
    """
    inspected = inspect_plugin(plugin, name)
    yield "hooks_match_specs", lambda: _check_hooks(inspected)
    yield "records_well_formed", lambda: _check_records(inspected)
    for kind, records in inspected.records.items():
        factory = _kind_factory(kind)
        for record in records:
            if not isinstance(record, RECORD_TYPES[kind]) or not isinstance(getattr(record, "name", None), str):
                continue  # reported by records_well_formed
            prefix = f"{kind}:{record.name}"
            if isinstance(record.config, type) and issubclass(record.config, BaseModel):
                yield f"{prefix}:config", (lambda k=kind, r=record: _check_config(k, r))
            if factory is not None:
                for check_name, check in factory(record, inspected):
                    yield f"{prefix}:{check_name}", check


def check_plugin(plugin: Any, name: str | None = None) -> list[str]:
    """Run every conformance check on ``plugin``.

    Returns
    -------
    list of str
        Names of the checks that ran (all passed).

    Raises
    ------
    PluginCheckError
        Listing every failed check with its message.
    """
    ran: list[str] = []
    failures: list[tuple[str, str]] = []
    label = name or (plugin if isinstance(plugin, str) else getattr(plugin, "__name__", type(plugin).__name__))
    for check_name, check in plugin_checks(plugin, name):
        ran.append(check_name)
        try:
            check()
        except PluginCheckError as exc:
            failures.append((check_name, str(exc)))
        except Exception as exc:
            failures.append((check_name, f"raised {type(exc).__name__}: {exc}"))
    if failures:
        lines = "\n".join(f"- {check}: {msg}" for check, msg in failures)
        raise PluginCheckError(f"Plugin {label!r} failed {len(failures)} of {len(ran)} checks:\n{lines}", failures)
    return ran


def parametrize_plugin_checks(*plugins: Any, argname: str = "plugin_check") -> Any:
    """A ``pytest.mark.parametrize`` decorator with one test per check of each plugin.

    Parameters
    ----------
    *plugins : module, object, str or (plugin, name) tuple
        Plugins to check; test ids read ``<plugin>::<check>``.
    argname : str
        Name of the test argument receiving the check callable.

    Examples
    --------
    >>> @parametrize_plugin_checks("explaind_losses", "my_plugin")   # doctest: +SKIP
    ... def test_conformance(plugin_check):
    ...     plugin_check()
    """
    import pytest

    params = []
    for entry in plugins:
        plugin, name = entry if isinstance(entry, tuple) else (entry, None)
        label = name or (plugin if isinstance(plugin, str) else getattr(plugin, "__name__", type(plugin).__name__))
        for check_name, check in plugin_checks(plugin, name):
            params.append(pytest.param(check, id=f"{label}::{check_name}"))
    return pytest.mark.parametrize(argname, params)
