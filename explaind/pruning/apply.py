"""Applying masks: in place or on a copy, through ``torch.nn.utils.prune``, and on disk.

Three ways to use the masks of a :class:`~explaind.pruning.base.PruningStrategy`:

* :func:`apply_masks` zeroes the removed coordinates (on a copy by default);
* :func:`export_to_torch_prune` attaches them as ``torch.nn.utils.prune`` re-parametrisations
  (``weight = weight_orig * weight_mask``), so fine-tuning keeps the zeros and the usual torch
  tools (``prune.remove``, ``prune.is_pruned``) work; :func:`prune_global_by_scores` runs
  ``prune.global_unstructured`` with a strategy's scores as custom importance;
* :func:`save_pruned` / :func:`load_pruned` write and read a pruned model with its masks as one
  safetensors file (no pickle), with JSON metadata.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn
from torch.nn.utils import prune

from .._io import atomic_write
from ..exceptions import ConfigError
from .masks import scores_to_masks

__all__ = [
    "apply_masks",
    "export_to_torch_prune",
    "prune_global_by_scores",
    "masks_from_torch_prune",
    "remove_torch_prune",
    "save_pruned",
    "load_pruned",
    "FORMAT_NAME",
]

#: Value of the ``format`` metadata entry of files written by :func:`save_pruned`.
FORMAT_NAME = "explaind.pruned-model"
_FORMAT_VERSION = "1"
_STATE, _MASK = "state::", "mask::"
#: stored dtype -> model dtype that holds every value exactly (load_pruned accepts these besides equal dtypes)
_EXACT_CASTS = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
                (torch.bfloat16, torch.float64), (torch.float32, torch.float64)}


def _split(name: str) -> tuple[str, str]:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


def _module_and_leaf(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, leaf = _split(name)
    return (model.get_submodule(prefix) if prefix else model), leaf


def _effective_params(model: nn.Module) -> dict[str, Tensor]:
    """Parameter name -> tensor as used in the forward pass (``weight``, not ``weight_orig``)."""
    out: dict[str, Tensor] = {}
    for name, _ in model.named_parameters():
        if name.endswith("_orig"):
            module, leaf = _module_and_leaf(model, name)
            base = leaf[: -len("_orig")]
            if hasattr(module, base + "_mask"):
                out[name[: -len("_orig")]] = getattr(module, base)
                continue
        out[name] = model.get_parameter(name)
    return out


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    params = _effective_params(model)
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ConfigError(
            f"masks name parameters the model does not have: {unknown}. Model parameters: {list(params)}. "
            f"Compute the masks on this model (or one with the same architecture)."
        )
    for name, mask in masks.items():
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ConfigError(
                f"mask {name!r} has shape {tuple(mask.shape)} but the parameter has shape "
                f"{tuple(params[name].shape)}; masks must match the parameters they prune."
            )
        if mask.dtype != torch.bool:
            raise ConfigError(f"mask {name!r} has dtype {mask.dtype}; masks are boolean (True = kept).")
    return params


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor], *, inplace: bool = False) -> nn.Module:
    """Set the removed coordinates (``mask == False``) of the named parameters to zero.

    Parameters
    ----------
    model : torch.nn.Module
        The model to prune.
    masks : mapping of str to Tensor
        Boolean masks keyed by parameter name (``True`` = kept); parameters without a mask stay.
    inplace : bool
        Modify ``model`` itself instead of a deep copy.

    Returns
    -------
    torch.nn.Module
        The pruned model (``model`` itself when ``inplace``).
    """
    _check_masks(model, masks)
    target = model if inplace else copy.deepcopy(model)
    params = _effective_params(target)
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            module, leaf = _module_and_leaf(target, name)
            if hasattr(module, leaf + "_orig") and hasattr(module, leaf + "_mask"):
                # under torch pruning: zero the original and the mask, then refresh the derived tensor
                orig, old = getattr(module, leaf + "_orig"), getattr(module, leaf + "_mask")
                orig.mul_(mask.to(device=orig.device, dtype=orig.dtype))
                old.mul_(mask.to(device=old.device, dtype=old.dtype))
                setattr(module, leaf, orig * old)
            else:
                p.mul_(mask.to(device=p.device, dtype=p.dtype))
    return target


def export_to_torch_prune(model: nn.Module, masks: Mapping[str, Tensor], *, inplace: bool = True) -> nn.Module:
    """Attach the masks as ``torch.nn.utils.prune.custom_from_mask`` re-parametrisations.

    Every parameter whose mask removes at least one coordinate becomes ``<name>_orig`` (a
    parameter) and ``<name>_mask`` (a buffer); ``<name>`` is recomputed before each forward pass,
    so training keeps the removed coordinates at zero. A parameter already under torch pruning
    gets the new mask combined with the old one (torch semantics).

    Returns
    -------
    torch.nn.Module
        ``model`` (or a deep copy when ``inplace=False``).
    """
    _check_masks(model, masks)
    target = model if inplace else copy.deepcopy(model)
    for name, mask in masks.items():
        if bool(mask.all()):
            continue
        module, leaf = _module_and_leaf(target, name)
        device = getattr(module, leaf).device
        prune.custom_from_mask(module, leaf, mask=mask.to(device))
    return target


class _ScoreImportance(prune.BasePruningMethod):
    """Unstructured torch pruning method: removes the ``amount`` lowest *signed* importances.

    Ties are broken by position, exactly as :func:`explaind.pruning.masks.scores_to_masks` does.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: int) -> None:
        self.amount = int(amount)

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        order = torch.argsort(t.reshape(-1).to(torch.float64), stable=True)
        mask.view(-1)[order[: self.amount]] = 0
        return mask


def prune_global_by_scores(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    names: Iterable[str] | None = None,
) -> nn.Module:
    """Prune ``model`` in place with ``torch.nn.utils.prune.global_unstructured``, scores as importance.

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place (torch re-parametrisation, see :func:`export_to_torch_prune`).
    scores : mapping of str to Tensor
        Per-coordinate importances (e.g. ``strategy.scores_``); higher = kept. Signed scores are
        ranked by value, not by absolute value.
    sparsity : float
        Fraction of the coordinates of ``names`` removed.
    names : iterable of str, optional
        Parameters pruned together (default: every name in ``scores`` with 2+ dimensions, i.e.
        ``strategy.prunable_`` without exclusions).

    Returns
    -------
    torch.nn.Module
        ``model``. On fresh parameters the resulting masks equal
        ``scores_to_masks(scores, sparsity)`` restricted to ``names``.
    """
    selected = list(names) if names is not None else [n for n, s in scores.items() if s.dim() >= 2]
    if not selected:
        raise ConfigError("prune_global_by_scores: no parameter selected; pass names=[...] of parameters to prune.")
    masks_check = {n: torch.ones(scores[n].shape, dtype=torch.bool) for n in selected}
    _check_masks(model, masks_check)
    scores_to_masks({n: scores[n] for n in selected}, sparsity)  # validates sparsity and NaN
    parameters, importance = [], {}
    for name in selected:
        module, leaf = _module_and_leaf(model, name)
        parameters.append((module, leaf))
        device = getattr(module, leaf).device
        importance[(module, leaf)] = scores[name].detach().to(device=device, dtype=torch.float64)
    total = sum(scores[n].numel() for n in selected)
    amount = min(total, int(sparsity * total + 0.5))
    prune.global_unstructured(parameters, pruning_method=_ScoreImportance, importance_scores=importance,
                              amount=amount)
    return model


def masks_from_torch_prune(model: nn.Module) -> dict[str, Tensor]:
    """Boolean masks of every parameter (all ``True`` where torch pruning is not attached)."""
    out: dict[str, Tensor] = {}
    for name, tensor in _effective_params(model).items():
        module, leaf = _module_and_leaf(model, name)
        mask = getattr(module, leaf + "_mask", None)
        out[name] = (mask != 0).cpu() if mask is not None else torch.ones(tensor.shape, dtype=torch.bool)
    return out


def remove_torch_prune(model: nn.Module) -> nn.Module:
    """Make torch pruning permanent (``prune.remove`` on every re-parametrised parameter), in place."""
    for name in list(_effective_params(model)):
        module, leaf = _module_and_leaf(model, name)
        if prune.is_pruned(module) and hasattr(module, leaf + "_mask"):
            prune.remove(module, leaf)
    return model


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike[str],
    masks: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a pruned model and its masks to one safetensors file (atomically).

    Parameters
    ----------
    model : torch.nn.Module
        A pruned model: masks applied with :func:`apply_masks`, or under torch pruning.
    path : path-like
        Target file (``.safetensors``).
    masks : mapping of str to Tensor, optional
        Boolean masks; defaults to the torch pruning masks of ``model``.
    metadata : mapping, optional
        JSON-serialisable information stored with the file (strategy, sparsity, ...).

    Returns
    -------
    pathlib.Path
        The written file. The stored weights are the effective ones (``weight_orig * weight_mask``
        for torch-pruned parameters), so the file loads into a plain model.
    """
    masks = dict(masks) if masks is not None else masks_from_torch_prune(model)
    _check_masks(model, masks)
    params = _effective_params(model)
    tensors: dict[str, Tensor] = {}
    for name, value in params.items():
        tensors[_STATE + name] = value.detach().cpu().contiguous().clone()
    for name, buf in model.named_buffers():
        if name.endswith("_mask") and name[: -len("_mask")] in params:
            continue
        tensors[_STATE + name] = buf.detach().cpu().contiguous().clone()
    for name, mask in masks.items():
        tensors[_MASK + name] = mask.detach().cpu().contiguous().clone()
    try:
        user = json.dumps(dict(metadata or {}), sort_keys=True)
    except TypeError as exc:
        raise ConfigError(f"save_pruned: metadata must be JSON-serialisable ({exc}); pass plain numbers/strings.") \
            from None
    data = save(tensors, metadata={"format": FORMAT_NAME, "version": _FORMAT_VERSION, "metadata": user})
    return atomic_write(path, data)


def load_pruned(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    torch_prune: bool = False,
) -> tuple[nn.Module, dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_pruned` into ``model`` (in place).

    Parameters
    ----------
    path : path-like
        The safetensors file.
    model : torch.nn.Module
        A model with the same architecture (plain, not under torch pruning).
    torch_prune : bool
        Also re-attach the masks with :func:`export_to_torch_prune` (to keep the zeros while training).

    Returns
    -------
    model, masks, metadata
        The loaded model, the boolean masks and the stored metadata dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"load_pruned: no file at {str(path)!r}; pass the path written by save_pruned.")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"load_pruned: {str(path)!r} is not a readable safetensors file ({exc}).") from None
    if header.get("format") != FORMAT_NAME:
        raise ConfigError(
            f"load_pruned: {str(path)!r} has format {header.get('format')!r}, expected {FORMAT_NAME!r}; "
            f"write it with explaind.pruning.save_pruned."
        )
    version = header.get("version")
    if version != _FORMAT_VERSION:
        newer = isinstance(version, str) and version.isdigit() and int(version) > int(_FORMAT_VERSION)
        raise ConfigError(f"load_pruned: {str(path)!r} has format version {version!r}; this explaind reads version "
                          f"{_FORMAT_VERSION}. " + ("It was written by a newer explaind: upgrade explaind to read it."
                                                    if newer else "Write it again with explaind.pruning.save_pruned."))
    try:
        metadata = json.loads(header.get("metadata", "{}"))
    except ValueError as exc:
        raise ConfigError(f"load_pruned: the metadata of {str(path)!r} is not JSON ({exc}); allowed: the JSON object "
                          f"save_pruned writes. Write the file again with explaind.pruning.save_pruned.") from None
    state = {k[len(_STATE):]: v for k, v in tensors.items() if k.startswith(_STATE)}
    masks = {k[len(_MASK):]: v for k, v in tensors.items() if k.startswith(_MASK)}
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ConfigError(
            f"load_pruned: {str(path)!r} does not fit the model (missing: {missing}, unexpected: {extra}). "
            f"Pass a plain (not torch-pruned) model of the architecture that was saved."
        )
    for name, value in state.items():  # load_state_dict would cast a dtype (rounding) and raise torch's own error
        want = expected[name]
        if value.shape != want.shape or (value.dtype != want.dtype and (value.dtype, want.dtype) not in _EXACT_CASTS):
            raise ConfigError(f"load_pruned: {str(path)!r} holds {name!r} with shape {list(value.shape)} and dtype "
                              f"{value.dtype}; the model's has shape {list(want.shape)} and dtype {want.dtype}. Pass "
                              f"a model of the saved architecture and dtype (model.to(dtype) before loading; a wider "
                              f"float dtype is accepted).")
    model.load_state_dict(state, strict=True)
    _check_masks(model, masks)  # names, shapes and the boolean dtype (a stored 0.5 is not read as True)
    if torch_prune:
        export_to_torch_prune(model, masks)
    return model, masks, metadata
