"""Building registered architectures by name.

:func:`build_model` looks an architecture up in the registry, validates its configuration,
builds the module deterministically from a seed and tags it with a plain-dict attribute
``explaind_spec``::

    model.explaind_spec == {"name": "mlp", "config": {...JSON values...}, "seed": 0}

A recorder stores this spec in the trajectory manifest, so :meth:`explaind.Trajectory.load` can
rebuild the model with :func:`model_from_spec` without any user code. The module itself is an
ordinary instance of the factory's class (no subclassing, no wrapper).

Before anything is allocated, :func:`build_model` asks the architecture's ``parameter_count``
(a field of its record) how many parameter and buffer elements the config builds and refuses
more than :func:`resolve_max_parameters` (default :data:`DEFAULT_MAX_PARAMETERS`, or the environment
variable ``EXPLAIND_MAX_PARAMETERS``): a config from a stranger's store cannot make it allocate
40 GB.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from ._compiled import EAGER_RANDOM_BACKENDS, FALLBACK_FIX, compile_backend, compiled_callables
from .config import resolve_dtype, validate_config
from .exceptions import ConfigError, TrajectoryError, UnsupportedModelError

__all__ = [
    "build_model",
    "model_from_spec",
    "count_parameters",
    "resolve_max_parameters",
    "SPEC_ATTRIBUTE",
    "DEFAULT_MAX_PARAMETERS",
    "MAX_PARAMETERS_ENV",
    "refuse_renormalising_embeddings",
    "refuse_sparse_embeddings",
    "refuse_script_modules",
    "backward_hooks_off",
    "copy_memo",
    "drop_backward_hooks",
    "gradient_hooks",
    "gradient_hooks_hint",
    "refuse_compiled_draws",
    "refuse_mixed_modes",
    "compile_backend",
    "EAGER_RANDOM_BACKENDS",
]

logger = logging.getLogger(__name__)

#: Name of the attribute carrying the build spec on modules made by :func:`build_model`.
SPEC_ATTRIBUTE = "explaind_spec"
#: Largest number of parameter and buffer elements :func:`build_model` builds by default (1 GB in float32).
DEFAULT_MAX_PARAMETERS = 250_000_000
#: Environment variable overriding :data:`DEFAULT_MAX_PARAMETERS`.
MAX_PARAMETERS_ENV = "EXPLAIND_MAX_PARAMETERS"


def resolve_max_parameters(limit: int | None = None) -> int:
    """The size limit in elements: ``limit`` when given, else ``$EXPLAIND_MAX_PARAMETERS``, else the default.

    Raises
    ------
    ConfigError
        For a limit that is not a positive integer (the message names where it came from).
    """
    source = "max_parameters"
    if limit is None:
        raw = os.environ.get(MAX_PARAMETERS_ENV)
        if raw is None or not raw.strip():
            return DEFAULT_MAX_PARAMETERS
        source = f"${MAX_PARAMETERS_ENV}"
        try:
            limit = int(raw.strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"{source}={raw!r} is not an integer. Set it to the largest number of model "
                              f"parameters to build, e.g. {MAX_PARAMETERS_ENV}=1000000000.") from None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"{source}={limit!r} must be a positive integer: the largest number of parameter and "
                          f"buffer elements to build (default {DEFAULT_MAX_PARAMETERS:,}).")
    return limit


def count_parameters(name: str, config: BaseModel | dict[str, Any] | None = None) -> int | None:
    """Parameter and buffer elements that ``build_model(name, config)`` allocates, computed without allocating.

    Returns
    -------
    int or None
        The architecture's ``parameter_count(config)``; ``None`` when its record declares none.

    Raises
    ------
    UnknownEntryError, ConfigError
        For an unknown name or an invalid config.
    """
    from .plugins import get_entry

    record = get_entry("architecture", name)
    return _declared_count(record, _validated(record, config))


def _declared_count(record: Any, cfg: BaseModel) -> int | None:
    counter = getattr(record, "parameter_count", None)
    if counter is None:
        return None
    count = counter(cfg)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(f"The parameter_count of architecture {record.name!r} returned {count!r}, not a "
                          f"non-negative int; the plugin providing it is broken.")
    return count


def _size_message(name: str, count: int, limit: int) -> str:
    return (f"architecture {name!r} with this config has {count:,} parameter and buffer elements, more than the "
            f"limit of {limit:,} (about {4 * count / 1e9:.1f} GB in float32). If the size is intended, raise the "
            f"limit: max_parameters=<n> (or the environment variable {MAX_PARAMETERS_ENV}=<n>); otherwise fix "
            f"the config's sizes.")


def _validated(record: Any, config: BaseModel | dict[str, Any] | None) -> BaseModel:
    owner = f"architecture {record.name!r}"
    if config is None:
        config = {}
    if isinstance(config, BaseModel):
        if isinstance(config, record.config):
            return config
        config = config.model_dump()  # a model of another class: validate its fields
    if not isinstance(config, dict):
        raise ConfigError(
            f"{owner}: config must be a dict or a {record.config.__name__} instance; got {type(config).__name__}. "
            f"Pass e.g. {record.config().model_dump(mode='json')!r}."
        )
    return validate_config(record.config, config, owner)


def build_model(
    name: str,
    config: BaseModel | dict[str, Any] | None = None,
    *,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    max_parameters: int | None = None,
) -> nn.Module:
    """Build a registered architecture (its size is checked first, see the module docstring).

    Parameters
    ----------
    name : str
        Architecture name, e.g. ``"mlp"``, ``"cnn"`` or ``"modular_transformer"``
        (see ``explaind.list_entries("architecture")``).
    config : dict or pydantic model, optional
        Configuration; missing fields take their defaults. A dict is validated against the
        architecture's config model, a model of that class is used as is.
    seed : int
        Seed of the local generator the weights are drawn from; the global RNG is untouched.
    dtype : {"float32", "float64"} or torch.dtype, optional
        Floating dtype of the parameters (default: float32, as built).
    max_parameters : int, optional
        Refuse configs of more parameter and buffer elements (default: ``$EXPLAIND_MAX_PARAMETERS``
        or :data:`DEFAULT_MAX_PARAMETERS`).

    Returns
    -------
    torch.nn.Module
        On the CPU, in training mode, with ``model.explaind_spec`` set to
        ``{"name": name, "config": <JSON dict>, "seed": seed}``.

    Raises
    ------
    UnknownEntryError
        For an unknown architecture name (the message lists the choices).
    ConfigError
        For an invalid config, seed or dtype, or a config above the size limit; the message names the
        field and the value (the limit and how to raise it).
    """
    from .plugins import get_entry

    record = get_entry("architecture", name)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int; got {seed!r}. Pass e.g. seed=0.")
    torch_dtype = resolve_dtype(dtype, default=torch.float32)
    cfg = _validated(record, config)
    limit = resolve_max_parameters(max_parameters)
    declared = _declared_count(record, cfg)
    if declared is None:
        logger.info("Architecture %r declares no parameter_count: its size is checked after building.", name)
    elif declared > limit:
        raise ConfigError(_size_message(record.name, declared, limit))
    module = record.implementation(cfg, seed=seed)
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"The factory of architecture {name!r} returned {type(module).__name__}, not a torch.nn.Module; "
            f"the plugin providing it is broken."
        )
    built = sum(t.numel() for t in [*module.parameters(), *module.buffers()])
    if declared is not None and built != declared:
        raise ConfigError(f"Architecture {name!r}: parameter_count says {declared:,} elements, the factory built "
                          f"{built:,}; the plugin providing it is broken.")
    if built > limit:
        raise ConfigError(_size_message(record.name, built, limit))
    module = module.to(torch_dtype)
    spec = {"name": record.name, "config": json.loads(cfg.model_dump_json()), "seed": seed}
    setattr(module, SPEC_ATTRIBUTE, spec)
    return module


def model_from_spec(spec: dict[str, Any], *, dtype: str | torch.dtype | None = None,
                    max_parameters: int | None = None) -> nn.Module:
    """Rebuild a model from a stored ``explaind_spec`` dict.

    Parameters
    ----------
    spec : dict
        ``{"name": str, "config": dict, "seed": int}`` as set by :func:`build_model`.
    dtype : {"float32", "float64"} or torch.dtype, optional
    max_parameters : int, optional
        Size limit (see :func:`build_model`).

    Returns
    -------
    torch.nn.Module
        The same initial weights as the original build (load trained weights on top).
    """
    if not isinstance(spec, dict) or not {"name", "config", "seed"} <= set(spec):
        raise ConfigError(
            f"A model spec must be a dict with keys 'name', 'config' and 'seed'; got {spec!r}. "
            f"It is the {SPEC_ATTRIBUTE!r} attribute of a model made by explaind.build_model."
        )
    return build_model(spec["name"], spec["config"], seed=spec["seed"], dtype=dtype, max_parameters=max_parameters)


def refuse_renormalising_embeddings(model: nn.Module, where: str) -> None:
    """Refuse a model with an ``nn.Embedding(max_norm=...)`` or ``nn.EmbeddingBag(max_norm=...)``: its forward
    rewrites the table in place.

    Torch renormalises the looked-up rows of such a table inside the forward (``embedding_renorm_``
    on the weight, outside autograd), so the parameters change between optimizer steps without an
    update the recorder sees, and an explained forward would rewrite the recorded parameters it is
    given. Neither can be decomposed exactly, so the model is refused before anything runs.

    Raises
    ------
    UnsupportedModelError
        Naming every such embedding and the fix.
    """
    found = [f"{name or type(m).__name__} (max_norm={m.max_norm})" for name, m in model.named_modules()
             if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None]
    if found:
        raise UnsupportedModelError(
            f"{where}: the embeddings {found} renormalise their rows in place during every forward (max_norm), "
            f"which changes the parameters outside the optimizer's steps and would rewrite the recorded ones; "
            f"that cannot be decomposed exactly. Allowed: nn.Embedding and nn.EmbeddingBag with max_norm=None. "
            f"Fix: build the embedding with max_norm=None and, if the norm cap matters, apply it without changing "
            f"the table, e.g. rows = emb(x); rows = rows * (max_norm / rows.norm(dim=-1, keepdim=True)).clamp(max=1).")


def refuse_sparse_embeddings(model: nn.Module, where: str) -> None:
    """Refuse ``nn.Embedding(sparse=True)`` and ``nn.EmbeddingBag(sparse=True)``: their gradients are sparse tensors;
    and ``scale_grad_by_freq=True``, whose gradients couple the samples of a batch.

    The recorder reads, checks and stores dense gradients; the model's function does not depend on
    ``sparse``, so the dense layer trains and explains the same model.

    Raises
    ------
    UnsupportedModelError
        Naming every such embedding and the fix.
    """
    scaled = [name or type(m).__name__ for name, m in model.named_modules()
              if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.scale_grad_by_freq]
    if scaled:
        raise UnsupportedModelError(
            f"{where}: the embeddings {scaled} have scale_grad_by_freq=True, so backward() divides each row's "
            f"gradient by how often its index occurs in the whole batch: a sample's share of the update depends on "
            f"the other samples, while explaind splits it into per-sample gradients (each computed alone, they "
            f"would be scaled by the counts within that sample), and the split would be inexact although the "
            f"gradient check passes. Allowed: scale_grad_by_freq=False (the default). Fix: build them with "
            f"scale_grad_by_freq=False; if rare tokens need larger steps, use an optimizer that adapts per "
            f"coordinate (Adam, AdamW, Adagrad), which explaind records.")
    found = [name or type(m).__name__ for name, m in model.named_modules()
             if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse]
    if found:
        raise UnsupportedModelError(
            f"{where}: the embeddings {found} have sparse=True, so backward() gives them sparse gradients, which "
            f"explaind does not record. Allowed: sparse=False (the default). Fix: build them with sparse=False; "
            f"the model's function is the same, and torch's optimizers then update them with dense gradients "
            f"(torch.optim.SparseAdam takes only sparse ones: train them with Adam or AdamW, which explaind records; "
            f"unlike SparseAdam's lazy update they also move the rows a batch did not use).")


def refuse_script_modules(model: nn.Module, where: str) -> None:
    """Refuse a model holding a ``torch.jit.script``/``torch.jit.trace`` module: torch cannot hook or transform it.

    The recorder observes the forward through module hooks, which TorchScript modules refuse, and the
    engine evaluates the model under ``torch.func`` (``vmap``, ``jvp``), which cannot run a compiled
    TorchScript graph.

    Raises
    ------
    UnsupportedModelError
        Naming every such module and the fix.
    """
    found: list[str] = []
    for name, m in model.named_modules():  # the outermost ones: their submodules are TorchScript too
        if isinstance(m, torch.jit.ScriptModule) and not any(name.startswith(f"{f}.") for f in found):
            found.append(name)
    found = [name or "the model" for name in found]
    if found:
        raise UnsupportedModelError(
            f"{where}: {found} {'is a TorchScript module' if len(found) == 1 else 'are TorchScript modules'} "
            f"(torch.jit.script or torch.jit.trace), which take no module hooks and which torch.func (vmap, jvp) "
            f"cannot transform, so the run can be neither recorded nor explained. Allowed: eager nn.Module "
            f"submodules (torch.compile(..., backend='eager' or 'aot_eager') too). Fix: keep the module you "
            f"scripted and use it unscripted while recording and explaining; its function is the same.")


@contextlib.contextmanager
def backward_hooks_off(model: nn.Module) -> Iterator[None]:
    """Inside the block, forwards of ``model`` set up none of its modules' backward hooks.

    Module backward hooks (``register_full_backward_hook``, ``register_full_backward_pre_hook``,
    ``register_backward_hook``) change no output, only what ``backward()`` leaves in ``.grad``, and torch
    runs the full ones through an ``autograd.Function`` that ``torch.func`` cannot transform. explaind
    recomputes every gradient without them (the gradient check too), so a hook that only observes
    leaves the run exact and one that rewrites gradients is caught by the gradient check (or, with the
    check off, by the residual share). The hooks are restored when the block ends.
    """
    saved = [(m, dict(m._backward_hooks), dict(m._backward_pre_hooks), m._is_full_backward_hook)
             for m in model.modules() if m._backward_hooks or m._backward_pre_hooks]
    drop_backward_hooks(model)
    try:
        yield
    finally:
        for m, hooks, pre_hooks, full in saved:
            m._backward_hooks.update(hooks)
            m._backward_pre_hooks.update(pre_hooks)
            m._is_full_backward_hook = full


def copy_memo(model: nn.Module, keep: Any = ()) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo for ``model``: the objects of ``keep`` kept, and each tensor a forward pre-hook left
    in a module's attributes as a result of the autograd graph replaced by a detached copy.

    ``torch.nn.utils.prune`` (``weight = weight_orig * weight_mask``) and the hook-based
    ``torch.nn.utils.weight_norm`` set such an attribute in every forward; after a training forward it
    is no graph leaf, which ``deepcopy`` refuses. Its value is recomputed at the copy's next forward.
    """
    memo: dict[int, Any] = {id(o): o for o in keep}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return memo


def drop_backward_hooks(model: nn.Module) -> None:
    """Remove every module backward hook of ``model`` for good (explaind's private copies; see
    :func:`backward_hooks_off`)."""
    for m in model.modules():
        m._backward_hooks.clear()
        m._backward_pre_hooks.clear()
        m._is_full_backward_hook = None


def gradient_hooks(model: nn.Module) -> list[str]:
    """Names of the modules with backward hooks and of the parameters with tensor hooks (``p.register_hook``)."""
    found = [f"module {name or type(m).__name__!r}" for name, m in model.named_modules()
             if m._backward_hooks or m._backward_pre_hooks]
    found += [f"parameter {name!r}" for name, p in model.named_parameters() if getattr(p, "_backward_hooks", None)]
    return found


def refuse_compiled_draws(model: nn.Module, loss: Any = None) -> None:
    """Refuse compiled code whose random draws eager PyTorch cannot replay: the model, a submodule, a function a
    module holds (``model.forward = torch.compile(model.forward)``) or the recorder's ``loss`` callable.

    The recorder calls it for models that draw random numbers (dropout, private generators,
    ``capture_random=True``): the engine replays every training forward in eager PyTorch. The backends allowed
    are :data:`EAGER_RANDOM_BACKENDS` and inductor with ``torch._inductor.config.fallback_random = True``
    (:mod:`explaind._compiled`).

    Raises
    ------
    ConfigError
        Naming each compiled callable, its backend and the fix.
    """
    found = compiled_callables(model, loss)
    if not found:
        return
    raise ConfigError(
        f"TrajectoryRecorder: compiled code draws random numbers with the compiler's own generator: "
        f"{'; '.join(found[:4])}. explaind replays every training forward and the loss in eager PyTorch from the "
        f"random state it captured, so the dropout masks and other draws would differ from the loop's and the "
        f"split over samples would be inexact. Fix: {FALLBACK_FIX}; or record the uncompiled model."
    )


def refuse_mixed_modes(modules: list[tuple[str, nn.Module]], root: nn.Module) -> None:
    """Raise when a module of ``modules`` (dropout, batch norm, spectral norm) is in another mode than ``root``.

    The engine replays a training forward with every module in training mode (and recomputes an
    evaluation forward with every module in evaluation mode), so a module the loop switched on its own
    (frozen batch norm, one dropout turned off with ``.eval()``) would be replayed otherwise than it ran.

    Raises
    ------
    TrajectoryError
        Naming the modules and the fix.
    """
    off = [name for name, m in modules if m.training != root.training]
    if not off:
        return
    mode, other = ("training", "evaluation") if root.training else ("evaluation", "training")
    raise TrajectoryError(
        f"A forward of the recorded model ran in {mode} mode with the module(s) {off} in {other} mode. "
        f"explaind replays every training forward with all modules in the model's own mode, so these modules' "
        f"masks or batch statistics would differ from the loop's and the split over samples would be inexact. "
        f"Fix: keep these modules in the model's mode while recording; for frozen batch norm use a module that "
        f"applies the running statistics in both modes (e.g. torchvision.ops.FrozenBatchNorm2d), and switch a "
        f"dropout off with p=0 rather than .eval()."
    )


def gradient_hooks_hint(model: nn.Module) -> str:
    """Names the gradient hooks of ``model`` (``""`` when none) for a failed gradient check."""
    hooked = gradient_hooks(model)
    if not hooked:
        return ""
    return (f" The model has gradient hooks ({', '.join(hooked[:4])}{', ...' if len(hooked) > 4 else ''}), which "
            f"change what backward() leaves in .grad but no output; explaind recomputes gradients without them, so a "
            f"hook that rescales or edits gradients makes the recorded update the gradient of no loss. Fix: remove "
            f"such hooks (a hook that only reads gradients is fine); scale a layer's update with a parameter group's "
            f"lr instead.")
