"""What the conformance checks compare between an estimator's ``__init__`` and its pydantic config model.

:func:`config_default_mismatches` lists where the ``__init__`` signature and the config model that
validates it disagree (names and defaults), so the two cannot drift apart; :func:`invalid_value_for`
finds a value the config model rejects for one parameter, which ``fit`` must then refuse with a
:class:`explaind.exceptions.ConfigError`. Both serve :mod:`explaind.testing.estimators` and
:mod:`explaind.testing.pruning`.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["config_default_mismatches", "invalid_value_for"]


class InvalidValue:
    """A value no typed config field accepts."""

    def __repr__(self) -> str:
        return "<invalid value>"


_CANDIDATE_INVALID: tuple[Any, ...] = (InvalidValue(), "__invalid__", -1, 0, float("nan"), (), 1.5)


def equal_values(a: Any, b: Any) -> bool:
    """``a == b`` as a bool; False where the comparison raises or is not a truth value (arrays)."""
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


class _Required:
    """Stands for "no default" in :func:`config_default_mismatches` messages."""

    def __repr__(self) -> str:
        return "<required>"


_REQUIRED = _Required()


def _field_default(field: Any) -> Any:
    """The default of a pydantic field (``_REQUIRED`` for none; a default factory is called)."""
    if field.is_required():
        return _REQUIRED
    factory = field.default_factory
    if factory is None:
        return field.default
    try:
        try:
            return factory()
        except TypeError:  # a factory of the validated data (pydantic >= 2.10)
            return factory({})
    except Exception as exc:
        return f"<default_factory failed: {type(exc).__name__}: {exc}>"


def config_default_mismatches(cls: type, config_model: Any) -> list[str]:
    """How the ``__init__`` signature of ``cls`` and the pydantic ``config_model`` disagree.

    Parameters
    ----------
    cls : type
        An estimator (or pruning strategy) class with keyword-only ``__init__`` parameters.
    config_model : type of pydantic.BaseModel
        The model that validates those parameters (``cls._config_model``, a record's ``config``).

    Returns
    -------
    list of str
        One message per problem, empty when they agree: a parameter that is not a field, a field
        that is not a parameter, and a parameter whose default differs from its field's default
        (the message names the parameter and gives both values; ``<required>`` stands for no
        default).
    """
    sig = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
           if n != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    fields = dict(getattr(config_model, "model_fields", {}))
    model_name = getattr(config_model, "__name__", repr(config_model))
    problems = [f"__init__ parameter {name!r} is not a field of {model_name}." for name in sig if name not in fields]
    problems += [f"{model_name} field {name!r} is not an __init__ parameter." for name in fields if name not in sig]
    for name, param in sig.items():
        if name not in fields:
            continue
        default = _REQUIRED if param.default is inspect.Parameter.empty else param.default
        field_default = _field_default(fields[name])
        same = default is field_default or (
            _REQUIRED not in (default, field_default) and equal_values(default, field_default))
        if not same:
            problems.append(f"parameter {name!r}: the __init__ default {default!r} differs from the {model_name} "
                            f"default {field_default!r}.")
    return problems


def invalid_value_for(estimator: Any, name: str) -> tuple[bool, Any]:
    """A value the estimator's config model rejects for parameter ``name``: ``(found, value)``."""
    model = getattr(type(estimator), "_config_model", None)
    if model is None:
        return True, _CANDIDATE_INVALID[0]
    base = estimator.get_params(deep=False)
    for candidate in _CANDIDATE_INVALID:
        try:
            model.model_validate({**base, name: candidate})
        except Exception:
            return True, candidate
    return False, None


