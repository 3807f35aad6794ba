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
from ..outputs import model_output
from ._random import draws_masks, is_spectral_norm

__all__ = ["attribute_snapshot", "cached_methods_hint", "mode_branch_hint", "requires_grad_message", "stateful_message",
           "switched_off"]

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


def mode_branch_hint(model: nn.Module, params: dict[str, Tensor], inputs: Any) -> str:
    """A sentence when the model's forward is deterministic in training mode (two forwards under different seeds
    agree) but gives other outputs in evaluation mode, in which explaind recomputes gradients when no training
    forward is replayed: a branch on ``self.training``, or buffers the training forward updates in place (named
    first); a sentence naming the state a forward keeps between calls when two training forwards under the same
    seed differ (:func:`stateful_message`); another when two under different seeds differ, though no module draws
    masks (dropout drawn in ``forward`` itself, ``F.dropout``).
    ``""`` otherwise (the buffers of the generic hint), and for a model whose modules differ between the modes
    themselves (dropout, batch norm, spectral norm)."""
    if any(draws_masks(m) or is_spectral_norm(m) or isinstance(m, nn.modules.batchnorm._NormBase)
           for m in model.modules()):
        return ""
    modes = [(m, m.training) for m in model.modules()]
    state = {**{n: b.detach().clone() for n, b in model.named_buffers()}, **{n: p.detach() for n, p in params.items()}}
    before = attribute_snapshot(model)
    outs, drew, updated = [], False, set()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for seed, training in ((0, True), (1, True), (0, False), (0, True)):
                model.train(training)
                torch.manual_seed(seed)
                start = torch.random.get_rng_state()
                fresh = {n: t.clone() if n not in params else t for n, t in state.items()}  # buffers as they were
                outs.append(model_output(call_model(model, fresh, inputs)))
                if training:  # a buffer the training forward writes in place (running statistics it merges)
                    updated |= {n for n, t in fresh.items() if n not in params and not torch.equal(t, state[n])}
                drew = drew or (training and not torch.equal(start, torch.random.get_rng_state()))
    except Exception as exc:  # the diagnosis must not hide the check's own message
        logger.debug("The evaluation-mode diagnosis failed: %s", exc)
        return ""
    finally:
        for m, training in modes:
            m.training = training
    if not torch.equal(outs[0], outs[3]):
        return stateful_message(model, before)
    if drew or not torch.equal(outs[0], outs[1]):  # draws that leave the value unchanged (mixout at its anchor)
        why = ("two training forwards under different seeds differ" if not torch.equal(outs[0], outs[1]) else
               "it advances torch's generator, though its outputs here do not depend on the draws")
        return (f" The model's training forward draws random numbers though none of its modules is a dropout layer "
                f"({why}): dropout drawn in forward itself, such as "
                f"F.dropout or F.scaled_dot_product_attention(dropout_p > 0) (Hugging Face attention with the config's"
                f" attention dropout) or mixout's torch.rand, whose masks are not captured under "
                f"capture_random='auto'. Fix: record with capture_random=True, which replays the training forwards.")
    if torch.equal(outs[0], outs[2]):
        return ""
    if updated:
        return (f" The model's training forward updates the buffer(s) {sorted(updated)} in place (running "
                f"statistics, as an input normaliser merging each batch or batch norm written with F.batch_norm keeps) "
                f"and gives other outputs in evaluation mode than in training mode; without replayed training "
                f"forwards explaind recomputes gradients and explains in evaluation mode. Fix: record with "
                f"capture_random=True, which replays every training forward with the buffers recorded at its step.")
    return (" The model's forward gives other outputs in evaluation mode than in training mode on this batch "
            "(without random draws: two training forwards agree), and explaind recomputes gradients and explains in "
            "evaluation mode: a branch on self.training, such as probabilities returned only in evaluation mode. "
            "Fix: return the same outputs in both modes (apply softmax outside the model), or record with "
            "capture_random=True, which replays the training forwards.")
