"""Diagnoses of forwards that change state when they run: attributes a forward reassigns or global state it reads
(a key/value cache, a call counter, a method under ``functools.lru_cache``), which make its output no function of
its inputs and parameters, and ``requires_grad`` flags a forward switches on the parameters it is given
(docs/guide_own_model.md, "Round 12: caches, global state, input branches, singular points, depth and width").
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import Tensor, nn

from ..inputs import call_model

__all__ = ["attribute_snapshot", "cached_methods_hint", "requires_grad_message", "stateful_message", "switched_off"]

logger = logging.getLogger(__name__)


def attribute_snapshot(model: nn.Module) -> dict[tuple[str, str], Any]:
    """Every plain attribute of every submodule (not its parameters, buffers, submodules, hooks or mode), by
    ``(module path, attribute name)``, as the objects they hold now."""
    return {(path, key): value for path, m in model.named_modules() for key, value in vars(m).items()
            if not key.startswith("_") and key != "training"}


def stateful_message(model: nn.Module, before: dict[tuple[str, str], Any]) -> str:
    """The sentence for a forward that keeps state between calls (two training forwards under the same seed, at the
    same parameters and buffers, differ), naming the attributes of ``model``'s modules it reassigned since
    ``before`` (:func:`attribute_snapshot`)."""
    classes = dict(model.named_modules())
    changed = [f"{path or '<root>'}.{key} ({type(classes[path]).__name__})"
               for (path, key), value in attribute_snapshot(model).items()
               if (path, key) in before and before[(path, key)] is not value]
    where = (f"it reassigns {changed} in forward" if changed else
             "it reads state that changes between calls outside its modules: a module-level counter or flag, a "
             "global cache")
    return (" The model's forward keeps state between calls: two training forwards under the same seed, at the same "
            f"parameters, inputs and buffers, differ ({where}; a key/value cache, a running counter, the previous "
            "batch's activations), so its output is not a function of its input and parameters, and explaind "
            "evaluates it many times at other parameters. capture_random=True does not help: the state is not "
            "random. Fix: compute every forward from its inputs and parameters alone (a cache may hold only tensors "
            "that depend on neither; switch key/value caching off, use_cache=False, while training and "
            "explaining).")


def switched_off(model: nn.Module, params: dict[str, Tensor], inputs: Any) -> list[str]:
    """The names of ``params`` whose ``requires_grad`` the model's forward (in its current mode, on ``inputs``)
    switches off when it is given leaves that require grad."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    try:
        with torch.no_grad():
            call_model(model, leaves, inputs)
    except Exception as exc:  # the diagnosis must not hide the error it explains
        logger.debug("The requires_grad probe failed: %s", exc)
        return []
    return [n for n, leaf in leaves.items() if not leaf.requires_grad]


def requires_grad_message(names: list[str], step: int) -> str:
    """The refusal of a forward that switches off ``requires_grad`` of the parameters ``names``."""
    which = names if names else "some of the parameters it is given"
    return (f"Step {step}: the model's forward in evaluation mode switches off requires_grad of {which} (such as "
            "p.requires_grad_(self.training) in forward, to save memory at inference), and explaind recomputes "
            "gradients and explains in evaluation mode with the parameters it passes to the forward, so their "
            "gradients cannot be taken (torch: 'can't retain_grad on Tensor that has requires_grad=False'). Fix: do "
            "not change requires_grad inside forward: freeze parameters before recording (p.requires_grad_(False) "
            "and leave them out of the optimizer), and run inference under torch.no_grad() or "
            "torch.inference_mode() instead.")


@functools.cache
def _cached_methods(cls: type) -> tuple[str, ...]:
    """The names of ``cls``'s methods (its own or inherited) under ``functools.lru_cache`` or ``functools.cache``."""
    names = {name for klass in cls.__mro__ for name, value in vars(klass).items()
             if isinstance(value, functools._lru_cache_wrapper)}
    return tuple(sorted(names))


def cached_methods_hint(model: nn.Module) -> str:
    """A sentence naming the methods of ``model``'s modules cached by ``functools.lru_cache``/``functools.cache``
    that hold entries now (``""`` when none): a tensor such a method computed from the parameters keeps the values
    of the call that filled the cache."""
    found = []
    for m in model.modules():
        for name in _cached_methods(type(m)):
            info = getattr(type(m), name).cache_info()
            if info.currsize:
                found.append(f"{type(m).__name__}.{name}")
    if not found:
        return ""
    return (f" Methods of the model's modules are cached by functools.lru_cache or functools.cache and hold entries "
            f"({sorted(set(found))[:6]}): a tensor such a method computed from the parameters keeps the values (and "
            f"the graph) of the call that filled the cache, so later forwards, the loop's and explaind's at other "
            f"parameter values, read it stale and no gradient reaches the parameters through it. Fix: compute such "
            f"tensors in forward without a cache (cache only tensors that depend on no parameter).")
