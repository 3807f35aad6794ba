r"""The result of an influence query: additive scores over named axes.

An :class:`Attribution` holds the atoms :math:`\psi(s, p, k, x, o) = \varphi_s(x)[o, p]\,D_{s,k}[p]`
summed to the kept axes, and the terms that complete them:

.. math::

    g(x;\theta_{stop}) = \underbrace{g(x;\theta_{start})}_{initial}
        + \sum \text{values} + \sum \text{regularization} + \sum \text{residual}
        + \sum \text{quadrature\_error} + \sum \text{buffers} + \sum \text{initial\_state}

(completeness; :meth:`Attribution.total` returns the right-hand side and :attr:`final` the
left-hand side, computed by a forward pass).

Axes
----
``values.axes`` starts with ``"test"`` and ends with ``"output"``; the kept axes sit in between
**in the order the user passed them in** ``keep``. ``"step"`` indexes window steps
(``coords["step"]`` are step numbers), ``"group"`` parameter tensors (names), ``"param"`` flat
coordinates (``coords["param"]`` are ``0..D-1``; :meth:`param_label` names one, :attr:`layout`
gives tensor offsets, :meth:`unflatten` returns per-tensor views), ``"train"`` training sample
indices ``0..n_train-1`` (samples never used contribute 0).
``regularization`` and ``residual`` have the same axes without ``"train"``
(:attr:`side_axes`); ``quadrature_error`` and ``buffers`` only keep ``"step"`` (:attr:`quadrature_axes`)
since they are measured per step and input, not per parameter or sample. ``buffers`` is the exact
change of :math:`g` when training changed buffers (batch-norm running statistics) at a step,
:math:`g(\theta_{s+1}, \beta_{s+1}) - g(\theta_{s+1}, \beta_s)` (docs/maths.md, "Buffers"); zero otherwise.
``initial_state`` (axes :attr:`side_axes`) is the part of the updates carried by the momentum buffers
:math:`m_{-1}` the optimizer held before the first recorded step,
:math:`\sum_s \varphi_s(x)\,(-P_s q_s \prod_{j \le s} a_j\, m_{-1})` (docs/maths.md §4, "Optimizer state at
the start"); zero for a recording that started from a fresh optimizer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..exceptions import ConfigError
from ._attribution_io import AXES as _AXES
from ._attribution_io import FORMAT_VERSION, TENSORS, read_attribution, write_attribution
from .layout import ParamLayout

__all__ = ["Attribution", "AXES"]

#: The decomposed axes an influence query may keep, in canonical order (:data:`._attribution_io.AXES`).
AXES = _AXES

_TENSORS = TENSORS


@dataclass(eq=False)
class Attribution:
    r"""Additive influence scores with named axes (see the module docstring).

    Attributes
    ----------
    axes : tuple of str
        Axes of :attr:`values`: ``("test", *kept, "output")``.
    values : Tensor
        Data (kernel) part of the decomposition.
    initial, final : Tensor
        :math:`g(x;\theta_{start})` and :math:`g(x;\theta_{stop})`, shape ``(T, O)``.
    regularization, residual : Tensor
        Weight-decay part and unmodelled part, axes :attr:`side_axes`.
    quadrature_error : Tensor
        ``exact - estimate`` of the path integrals, axes :attr:`quadrature_axes`.
    buffers : Tensor
        Exact change through buffers changed by training, axes :attr:`quadrature_axes` (zeros when
        none changed; ``None`` at construction means zeros).
    initial_state : Tensor
        Part carried by the optimizer's momentum buffers from before the recording, axes
        :attr:`side_axes` (zeros for a fresh optimizer; ``None`` at construction means zeros).
    coords : dict
        Axis name -> coordinates (lists or int arrays).
    layout : ParamLayout
        Parameter names, shapes and flat offsets.
    meta : dict
        JSON-serialisable description of the query (target, window, quadrature, momentum mode, ...).
    """

    axes: tuple[str, ...]
    values: Tensor
    initial: Tensor
    final: Tensor
    regularization: Tensor
    residual: Tensor
    quadrature_error: Tensor
    coords: dict[str, Any]
    layout: ParamLayout
    meta: dict[str, Any] = field(default_factory=dict)
    buffers: Tensor = None  # type: ignore[assignment]  # zeros like quadrature_error when not given
    initial_state: Tensor = None  # type: ignore[assignment]  # zeros like residual when not given

    def __post_init__(self) -> None:
        for key in ("values", "initial", "final", "regularization", "residual", "quadrature_error", "buffers",
                    "initial_state"):  # never an autograd graph: a loss reading a live parameter leaves one
            value = getattr(self, key)
            if isinstance(value, Tensor) and value.requires_grad:
                setattr(self, key, value.detach())
        if self.buffers is None:
            self.buffers = torch.zeros_like(self.quadrature_error)
        if self.initial_state is None:
            self.initial_state = torch.zeros_like(self.residual)

    # ------------------------------------------------------------------ axes
    @property
    def kept(self) -> tuple[str, ...]:
        """The kept axes (between ``"test"`` and ``"output"``)."""
        return self.axes[1:-1]

    @property
    def side_axes(self) -> tuple[str, ...]:
        """Axes of ``regularization``, ``residual`` and ``initial_state``."""
        return tuple(a for a in self.axes if a != "train")

    @property
    def quadrature_axes(self) -> tuple[str, ...]:
        """Axes of ``quadrature_error``."""
        return tuple(a for a in self.axes if a in ("test", "step", "output"))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :attr:`values`."""
        return tuple(self.values.shape)

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape))
        return f"Attribution({dims}; target={self.meta.get('target_kind', '?')})"

    # ------------------------------------------------------------------ reductions
    def sum(self, axis: str | Sequence[str]) -> Attribution:
        """Sum out kept axes (and the matching axes of the side terms); returns a new Attribution."""
        names = [axis] if isinstance(axis, str) else list(axis)
        out = self
        for name in names:
            if name not in out.kept:
                raise ConfigError(
                    f"Attribution.sum: axis {name!r} is not a kept axis; kept axes are {list(out.kept)}. "
                    f"('test' and 'output' are always kept; use total() for the full sum.)"
                )
            out = out._sum_one(name)
        return out

    def _sum_one(self, name: str) -> Attribution:
        def drop(t: Tensor, axes: tuple[str, ...]) -> Tensor:
            return t.sum(axes.index(name)) if name in axes else t

        coords = {k: v for k, v in self.coords.items() if k != name}
        return Attribution(
            axes=tuple(a for a in self.axes if a != name),
            values=drop(self.values, self.axes),
            initial=self.initial,
            final=self.final,
            regularization=drop(self.regularization, self.side_axes),
            residual=drop(self.residual, self.side_axes),
            quadrature_error=drop(self.quadrature_error, self.quadrature_axes),
            buffers=drop(self.buffers, self.quadrature_axes),
            initial_state=drop(self.initial_state, self.side_axes),
            coords=coords,
            layout=self.layout,
            meta=dict(self.meta),
        )

    def _flat(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1, t.shape[-1]).sum(1)

    def total(self) -> Tensor:
        """``initial`` + every term summed to ``(T, O)``: the replica's output at the window end."""
        return (self.initial + self._flat(self.values) + self._flat(self.regularization)
                + self._flat(self.residual) + self._flat(self.quadrature_error) + self._flat(self.buffers)
                + self._flat(self.initial_state))

    def completeness_error(self) -> float:
        """``max |total() - final| / max |final|`` (0 up to rounding)."""
        scale = float(self.final.abs().max()) or 1.0
        return float((self.total() - self.final).abs().max()) / scale

    def residual_share(self, per_input: bool = False) -> float | Tensor:
        r"""How much of the explained change the model of the updates left unexplained.

        .. math::

            \frac{\sum_{x,o} |\sum \text{residual}[x, \dots, o]|}
                 {\sum_{x,o} |g(x;\theta_{stop}) - g(x;\theta_{start})|}

        (with ``per_input``, one ratio per test input, shape ``(T,)``). At rounding level for a run
        whose updates the optimizer adapter and the recomputed gradients reproduce; a large share
        means the per-sample scores miss part of the change (see docs/engine.md, "Residual share").
        """
        res = self._flat(self.residual).abs()
        change = (self.final - self.initial).abs()
        if per_input:
            return res.sum(-1) / change.sum(-1).clamp_min(torch.finfo(change.dtype).tiny)
        return float(res.sum() / change.sum().clamp_min(torch.finfo(change.dtype).tiny))

    def by_group(self) -> Attribution:
        """Turn the ``"param"`` axis into a ``"group"`` axis (sums within each parameter tensor)."""
        if "param" not in self.kept:
            raise ConfigError(f"Attribution.by_group needs a 'param' axis; kept axes are {list(self.kept)}.")
        ids = self.layout.group_ids(device=self.values.device)

        def regroup(t: Tensor, axes: tuple[str, ...]) -> Tensor:
            if "param" not in axes:
                return t
            d = axes.index("param")
            shape = list(t.shape)
            shape[d] = len(self.layout)
            return torch.zeros(shape, dtype=t.dtype, device=t.device).index_add_(d, ids, t)

        coords = {("group" if k == "param" else k): v for k, v in self.coords.items()}
        coords["group"] = list(self.layout.names)
        return Attribution(
            axes=tuple("group" if a == "param" else a for a in self.axes),
            values=regroup(self.values, self.axes),
            initial=self.initial,
            final=self.final,
            regularization=regroup(self.regularization, self.side_axes),
            residual=regroup(self.residual, self.side_axes),
            quadrature_error=self.quadrature_error,
            buffers=self.buffers,
            initial_state=regroup(self.initial_state, self.side_axes),
            coords=coords,
            layout=self.layout,
            meta=dict(self.meta),
        )

    # ------------------------------------------------------------------ diagnostics
    def _axis_dim(self, axis: str, method: str) -> int:
        if axis not in self.kept:
            raise ConfigError(f"Attribution.{method}: axis {axis!r} is not a kept axis; kept axes are "
                              f"{list(self.kept)}. Use one of them, e.g. {method}('train').")
        return self.axes.index(axis)

    def cancellation_ratio(self, axis: str, reduce: str | None = None) -> Tensor | float:
        r"""How much the contributions along ``axis`` cancel: :math:`\sum |\psi| / |\sum \psi|`.

        Parameters
        ----------
        axis : str
            A kept axis (``"train"``, ``"step"``, ``"group"``, ``"param"``).
        reduce : {None, "median", "max"}
            ``None``: one ratio per entry of the other axes (e.g. ``(T, O)`` for ``keep=("train",)``);
            otherwise the median or maximum over the finite ratios.

        Returns
        -------
        Tensor or float
            1 when every contribution has the same sign, large when big contributions of both signs
            cancel; ``inf`` where they cancel exactly, ``nan`` where all are zero.
        """
        d = self._axis_dim(axis, "cancellation_ratio")
        ratio = self.values.abs().sum(d) / self.values.sum(d).abs()
        if reduce is None:
            return ratio
        finite = ratio[torch.isfinite(ratio)]
        if reduce not in ("median", "max"):
            raise ConfigError(f"Attribution.cancellation_ratio: invalid value for 'reduce': {reduce!r}. Allowed: "
                              f"None, 'median', 'max'.")
        if finite.numel() == 0:
            return float("nan")
        return float(finite.median() if reduce == "median" else finite.max())

    def top_k(self, axis: str, k: int) -> dict[str, tuple[Tensor, Tensor]]:
        """The ``k`` strongest proponents (largest values) and opponents (smallest) along ``axis``.

        Parameters
        ----------
        axis : str
            A kept axis.
        k : int
            How many of each (at most the axis length).

        Returns
        -------
        dict
            ``{"proponents": (index, values), "opponents": (index, values)}``; ``index`` holds
            coordinates of ``axis`` (sample indices for ``"train"``, step numbers for ``"step"``;
            positions into ``coords[axis]`` for ``"group"``) and both tensors have the axes of
            :attr:`values` with ``axis`` moved last and of length ``k``, proponents in decreasing and
            opponents in increasing order.
        """
        d = self._axis_dim(axis, "top_k")
        n = self.values.shape[d]
        if not 1 <= int(k) <= n:
            raise ConfigError(f"Attribution.top_k: invalid value for 'k': {k!r}. Allowed: 1..{n} (the length of "
                              f"axis {axis!r}).")
        moved = self.values.movedim(d, -1)
        coord = self.coords.get(axis)
        lookup = (torch.as_tensor(np.asarray(coord)) if axis in ("train", "step", "param") and coord is not None
                  else torch.arange(n))
        out = {}
        for name, largest in (("proponents", True), ("opponents", False)):
            vals, pos = moved.topk(int(k), dim=-1, largest=largest, sorted=True)
            out[name] = (lookup[pos], vals)
        return out

    # ------------------------------------------------------------------ parameters
    def param_label(self, i: int) -> str:
        """Name of flat parameter coordinate ``i``, e.g. ``"0.weight[3,4]"``."""
        return self.layout.label(int(i))

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a tensor whose last axis runs over parameters (``D``) into ``name -> (..., *shape)``."""
        return self.layout.unflatten(torch.as_tensor(vec))

    # ------------------------------------------------------------------ conversion
    def torch(self) -> Tensor:
        """:attr:`values` (a tensor)."""
        return self.values

    def numpy(self) -> np.ndarray:
        """:attr:`values` as a numpy array."""
        return self.values.detach().cpu().numpy()

    def to_dict(self) -> dict[str, Any]:
        """Every field as numpy arrays and plain Python values."""
        out: dict[str, Any] = {name: getattr(self, name).detach().cpu().numpy() for name in _TENSORS}
        out.update(axes=list(self.axes), side_axes=list(self.side_axes), quadrature_axes=list(self.quadrature_axes),
                   coords=_json_coords(self.coords), layout=self.layout.to_json(), meta=dict(self.meta))
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to directory ``path``: ``attribution.safetensors`` (the tensors, with the header inside) and
        ``attribution.json`` (a readable copy of the header).

        The tensor file holds the whole result and replaces the old one in one atomic rename, so a save
        killed at any moment leaves the old attribution or the new one, never a mix
        (:mod:`~explaind.kernel._attribution_io`).
        """
        root = Path(path)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in _TENSORS}
        header = {"format_version": FORMAT_VERSION, "axes": list(self.axes), "coords": _json_coords(self.coords),
                  "layout": self.layout.to_json(), "meta": self.meta}
        write_attribution(root, tensors, header)
        return root

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Attribution:
        """Read an Attribution written by :meth:`save`, checked against its header.

        Raises
        ------
        ConfigError
            Naming the file, the value and what is allowed, when a file is missing, a link, truncated, of a
            newer format, or holds tensors whose set, dtype, shape or finiteness is not what :meth:`save` writes.
        """
        root = Path(path)
        header, tensors = read_attribution(root)
        layout = header["layout"]
        coords = header["coords"]
        if "param" in header["axes"]:
            coords["param"] = np.arange(layout.size)
        return cls(axes=header["axes"], coords=coords, layout=layout, meta=header["meta"],
                   **{name: tensors[name] for name in _TENSORS})


def _json_coords(coords: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in coords.items():
        if k == "param":
            out[k] = {"range": int(len(v))}
        else:
            out[k] = [x.item() if hasattr(x, "item") else x for x in _as_list(v)]
    return out


def _as_list(v: Any) -> Iterable[Any]:
    return v.tolist() if hasattr(v, "tolist") else list(v)

