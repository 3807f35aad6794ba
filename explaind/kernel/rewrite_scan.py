r"""Whether a model's forward code can reach a function the rewrite mode replaces.

docs/engine.md ("Operations torch cannot transform") has the user's side.

:class:`~explaind.kernel.explained.FunctionalModel` runs a model that holds none of the modules of
:func:`~explaind.kernel.rewrites.needs_rewrite` in the rewrite mode for its first forward only (the census) and
keeps the mode when that forward rewrote something. A forward that calls a rewritten function on a branch the
census did not take (an input of another shape, a flag, state the forward keeps) ran it without the mode: for most
of them torch raises its forward-AD error and the call is retried in the mode, but ``F.hardsigmoid`` and
``F.prelu`` run, with torch's derivative (``float32(1/6)`` for ``hardsigmoid``: the path integral then stalls at
:math:`3 \cdot 10^{-8}` relative), and ``F.rrelu`` raises a ``vmap`` error that is no forward-AD error.

:func:`reachable_rewrite` reads the code, not the run: before the first forward it walks the Python functions the
model's modules can call, and reports the first name of a rewritten function (:data:`NAMES`) it meets, so that the
mode is on for every evaluation of such a model whichever branch runs. The functions walked are, for every module
of the model whose class is not torch's own (torch's modules are :func:`needs_rewrite`'s): the methods of its class
and base classes (plain, static, class methods and properties), the functions and ``functools.partial`` objects it
holds as attributes, its forward hooks; then, from each function's code and the code nested in it (lambdas, inner
functions), the names it loads (``F.hardsigmoid`` loads ``hardsigmoid``) and its string constants (``getattr(F,
"hardsigmoid")``), and the functions those names are bound to in its globals or its closure, outside torch, up to
:data:`LIMIT` functions. A function object that is itself a rewritten one (``act = F.hardsigmoid`` as an attribute
or a global under another name) counts too. The scan errs on the side of the mode: a name met in a branch that
never runs turns the mode on (every evaluation then pays the mode's cost, a few percent, docs/engine.md), never
off. What it cannot see: a rewritten function reached through an object it does not walk (a module object of
another package, an instance of a class that is no ``nn.Module``); there the census and the forward-AD retry stand
as before.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from typing import Any

from torch import nn

from .recurrent import KINDS
from .rewrites import _PLAIN

__all__ = ["LIMIT", "NAMES", "reachable_rewrite"]

#: The names of the functions the rewrite mode replaces, as code loads them (``F.grid_sample``: ``grid_sample``).
NAMES = frozenset({*(f.__name__ for f in _PLAIN), *KINDS, "pack_padded_sequence", "_pack_padded_sequence"})
#: Functions read at most per model.
LIMIT = 4000

_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)


def _is_torch(owner: Any) -> bool:
    name = getattr(owner, "__module__", None) or ""
    return name == "torch" or name.startswith("torch.")


def _rewritten(value: Any) -> str | None:
    """The name of ``value`` when it is a rewritten function (or a partial of one)."""
    while isinstance(value, functools.partial):
        value = value.func
    if isinstance(value, types.FunctionType | types.BuiltinFunctionType) and value in _PLAIN:
        return value.__name__
    return None


def _functions(value: Any) -> Iterator[types.FunctionType]:
    """The Python functions ``value`` holds: itself, a method's function, a partial's, a property's accessors."""
    if isinstance(value, staticmethod | classmethod | types.MethodType):
        value = value.__func__
    while isinstance(value, functools.partial):
        value = value.func
    if isinstance(value, property):
        yield from (f for f in (value.fget, value.fset) if isinstance(f, types.FunctionType))
    elif isinstance(value, types.FunctionType) and not _is_torch(value):
        yield value
        wrapped = getattr(value, "__wrapped__", None)  # a decorator's wrapper (functools.wraps): the function too
        if wrapped is not None:
            yield from _functions(wrapped)


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and the code objects nested in it."""
    stack = [code]
    while stack:
        c = stack.pop()
        yield c
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))


def _entry_points(model: nn.Module) -> tuple[list[types.FunctionType], dict[str, list[types.FunctionType]], str | None]:
    """The functions the forward starts from (the classes' ``forward`` and ``__call__``, held functions, forward
    hooks), the methods of the modules' classes by name, and a rewritten function held as an attribute."""
    found: list[types.FunctionType] = []
    methods: dict[str, list[types.FunctionType]] = {}
    classes: set[type] = set()
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls in classes or cls is object or _is_torch(cls):
                continue
            classes.add(cls)
            for key, value in vars(cls).items():
                methods.setdefault(key, []).extend(_functions(value))
        for value in [*vars(module).values(), *module._forward_pre_hooks.values(), *module._forward_hooks.values()]:
            if isinstance(value, _FUNCTIONS):
                name = _rewritten(value)
                if name is not None:
                    return found, methods, name
                found.extend(_functions(value))
    return [*found, *methods.get("forward", ()), *methods.get("__call__", ())], methods, None


def reachable_rewrite(model: nn.Module) -> str | None:
    """The name of a rewritten function the forward code of ``model`` can reach (module docstring), or ``None``.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    str or None
        E.g. ``"hardsigmoid"`` for a forward calling ``F.hardsigmoid`` on any branch, or a helper that does.
    """
    queue, methods, held = _entry_points(model)
    if held is not None:
        return held
    seen: set[types.CodeType] = set()
    while queue and len(seen) < LIMIT:
        fn = queue.pop()
        if fn.__code__ in seen:
            continue
        seen.add(fn.__code__)
        bound = dict(fn.__globals__)
        if fn.__closure__:
            for var, cell in zip(fn.__code__.co_freevars, fn.__closure__):
                try:
                    bound[var] = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
        for code in _codes(fn.__code__):
            loaded = set(code.co_names) | set(code.co_freevars) | {k for k in code.co_consts if isinstance(k, str)}
            hit = loaded & NAMES
            if hit:
                return min(hit)
            for name in code.co_names + code.co_freevars:
                value = bound.get(name)
                name_of = _rewritten(value)
                if name_of is not None:
                    return name_of
                queue.extend(_functions(value))
                queue.extend(methods.get(name, ()))  # self.name(...): a method of one of the modules' classes
    return None
