r"""From scores to masks: global or per-layer thresholds, excluded layers, structured units.

Notation: a model has named parameter tensors :math:`\theta^{(\ell)}`; a strategy assigns every
coordinate :math:`p` a score :math:`S_p` (higher = more important). At sparsity :math:`\rho`
the *prunable* coordinates (the parameters left after exclusion) are ranked by score and the
:math:`k = \lfloor \rho n + 1/2 \rfloor` lowest are removed, where :math:`n` is the number of
prunable coordinates (``scope="global"``, one threshold over all tensors) or the size of each
tensor (``scope="layer"``, every tensor pruned to the same sparsity). Ties are broken by
position (the earlier coordinate in ``named_parameters()`` order is removed first), so the
masks are a deterministic function of the scores.

With ``granularity="neuron"`` the units are whole rows along dimension 0 of every prunable
tensor with two or more dimensions (output neurons of ``nn.Linear``, output channels of
``nn.ConvNd``); a unit's score is the mean score of its coordinates, so units of layers with
different fan-in compare on the same scale. Globally, the lowest-scored units are removed until
the number of removed weight coordinates is as close as possible to :math:`k`; per layer,
:math:`\lfloor \rho\, r + 1/2 \rfloor` of the :math:`r` rows of each tensor are removed. The
bias ``<module>.bias`` of a removed unit is removed with it (unless excluded).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor

from ..exceptions import ConfigError

__all__ = [
    "Scope",
    "Granularity",
    "matches",
    "check_exclude",
    "prunable_names",
    "scores_to_masks",
    "mask_sparsity",
    "kept_fraction",
]

Scope = Literal["global", "layer"]
Granularity = Literal["unstructured", "neuron"]
_SCOPES = ("global", "layer")
_GRANULARITIES = ("unstructured", "neuron")


def matches(name: str, pattern: str) -> bool:
    """Whether parameter ``name`` is selected by ``pattern``.

    A pattern selects a parameter by exact name (``"fc3.weight"``), by module prefix
    (``"fc3"`` selects ``"fc3.weight"`` and ``"fc3.bias"``) or by shell-style wildcard
    (``"*.bias"``, ``"layers.[01].*"``).
    """
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def check_exclude(shapes: Mapping[str, tuple[int, ...]], exclude: Iterable[str]) -> None:
    """Raise :class:`ConfigError` for an ``exclude`` entry that selects no parameter (a typo)."""
    if isinstance(exclude, str):
        raise ConfigError(
            f"exclude={exclude!r} must be a sequence of names or patterns, not a single string; "
            f"write exclude=({exclude!r},)."
        )
    for pattern in exclude:
        if not any(matches(name, pattern) for name in shapes):
            names = ", ".join(shapes)
            raise ConfigError(
                f"exclude entry {pattern!r} matches no parameter. Parameters: {names}. Use an exact name, a module "
                f"prefix such as 'fc3', or a pattern such as '*.bias'."
            )


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(matches(name, pattern) for pattern in exclude)


def prunable_names(
    shapes: Mapping[str, tuple[int, ...]],
    exclude: Iterable[str] = (),
    prune_biases: bool = False,
    granularity: Granularity = "unstructured",
) -> list[str]:
    """Names of the tensors whose coordinates count towards the sparsity.

    Unstructured: every tensor not excluded with two or more dimensions, plus one-dimensional
    ones when ``prune_biases``. Neuron: every tensor not excluded with two or more dimensions
    (their biases follow the rows they belong to but do not count).
    """
    exclude = tuple(exclude)
    out = []
    for name, shape in shapes.items():
        if _excluded(name, exclude) or len(shape) == 0:
            continue
        if len(shape) >= 2 or (granularity == "unstructured" and prune_biases):
            out.append(name)
    return out


def _check_options(sparsity: float, scope: str, granularity: str) -> None:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0):
        raise ConfigError(
            f"invalid sparsity {sparsity!r}; it is the fraction of prunable coordinates removed and must satisfy "
            f"0 <= sparsity < 1."
        )
    if scope not in _SCOPES:
        raise ConfigError(f"Unknown scope {scope!r}. Choose one of: {', '.join(_SCOPES)}.")
    if granularity not in _GRANULARITIES:
        raise ConfigError(f"Unknown granularity {granularity!r}. Choose one of: {', '.join(_GRANULARITIES)}.")


def _n_remove(sparsity: float, n: int) -> int:
    return min(n, int(math.floor(sparsity * n + 0.5)))


def _lowest(flat: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` lowest entries, ties broken by position (stable sort)."""
    return torch.argsort(flat, stable=True)[:k]


def scores_to_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: Scope = "global",
    exclude: Iterable[str] = (),
    granularity: Granularity = "unstructured",
    prune_biases: bool = False,
) -> dict[str, Tensor]:
    """Threshold per-coordinate scores into boolean masks (``True`` = kept).

    Parameters
    ----------
    scores : mapping of str to Tensor
        One score tensor per parameter (any float dtype; higher = more important). Not modified.
    sparsity : float
        Fraction of prunable coordinates removed, ``0 <= sparsity < 1``.
    scope : {"global", "layer"}
        One ranking over all prunable tensors, or one per tensor.
    exclude : iterable of str
        Names, module prefixes or patterns of parameters never pruned (see :func:`matches`).
    granularity : {"unstructured", "neuron"}
        Coordinates, or whole rows along dimension 0 (neurons / channels).
    prune_biases : bool
        Whether one-dimensional tensors are prunable in unstructured mode.

    Returns
    -------
    dict of str to Tensor
        Boolean CPU tensors shaped like the scores, in the order of ``scores``.
    """
    _check_options(sparsity, scope, granularity)
    shapes = {name: tuple(s.shape) for name, s in scores.items()}
    check_exclude(shapes, exclude)
    exclude = tuple(exclude)
    flat: dict[str, Tensor] = {}
    for name, s in scores.items():
        s = s.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if torch.isnan(s).any():
            raise ConfigError(
                f"the scores of {name!r} contain NaN; a strategy must score every coordinate with a number "
                f"(check the scoring data and the model for NaN/inf)."
            )
        flat[name] = s
    masks = {name: torch.ones(shape, dtype=torch.bool) for name, shape in shapes.items()}
    names = prunable_names(shapes, exclude, prune_biases, granularity)
    if not names or sparsity == 0.0:
        return masks
    if granularity == "unstructured":
        _unstructured(flat, masks, names, sparsity, scope)
    else:
        _neurons(flat, shapes, masks, names, sparsity, scope, exclude)
    return masks


def _unstructured(flat: dict[str, Tensor], masks: dict[str, Tensor], names: list[str], sparsity: float,
                  scope: str) -> None:
    if scope == "layer":
        for name in names:
            idx = _lowest(flat[name], _n_remove(sparsity, flat[name].numel()))
            masks[name].view(-1)[idx] = False
        return
    allscores = torch.cat([flat[n] for n in names])
    keep = torch.ones(allscores.numel(), dtype=torch.bool)
    keep[_lowest(allscores, _n_remove(sparsity, allscores.numel()))] = False
    offset = 0
    for name in names:
        size = flat[name].numel()
        masks[name].view(-1).copy_(keep[offset:offset + size])
        offset += size


def _neurons(flat: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], masks: dict[str, Tensor],
             names: list[str], sparsity: float, scope: str, exclude: tuple[str, ...]) -> None:
    removed: dict[str, Tensor] = {}  # name -> boolean vector over rows (True = removed)
    unit_scores = {n: flat[n].reshape(shapes[n][0], -1).mean(dim=1) for n in names}
    if scope == "layer":
        for name in names:
            rows = unit_scores[name]
            gone = torch.zeros(rows.numel(), dtype=torch.bool)
            gone[_lowest(rows, _n_remove(sparsity, rows.numel()))] = True
            removed[name] = gone
    else:
        allunits = torch.cat([unit_scores[n] for n in names])
        sizes = torch.cat([torch.full((shapes[n][0],), flat[n].numel() // shapes[n][0]) for n in names])
        order = torch.argsort(allunits, stable=True)
        target = _n_remove(sparsity, int(sizes.sum()))
        cumulative = torch.cat([torch.zeros(1, dtype=sizes.dtype), torch.cumsum(sizes[order], 0)])
        m = int(torch.argmin((cumulative - target).abs()))  # first minimiser: fewest units on a tie
        gone_all = torch.zeros(allunits.numel(), dtype=torch.bool)
        gone_all[order[:m]] = True
        offset = 0
        for name in names:
            r = shapes[name][0]
            removed[name] = gone_all[offset:offset + r]
            offset += r
    for name, gone in removed.items():
        masks[name][gone] = False
        if name.endswith(".weight"):
            bias = name[: -len("weight")] + "bias"
            if bias in masks and shapes[bias] == (shapes[name][0],) and not _excluded(bias, exclude):
                masks[bias][gone] = False


def mask_sparsity(masks: Mapping[str, Tensor], names: Iterable[str] | None = None) -> float:
    """Fraction of removed coordinates (``False`` entries) over ``names`` (default: every mask)."""
    selected = list(masks) if names is None else list(names)
    total = sum(masks[n].numel() for n in selected)
    if total == 0:
        return 0.0
    removed = sum(int((~masks[n].bool()).sum()) for n in selected)
    return removed / total


def kept_fraction(masks: Mapping[str, Tensor], names: Iterable[str] | None = None) -> float:
    """``1 - mask_sparsity(masks, names)``."""
    return 1.0 - mask_sparsity(masks, names)
