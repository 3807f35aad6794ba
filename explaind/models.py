"""Building registered architectures by name.

:func:`build_model` looks an architecture up in the registry, validates its configuration,
builds the module deterministically from a seed and tags it with a plain-dict attribute
``explaind_spec``::

    model.explaind_spec == {"name": "mlp", "config": {...JSON values...}, "seed": 0}

A recorder stores this spec in the trajectory manifest, so :meth:`explaind.Trajectory.load` can
rebuild the model with :func:`model_from_spec` without any user code. The module itself is an
ordinary instance of the factory's class (no subclassing, no wrapper).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from .config import resolve_dtype, validate_config
from .exceptions import ConfigError

__all__ = ["build_model", "model_from_spec", "SPEC_ATTRIBUTE"]

#: Name of the attribute carrying the build spec on modules made by :func:`build_model`.
SPEC_ATTRIBUTE = "explaind_spec"


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
) -> nn.Module:
    """Build a registered architecture.

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
        For an invalid config, seed or dtype; the message names the field and the value.
    """
    from .plugins import get_entry

    record = get_entry("architecture", name)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int; got {seed!r}. Pass e.g. seed=0.")
    torch_dtype = resolve_dtype(dtype, default=torch.float32)
    cfg = _validated(record, config)
    module = record.implementation(cfg, seed=seed)
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"The factory of architecture {name!r} returned {type(module).__name__}, not a torch.nn.Module; "
            f"the plugin providing it is broken."
        )
    module = module.to(torch_dtype)
    spec = {"name": record.name, "config": json.loads(cfg.model_dump_json()), "seed": seed}
    setattr(module, SPEC_ATTRIBUTE, spec)
    return module


def model_from_spec(spec: dict[str, Any], *, dtype: str | torch.dtype | None = None) -> nn.Module:
    """Rebuild a model from a stored ``explaind_spec`` dict.

    Parameters
    ----------
    spec : dict
        ``{"name": str, "config": dict, "seed": int}`` as set by :func:`build_model`.
    dtype : {"float32", "float64"} or torch.dtype, optional

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
    return build_model(spec["name"], spec["config"], seed=spec["seed"], dtype=dtype)
