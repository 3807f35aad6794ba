r"""Layer rules for convolutional networks: ``nn.Conv2d``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` (on import).

**Conv2d** (any padding and ``padding_mode``, any ``groups``): the output is affine in the kernel and
bias, :math:`z = W \star P(a) + b` with :math:`P` the layer's padding of the input (a linear map of the
input that does not depend on the parameters: zeros, ``"reflect"``, ``"replicate"`` or ``"circular"``,
given as numbers or as ``"same"``/``"valid"``), so the segment point :math:`t` adds
:math:`t\,(\Delta W \star P(a) + \Delta b)`,
and with the output gradients :math:`\delta_{o}[c_{out}, p]` at every output position :math:`p`

.. math::

    \frac{\partial g_o}{\partial W[c_{out}, k]} = \sum_p \delta_o[c_{out}, p]\, U_{\gamma(c_{out})}(a)[k, p], \qquad
    \frac{\partial g_o}{\partial b[c_{out}]} = \sum_p \delta_o[c_{out}, p],

:math:`U_\gamma(a)` the unfolded input patches of group :math:`\gamma` (``F.unfold``, :math:`k` running over
the group's input channels and the kernel offsets; :math:`\gamma(c_{out})` the group of the output
channel: with ``groups`` = :math:`G`, output channel :math:`c` reads the input channels of group
:math:`\lfloor c G / C_{out} \rfloor`, depthwise convolutions having one input channel per group).
**GroupNorm** with an affine transform: :math:`z = \hat a \odot w[c] + b[c]`,
:math:`\hat a` the input normalised per sample and group, so
:math:`\partial g_o/\partial w[c] = \sum_p \delta_o[c, p]\,\hat a[c, p]` and
:math:`\partial g_o/\partial b[c] = \sum_p \delta_o[c, p]`.
**BatchNorm** in evaluation mode is the same per-channel affine map with :math:`\hat a` normalised by
the running statistics of the step (:class:`BatchNormRule`).
All are checked against ``torch.func`` at start-up like every rule (:mod:`~explaind.kernel.layers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer_rules import Factors, StackedSteps, register_layer_rule

__all__ = ["Conv2dRule", "GroupNormRule", "BatchNormRule"]


def _at(stack: Tensor | None, s: int) -> Tensor | None:
    """Step ``s`` of a stacked parameter (a frozen one has a single entry)."""
    return None if stack is None else stack[0 if stack.shape[0] == 1 else s]


def _per_row(stack: Tensor | None, rows: StackedSteps, shape: tuple[int, ...]) -> Tensor | None:
    """Each row's parameters from ``stack (S, C, ...)``, reshaped to broadcast as ``shape``."""
    if stack is None:
        return None
    if stack.shape[0] == 1:
        return stack[0].reshape(shape[1:])
    return stack.index_select(0, rows.sidx).reshape(shape)


class Conv2dRule:
    """``nn.Conv2d``: roles ``kernel`` (weight) and ``bias``.

    Numeric zero padding is left to ``F.conv2d``/``F.unfold``; any other padding (``"same"``, whose
    sides differ for an even kernel, ``"valid"``, or a ``padding_mode`` other than ``"zeros"``) is
    applied to the input first as ``nn.Conv2d`` itself does (``F.pad`` with the module's per-side
    amounts), and the convolution then runs unpadded.
    """

    def roles(self, module: nn.Module) -> dict[str, str]:
        out = {"weight": "kernel"}
        if module.bias is not None:
            out["bias"] = "bias"
        return out

    @staticmethod
    def padded(module: nn.Module, a: Tensor) -> tuple[Tensor, Any]:
        """``(P(a), padding left to the convolution)``: the input padded as the module pads it."""
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return a, module.padding
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(a, module._reversed_padding_repeated_twice, mode=mode), 0

    def _conv(self, module: nn.Module, a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        a, padding = self.padded(module, a)
        return F.conv2d(a, w, b, module.stride, padding, module.dilation, module.groups)

    def moved(self, module: nn.Module, a: Tensor, output: Tensor, delta: Mapping[str, Tensor]) -> Tensor | None:
        dw, db = delta.get("kernel"), delta.get("bias")
        if dw is not None:
            return self._conv(module, a, dw, db)
        return None if db is None else db.reshape(1, -1, 1, 1).expand_as(output)

    def at_steps(self, module: nn.Module, prefix: str, a: Tensor, t: Tensor, rows: StackedSteps) -> Tensor:
        W, dW = rows.stacked(prefix, "kernel", module.weight)
        b, db = rows.stacked(prefix, "bias", module.bias)
        steps, counts = torch.unique_consecutive(rows.sidx, return_counts=True)  # rows are sorted by step
        parts, lo = [], 0
        for s, c in zip(steps.tolist(), counts.tolist()):
            x, tt = a[lo:lo + c], t[lo:lo + c]
            z = self._conv(module, x, _at(W, s), _at(b, s))
            if dW is not None:
                z = z + tt * self._conv(module, x, dW[s], None if db is None else db[s])
            elif db is not None:
                z = z + tt * db[s].reshape(1, -1, 1, 1)
            parts.append(z)
            lo += c
        return torch.cat(parts)

    def reduce(self, module: nn.Module, role: str, calls: Factors, owner: Tensor,
               buckets: list[tuple[Tensor, Tensor]], O: int, out: Tensor) -> None:
        total = torch.zeros(out.shape[0], O, out.shape[-1], dtype=out.dtype, device=out.device)
        for d, a in calls:
            G = module.groups
            d = d.reshape(O, d.shape[1], G, module.out_channels // G, -1)  # (O, E, G, C_out / G, P)
            if role == "kernel":
                a, padding = self.padded(module, a)
                patches = F.unfold(a, module.kernel_size, module.dilation, padding, module.stride)
                patches = patches.reshape(d.shape[1], G, -1, patches.shape[-1])  # (E, G, C_in / G * kh * kw, P)
                per_entry = torch.einsum("oegcp,egkp->eogck", d, patches).reshape(d.shape[1], O, -1)
            else:
                per_entry = d.sum(-1).reshape(O, d.shape[1], -1).transpose(0, 1)
            total.index_add_(0, owner, per_entry)
        out.copy_(total)


class GroupNormRule:
    """``nn.GroupNorm`` with ``affine=True``: roles ``scale`` (weight) and ``shift`` (bias)."""

    def roles(self, module: nn.Module) -> dict[str, str]:
        return {"weight": "scale", "bias": "shift"} if module.affine else {}

    @staticmethod
    def normalised(module: nn.Module, a: Tensor) -> Tensor:
        return F.group_norm(a, module.num_groups, None, None, module.eps)

    def moved(self, module: nn.Module, a: Tensor, output: Tensor, delta: Mapping[str, Tensor]) -> Tensor | None:
        return _affine_moved(self.normalised(module, a), output, delta)

    def at_steps(self, module: nn.Module, prefix: str, a: Tensor, t: Tensor, rows: StackedSteps) -> Tensor:
        return _affine_at_steps(module, prefix, self.normalised(module, a), t, rows)

    def reduce(self, module: nn.Module, role: str, calls: Factors, owner: Tensor,
               buckets: list[tuple[Tensor, Tensor]], O: int, out: Tensor) -> None:
        _reduce_channels(module.num_channels, role, calls, owner, O, out, lambda a: self.normalised(module, a))


class BatchNormRule:
    r"""``nn.BatchNorm1d/2d/3d`` in evaluation mode with running statistics: roles ``scale`` and ``shift``.

    With the running mean :math:`\mu` and variance :math:`\sigma^2` of the step (buffers
    :math:`\beta_s`, constant along the segment) the layer is the per-channel affine map
    :math:`z = \hat a \odot w[c] + b[c]`, :math:`\hat a = (a - \mu[c]) / \sqrt{\sigma^2[c] + \epsilon}`,
    so the factors are those of :class:`GroupNormRule` with this :math:`\hat a`. The hooks keep
    :math:`\hat a` (:meth:`kept`) while the step's statistics are in the module. Training-mode batch
    norm (batch statistics, rows coupled) has no rule: its per-sample gradients come from the replayed
    batched forward (:mod:`~explaind.kernel.coupled`).
    """

    def roles(self, module: nn.Module) -> dict[str, str]:
        if module.training or not module.affine or module.running_mean is None or module.running_var is None:
            return {}
        return {"weight": "scale", "bias": "shift"}

    @staticmethod
    def kept(module: nn.Module, a: Tensor) -> Tensor:
        r""":math:`\hat a`, the input normalised with the module's running statistics."""
        return F.batch_norm(a, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)

    def moved(self, module: nn.Module, a: Tensor, output: Tensor, delta: Mapping[str, Tensor]) -> Tensor | None:
        return _affine_moved(self.kept(module, a), output, delta)

    def at_steps(self, module: nn.Module, prefix: str, a: Tensor, t: Tensor, rows: StackedSteps) -> Tensor:
        shape = (t.shape[0], a.shape[1], *([1] * (a.dim() - 2)))
        mean = _per_row(rows.buffers(prefix, "running_mean", module.running_mean), rows, shape)
        var = _per_row(rows.buffers(prefix, "running_var", module.running_var), rows, shape)
        return _affine_at_steps(module, prefix, (a - mean) / torch.sqrt(var + module.eps), t, rows)

    def reduce(self, module: nn.Module, role: str, calls: Factors, owner: Tensor,
               buckets: list[tuple[Tensor, Tensor]], O: int, out: Tensor) -> None:
        _reduce_channels(module.num_features, role, calls, owner, O, out)


def _affine_moved(hat: Tensor, output: Tensor, delta: Mapping[str, Tensor]) -> Tensor | None:
    r"""The change :math:`\hat a \odot \Delta w[c] + \Delta b[c]` of a per-channel affine map (``None``: none)."""
    shape = (1, -1, *([1] * (hat.dim() - 2)))
    dw, db = delta.get("scale"), delta.get("shift")
    moved = None if dw is None else hat * dw.reshape(shape)
    if db is not None:
        moved = db.reshape(shape).expand_as(output) if moved is None else moved + db.reshape(shape)
    return moved


def _affine_at_steps(module: nn.Module, prefix: str, hat: Tensor, t: Tensor, rows: StackedSteps) -> Tensor:
    r""":math:`\hat a \odot (w + t\,\Delta w)[c] + (b + t\,\Delta b)[c]` with each row's step parameters."""
    shape = (t.shape[0], hat.shape[1], *([1] * (hat.dim() - 2)))
    W, dW = rows.stacked(prefix, "scale", module.weight)
    b, db = rows.stacked(prefix, "shift", module.bias)
    z = hat * _per_row(W, rows, shape) + _per_row(b, rows, shape)
    if dW is not None:
        z = z + t * hat * _per_row(dW, rows, shape)
    if db is not None:
        z = z + t * _per_row(db, rows, shape)
    return z


def _reduce_channels(C: int, role: str, calls: Factors, owner: Tensor, O: int, out: Tensor,
                     hat: Any = None) -> None:
    r"""Per-channel scale/shift factors summed over positions into ``out (T_c, O, C)``.

    ``calls`` hold ``(delta, kept)``: :math:`\sum_p \delta[c, p]\,\hat a[c, p]` for ``"scale"`` (``hat(kept)``
    gives :math:`\hat a`, default the kept tensor itself), :math:`\sum_p \delta[c, p]` for ``"shift"``.
    """
    total = torch.zeros(out.shape[0], O, out.shape[-1], dtype=out.dtype, device=out.device)
    for d, a in calls:
        d = d.reshape(O, d.shape[1], C, -1)  # (O, E, C, positions)
        if role == "scale":
            d = d * (a if hat is None else hat(a)).reshape(1, d.shape[1], C, -1)
        total.index_add_(0, owner, d.sum(-1).transpose(0, 1))
    out.copy_(total)


register_layer_rule(nn.Conv2d, Conv2dRule())
register_layer_rule(nn.GroupNorm, GroupNormRule())
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_layer_rule(_bn, BatchNormRule())
