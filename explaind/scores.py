r"""Named ExPLAIND scores computed from an :class:`~explaind.kernel.attribution.Attribution`.

All scores follow one rule: the decomposed axes (steps, parameters, training samples) are summed
*before* taking absolute values, and the absolute values are summed over test inputs and
outputs *after*. For an evaluation set :math:`X` and kept axis ``a`` with the other decomposed
axes summed out,

.. math::

    \mathrm{score}_a(j) = \sum_{x \in X} \sum_o \Big|\sum_{\text{other axes}} \psi(\ldots, a=j, \ldots, x, o)\Big|.

* :func:`parameter_influence` (``a = param``): the pruning score of ExPLAIND, returned per tensor
  in the parameter's shape;
* :func:`step_influence` (``a = step``), :func:`group_influence` (``a = group``, per named tensor),
  :func:`data_influence` (``a = train``);
* :func:`kernel_regularization_balance`: per step and tensor, the magnitude of the kernel (data)
  part against the regularization part;
* :func:`score_similarity`: cosine similarity of two test inputs' score vectors.

Each function takes an Attribution that keeps the needed axis, or a fitted trajectory together
with test inputs, in which case it runs :class:`~explaind.InfluenceEstimator` with the right
``keep`` (extra keyword arguments go to the estimator).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .estimators.influence import InfluenceEstimator
from .exceptions import ConfigError
from .kernel.attribution import Attribution

__all__ = [
    "parameter_influence",
    "step_influence",
    "group_influence",
    "data_influence",
    "kernel_regularization_balance",
    "score_similarity",
]


def _attribution(source: Any, keep: tuple[str, ...], X: Any, y: Any, kwargs: dict[str, Any], fn: str) -> Attribution:
    """``source`` itself (checked to keep ``keep``) or the Attribution of a trajectory on ``X``."""
    if isinstance(source, Attribution):
        missing = [a for a in keep if a not in source.kept]
        if missing:
            raise ConfigError(f"{fn} needs an Attribution keeping {list(keep)}; this one keeps {list(source.kept)}. "
                              f"Run InfluenceEstimator(keep={keep!r}) or pass the trajectory and X.")
        return source
    if X is None:
        raise ConfigError(f"{fn}: pass an Attribution, or a trajectory together with test inputs X.")
    return InfluenceEstimator(keep=keep, **kwargs).fit(source).transform(X, y)


def _reduce_to(t: Tensor, axes: tuple[str, ...], keep: tuple[str, ...]) -> tuple[Tensor, list[str]]:
    """Sum ``t`` (axes ``axes``) over every axis not in ``keep`` (``test`` and ``output`` always stay)."""
    names = list(axes)
    for a in [n for n in names if n not in ("test", "output", *keep)]:
        t = t.sum(names.index(a))
        names.remove(a)
    return t, names


def _abs_score(att: Attribution, axis: str) -> Tensor:
    """``values`` summed over every kept axis but ``axis``; then ``|.|`` summed over test and output."""
    t, _ = _reduce_to(att.values, att.axes, (axis,))
    return t.abs().sum(dim=(0, t.dim() - 1))


def parameter_influence(source: Any, X: Any = None, y: Any = None, *, include_regularization: bool = False,
                        **kwargs: Any) -> dict[str, Tensor]:
    """ExPLAIND parameter scores: ``name -> tensor`` of the parameter's shape.

    ``score[p] = sum_{x,o} |sum_{s,k} psi(s, p, k, x, o)|`` (plus the regularization part of ``p``
    inside the absolute value when ``include_regularization``).
    """
    att = _attribution(source, ("param",), X, y, kwargs, "parameter_influence")
    t, _ = _reduce_to(att.values, att.axes, ("param",))
    if include_regularization:
        t = t + _reduce_to(att.regularization, att.side_axes, ("param",))[0]
    flat = t.abs().sum(dim=(0, 2))
    return {k: v.clone() for k, v in att.unflatten(flat).items()}


def step_influence(source: Any, X: Any = None, y: Any = None, **kwargs: Any) -> Tensor:
    """Influence of each window step, shape ``(S,)`` (``coords["step"]`` gives the step numbers)."""
    att = _attribution(source, ("step",), X, y, kwargs, "step_influence")
    return _abs_score(att, "step")


def group_influence(source: Any, X: Any = None, y: Any = None, **kwargs: Any) -> dict[str, float]:
    """Influence of each parameter tensor (layer), ``name -> float``."""
    if isinstance(source, Attribution) and "param" in source.kept and "group" not in source.kept:
        source = source.by_group()
    att = _attribution(source, ("group",), X, y, kwargs, "group_influence")
    score = _abs_score(att, "group")
    return {name: float(v) for name, v in zip(att.coords["group"], score)}


def data_influence(source: Any, X: Any = None, y: Any = None, *, per_input: bool = False,
                   **kwargs: Any) -> Tensor:
    """Influence of each training sample: ``(n_train,)``, or ``(T, n_train, O)`` signed when ``per_input``."""
    att = _attribution(source, ("train",), X, y, kwargs, "data_influence")
    if not per_input:
        return _abs_score(att, "train")
    return att.sum([a for a in att.kept if a != "train"]).values if len(att.kept) > 1 else att.values


def kernel_regularization_balance(source: Any, X: Any = None, y: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Kernel (data) versus regularization magnitude per step and parameter tensor.

    Returns
    -------
    dict
        ``kernel`` and ``regularization``: ``(S, G)`` tensors of ``sum_{x,o} |.|``; ``ratio``:
        ``kernel / (kernel + regularization)`` (NaN where both vanish); ``steps``, ``groups``.
    """
    if isinstance(source, Attribution) and "param" in source.kept and "group" not in source.kept:
        source = source.by_group()
    att = _attribution(source, ("step", "group"), X, y, kwargs, "kernel_regularization_balance")

    def per_step_group(t: Tensor, axes: tuple[str, ...]) -> Tensor:
        t, names = _reduce_to(t, axes, ("step", "group"))
        t = t.abs().sum(dim=(0, t.dim() - 1))
        return t if names.index("step") < names.index("group") else t.T

    kernel = per_step_group(att.values, att.axes)
    reg = per_step_group(att.regularization, att.side_axes)
    total = kernel + reg
    ratio = torch.where(total > 0, kernel / torch.where(total > 0, total, torch.ones_like(total)),
                        torch.full_like(total, float("nan")))
    return {"kernel": kernel, "regularization": reg, "ratio": ratio, "steps": list(att.coords["step"]),
            "groups": list(att.coords["group"])}


def score_similarity(att: Attribution, i: int, j: int) -> float:
    """Cosine similarity of the score vectors (all kept axes and outputs) of test inputs ``i`` and ``j``."""
    T = att.values.shape[0]
    for k in (i, j):
        if not -T <= int(k) < T:
            raise ConfigError(f"score_similarity: test index {k} is out of range for {T} test inputs.")
    a = att.values[int(i)].reshape(-1).double()
    b = att.values[int(j)].reshape(-1).double()
    den = a.norm() * b.norm()
    return float(a @ b / den) if den > 0 else float("nan")
