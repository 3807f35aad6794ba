"""Conformance checks for explaind estimators (the counterpart of scikit-learn's ``check_estimator``).

Every check is a function ``check(estimator, trajectory, X, y=None)``: it clones ``estimator``
(the instance passed in is never fitted or modified), fits the clones on ``trajectory`` and
queries them on the test inputs ``X``. ``trajectory`` may also be a tuple of positional ``fit``
arguments, e.g. ``(model, data, trajectory)`` for a pruning strategy. A failed check raises
:class:`EstimatorCheckError` (an ``AssertionError``) whose message names the estimator, the check and
what was wrong.

``init_keyword_only``
    ``__init__`` takes keyword-only parameters (no ``*args``/``**kwargs``) and sets nothing but
    them: ``get_params()`` keys equal the signature, values are stored verbatim (same objects).
``default_params``
    A default-constructed instance reports the signature defaults through ``get_params()``.
``config_defaults``
    The ``__init__`` parameters and the fields of the estimator's pydantic ``_config_model`` have
    the same names, and every parameter's default equals its field's default (a required
    parameter has a required field), so the signature and the validation model cannot drift
    apart (see :func:`config_default_mismatches`).
``set_params_and_clone``
    ``set_params`` returns the estimator and changes ``get_params``; unknown names raise
    ``ValueError``; ``sklearn.base.clone`` of a fitted estimator is unfitted with equal params.
``not_fitted``
    Before ``fit``, every query method raises :class:`explaind.exceptions.NotFittedError` whose
    message names the class and says to call ``fit``; ``check_is_fitted`` agrees.
``fit_returns_self``
    ``fit`` returns the estimator itself and leaves its parameters untouched.
``fitted_attributes``
    No public attribute ends with ``_`` before ``fit``; every public attribute ``fit`` adds ends
    with ``_``.
``invalid_params_at_fit``
    For every parameter, a value its config model rejects is accepted by ``__init__`` and
    ``set_params`` but makes ``fit`` raise :class:`explaind.exceptions.ConfigError` naming the
    parameter.
``fit_rejects_wrong_input``
    ``fit`` with a string instead of its first argument (a :class:`explaind.Trajectory`, or the model
    of a pruning strategy) raises an :class:`explaind.exceptions.ExplaindError` naming the type given.
``copy_round_trip``
    A fitted estimator survives ``copy.deepcopy`` (as model selection copies estimators) and the
    copy gives identical results. (No pickle: explaind stores safetensors and JSON only.)
``deterministic``
    Two fresh clones, and a refit of one of them, give bitwise identical results.
``dtype``
    With ``dtype="float32"`` / ``"float64"`` every floating result of ``predict``/``transform`` has
    that dtype (fitted attributes such as pruning scores may keep a documented fixed dtype).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..exceptions import ConfigError, ExplaindError, NotFittedError
from .configs import InvalidValue, config_default_mismatches, equal_values, invalid_value_for

__all__ = [
    "EstimatorCheckError",
    "ESTIMATOR_CHECKS",
    "estimator_checks",
    "check_estimator",
    "config_default_mismatches",
    "parametrize_with_checks",
]

EstimatorCheck = Callable[..., None]

#: Methods that query a fitted estimator; those an estimator has must refuse to run before ``fit``.
QUERY_METHODS = ("predict", "transform", "score", "fidelity_report", "masks")
#: Result fields read from an object returned by ``transform`` (e.g. an ``Attribution``).
RESULT_FIELDS = ("values", "initial", "regularization", "residual", "quadrature_error")


class EstimatorCheckError(ExplaindError, AssertionError):
    """An estimator failed one or more conformance checks.

    Attributes
    ----------
    failures : list of (str, str)
        ``(check name, message)`` for every failed check.
    """

    def __init__(self, message: str, failures: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.failures: list[tuple[str, str]] = failures or []


def _fail(estimator: Any, message: str) -> None:
    raise EstimatorCheckError(f"{type(estimator).__name__}: {message}")


def _clone(estimator: Any) -> Any:
    from sklearn.base import clone

    return clone(estimator)


def _params(estimator: Any) -> dict[str, Any]:
    return estimator.get_params(deep=False)


def _signature_params(estimator: Any) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(type(estimator).__init__)
    return {n: p for n, p in sig.parameters.items() if n != "self"}


def _to_numpy(value: Any) -> Any:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value)
    return value


def results(estimator: Any, X: Any, y: Any = None) -> dict[str, Any]:
    """The results of a fitted estimator as ``name -> numpy array`` (or plain value).

    ``predict(X)`` when the estimator has it; else the fields of ``transform(X, y)`` (when its first
    parameter is ``X``); else every public fitted attribute (name ending in ``_``) holding an array or
    tensor, or a dict of them (e.g. a pruning strategy's ``scores_``).
    """
    if hasattr(estimator, "predict"):
        return {"predict": _to_numpy(estimator.predict(X))}
    if hasattr(estimator, "transform") and _first_param(estimator.transform) == "X":
        out = estimator.transform(X) if y is None else estimator.transform(X, y)
        if any(hasattr(out, f) for f in RESULT_FIELDS):
            return {f: _to_numpy(getattr(out, f)) for f in RESULT_FIELDS if getattr(out, f, None) is not None}
        return {"transform": _to_numpy(out)}
    found = {}
    for name, value in vars(estimator).items():
        if not name.endswith("_") or name.startswith("_"):
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, item in items:
            arr = _to_numpy(item)
            if isinstance(arr, np.ndarray):
                found[name if key is None else f"{name}[{key}]"] = arr
    return found


def _same(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the results that differ (bitwise for arrays)."""
    bad = sorted(set(a) ^ set(b))
    for key in set(a) & set(b):
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"):
                bad.append(key)
        elif x != y:
            bad.append(key)
    return bad


def _fit(estimator: Any, fit_input: Any) -> Any:
    """``estimator.fit(*fit_input)`` for a tuple, else ``estimator.fit(fit_input)``."""
    if isinstance(fit_input, tuple):
        return estimator.fit(*fit_input)
    return estimator.fit(fit_input)


def _first_param(method: Any) -> str | None:
    try:
        params = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return None
    return params[0].name if params else None


def _public_trailing(estimator: Any) -> set[str]:
    return {n for n in vars(estimator) if n.endswith("_") and not n.startswith("_")}


# ---------------------------------------------------------------------------------------- checks
def check_init_keyword_only(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    sig = _signature_params(estimator)
    for name, p in sig.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            _fail(estimator, f"__init__ parameter {name!r} is {p.kind.description}; it must be keyword-only.")
    params = _params(estimator)
    if set(params) != set(sig):
        _fail(estimator, f"get_params() keys {sorted(params)} differ from the __init__ signature {sorted(sig)}.")
    fresh = type(estimator)(**params)
    for name, value in params.items():
        if getattr(fresh, name) is not value:
            _fail(estimator, f"__init__ does not store parameter {name!r} verbatim (got a modified copy).")
    extra = {n for n in vars(fresh) if n not in sig}
    if extra:
        _fail(estimator, f"__init__ sets attributes that are not parameters: {sorted(extra)}.")


def check_default_params(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    sig = _signature_params(estimator)
    required = {n: getattr(estimator, n) for n, p in sig.items() if p.default is inspect.Parameter.empty}
    fresh = type(estimator)(**required)
    got = _params(fresh)
    for name, p in sig.items():
        if p.default is inspect.Parameter.empty:
            continue
        if got[name] is not p.default and not equal_values(got[name], p.default):
            _fail(estimator, f"get_params()[{name!r}] of a default instance is {got[name]!r}, not the "
                  f"signature default {p.default!r}.")


def check_config_defaults(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    model = getattr(type(estimator), "_config_model", None)
    if model is None:
        return
    problems = config_default_mismatches(type(estimator), model)
    if problems:
        _fail(estimator, " ".join(problems))


def check_set_params_and_clone(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    est = _clone(estimator)
    params = _params(est)
    name = next(iter(params), None)
    if name is not None:
        marker = InvalidValue()
        if est.set_params(**{name: marker}) is not est:
            _fail(estimator, "set_params must return the estimator itself.")
        if _params(est)[name] is not marker:
            _fail(estimator, f"set_params({name}=...) did not change get_params()[{name!r}].")
        est.set_params(**{name: params[name]})
    try:
        est.set_params(__no_such_parameter__=1)
    except ValueError:
        pass
    else:
        _fail(estimator, "set_params accepted an unknown parameter name; it must raise ValueError.")
    _fit(est, trajectory)
    copy = _clone(est)
    if _public_trailing(copy):
        _fail(estimator, f"clone() of a fitted estimator carries fitted attributes {sorted(_public_trailing(copy))}.")
    if _same({k: repr(v) for k, v in _params(copy).items()}, {k: repr(v) for k, v in params.items()}):
        _fail(estimator, "clone() changed the parameters.")
    if type(estimator).__name__ not in repr(est):
        _fail(estimator, f"repr() does not name the class: {repr(est)!r}.")


def check_not_fitted(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    from sklearn.exceptions import NotFittedError as SklearnNotFittedError
    from sklearn.utils.validation import check_is_fitted

    est = _clone(estimator)
    name = type(estimator).__name__
    for method in QUERY_METHODS:
        if not hasattr(est, method):
            continue
        fn = getattr(est, method)
        first = _first_param(fn)
        if first not in (None, "X") and inspect.signature(fn).parameters[first].default is inspect.Parameter.empty:
            continue  # needs something other than test inputs (e.g. a pruning strategy's transform(model))
        try:
            fn(X) if first == "X" else fn()
        except NotFittedError as exc:
            msg = str(exc)
            if name not in msg or "fit" not in msg:
                _fail(estimator, f"{method}() before fit: the NotFittedError message must name {name!r} and "
                      f"say to call 'fit'; got {msg!r}.")
        except Exception as exc:
            _fail(estimator, f"{method}() before fit raised {type(exc).__name__} ({exc}), not NotFittedError.")
        else:
            _fail(estimator, f"{method}() before fit returned instead of raising NotFittedError.")
    try:
        check_is_fitted(est)
    except SklearnNotFittedError:
        pass
    else:
        _fail(estimator, "sklearn's check_is_fitted() accepts the unfitted estimator.")
    _fit(est, trajectory)
    check_is_fitted(est)


def check_fit_returns_self(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    est = _clone(estimator)
    before = dict(_params(est))
    if _fit(est, trajectory) is not est:
        _fail(estimator, "fit must return the estimator itself.")
    after = _params(est)
    changed = [k for k in before if after[k] is not before[k]]
    if changed:
        _fail(estimator, f"fit changed the parameters {changed}; store derived values in fitted attributes.")


def check_fitted_attributes(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    est = _clone(estimator)
    early = _public_trailing(est)
    if early:
        _fail(estimator, f"attributes {sorted(early)} end with '_' before fit.")
    before = set(vars(est))
    _fit(est, trajectory)
    added = {n for n in set(vars(est)) - before if not n.startswith("_")}
    wrong = sorted(n for n in added if not n.endswith("_"))
    if wrong:
        _fail(estimator, f"fit added public attributes without a trailing underscore: {wrong}.")
    if not added:
        _fail(estimator, "fit added no fitted attribute (name ending with '_').")


def check_invalid_params_at_fit(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    params = _params(estimator)
    tested = 0
    for name in params:
        found, bad = invalid_value_for(estimator, name)
        if not found:
            continue
        tested += 1
        try:
            est = type(estimator)(**{**params, name: bad})
            est.set_params(**{name: bad})
        except Exception as exc:
            _fail(estimator, f"__init__/set_params validated {name}={bad!r} ({type(exc).__name__}); "
                  "validation belongs in fit.")
        try:
            _fit(est, trajectory)
        except ConfigError as exc:
            if repr(name) not in str(exc) and name not in str(exc):
                _fail(estimator, f"fit with {name}={bad!r}: the ConfigError does not name the parameter: {exc}")
        except Exception as exc:
            _fail(estimator, f"fit with {name}={bad!r} raised {type(exc).__name__} ({exc}), not ConfigError.")
        else:
            _fail(estimator, f"fit accepted the invalid value {name}={bad!r}.")
    if params and not tested:
        _fail(estimator, "no parameter rejects any value; every parameter should be validated at fit.")


def check_fit_rejects_wrong_input(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    est = _clone(estimator)
    bad = "not a trajectory"
    try:
        if isinstance(trajectory, tuple):
            est.fit(bad, *trajectory[1:])
        else:
            est.fit(bad)
    except ExplaindError as exc:
        if "str" not in str(exc):
            _fail(estimator, f"fit({bad!r}): the error should name the type given ('str'): {exc}")
    except Exception as exc:
        _fail(estimator, f"fit({bad!r}) raised {type(exc).__name__}, not an ExplaindError: {exc}")
    else:
        _fail(estimator, "fit accepted a string as its first argument.")


def check_copy_round_trip(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    est = _fit(_clone(estimator), trajectory)
    want = results(est, X, y)
    try:
        again = copy.deepcopy(est)
    except Exception as exc:
        _fail(estimator, f"a fitted estimator cannot be copied with copy.deepcopy ({type(exc).__name__}: {exc}); "
                         f"keep fitted attributes to tensors, arrays and plain data.")
    differ = _same(results(again, X, y), want)
    if differ:
        _fail(estimator, f"after a copy.deepcopy round trip the results {differ} differ.")


def check_deterministic(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    first = _fit(_clone(estimator), trajectory)
    a = results(first, X, y)
    b = results(_fit(_clone(estimator), trajectory), X, y)
    differ = _same(a, b)
    if differ:
        _fail(estimator, f"two fits on the same trajectory give different results {differ}.")
    differ = _same(results(_fit(first, trajectory), X, y), a)
    if differ:
        _fail(estimator, f"refitting the same instance changes the results {differ}.")
    if not a:
        _fail(estimator, "the fitted estimator produced no results to compare.")


def _has_query(estimator: Any) -> bool:
    """Whether :func:`results` reads ``predict``/``transform`` (rather than fitted attributes)."""
    return hasattr(estimator, "predict") or (
        hasattr(estimator, "transform") and _first_param(estimator.transform) == "X")


def check_dtype(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    # applies to query results; fitted attributes may keep a fixed dtype by contract (float64 pruning scores)
    if "dtype" not in _params(estimator) or not _has_query(estimator):
        return
    for dtype in ("float32", "float64"):
        est = _fit(_clone(estimator).set_params(dtype=dtype), trajectory)
        for key, value in results(est, X, y).items():
            arr = np.asarray(value) if isinstance(value, np.ndarray) else None
            if arr is not None and arr.dtype.kind == "f" and arr.dtype != np.dtype(dtype):
                _fail(estimator, f"with dtype={dtype!r} the result {key!r} has dtype {arr.dtype}.")


#: ``(name, check)`` in the order they run.
ESTIMATOR_CHECKS: tuple[tuple[str, EstimatorCheck], ...] = (
    ("init_keyword_only", check_init_keyword_only),
    ("default_params", check_default_params),
    ("config_defaults", check_config_defaults),
    ("set_params_and_clone", check_set_params_and_clone),
    ("not_fitted", check_not_fitted),
    ("fit_returns_self", check_fit_returns_self),
    ("fitted_attributes", check_fitted_attributes),
    ("invalid_params_at_fit", check_invalid_params_at_fit),
    ("fit_rejects_wrong_input", check_fit_rejects_wrong_input),
    ("copy_round_trip", check_copy_round_trip),
    ("deterministic", check_deterministic),
    ("dtype", check_dtype),
)


def estimator_checks(estimator: Any) -> Iterator[tuple[str, EstimatorCheck]]:
    """Yield ``(name, check)``; call ``check(estimator, trajectory, X, y=None)``."""
    del estimator  # every check applies to every estimator; the argument mirrors sklearn's API
    yield from ESTIMATOR_CHECKS


def check_estimator(estimator: Any, trajectory: Any, X: Any, y: Any = None) -> None:
    """Run every check; raise :class:`EstimatorCheckError` listing all failures.

    Parameters
    ----------
    estimator : explaind estimator
        An unfitted instance configured as it should be checked (it is cloned, never modified).
    trajectory : explaind.Trajectory or tuple
        A small recorded run to fit on, or the tuple of positional ``fit`` arguments (e.g.
        ``(model, data, trajectory)`` for a pruning strategy).
    X : Tensor
        Test inputs, shape ``(n, ...)``.
    y : Tensor, optional
        Test targets, passed to ``transform`` (needed for ``target="loss"``).
    """
    failures: list[tuple[str, str]] = []
    for name, check in estimator_checks(estimator):
        try:
            check(estimator, trajectory, X, y)
        except Exception as exc:
            failures.append((name, f"{type(exc).__name__}: {exc}"))
    if failures:
        lines = "\n".join(f"  - {n}: {m}" for n, m in failures)
        raise EstimatorCheckError(
            f"{type(estimator).__name__} failed {len(failures)} conformance check(s):\n{lines}", failures
        )


def parametrize_with_checks(estimators: Sequence[Any], argnames: str = "estimator, check") -> Any:
    """A ``pytest.mark.parametrize`` decorator with one test per (estimator, check).

    Examples
    --------
    >>> @parametrize_with_checks([KernelReplica(), InfluenceEstimator(keep=("train",))])  # doctest: +SKIP
    ... def test_conformance(estimator, check, trajectory, X):
    ...     check(estimator, trajectory, X)
    """
    import pytest

    params = []
    for est in estimators:
        for name, check in estimator_checks(est):
            params.append(pytest.param(est, check, id=f"{type(est).__name__}::{name}"))
    return pytest.mark.parametrize(argnames, params)
