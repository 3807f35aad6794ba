r"""Plain-operation forms of the fused torch kernels that ``torch.func`` cannot transform.

explaind evaluates models under :func:`torch.func.jvp` (forward mode), and one input at a time
under :func:`torch.func.vmap`. These fused kernels break there:

* ``torch._weight_norm`` (``torch.nn.utils.parametrizations.weight_norm`` and the older
  ``torch.nn.utils.weight_norm``) dispatches on the CPU to ``_weight_norm_interface``, which has no
  forward-mode derivative. Its value is
  :math:`w = g \, v / \|v\|_{\text{except dim}}`, written here with ``torch.linalg.vector_norm``.
* ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh`` and ``torch.rnn_relu`` (``nn.LSTM``, ``nn.GRU``,
  ``nn.RNN``) have no ``vmap`` rule that survives batched inputs with unbatched hidden states.
  They run unrolled over time (:mod:`~explaind.kernel.recurrent`), packed sequences included:
  ``pack_padded_sequence`` and ``pad_packed_sequence`` run as plain indexing (:class:`Packing`),
  masked where ``vmap`` gives each input its own length.

* ``torch.prelu`` (``nn.PReLU``) has a backward that fails under ``vmap`` of ``jacrev`` (the
  Jacobians one input at a time): it runs as :math:`x \,[x > 0] + a x \,[x \le 0]` with ``torch.where``,
  the slope ``a`` broadcast along the channel axis 1, as torch does.
* ``F.hardsigmoid`` (``nn.Hardsigmoid``): torch's derivative of it (backward and forward mode) is
  ``float32(1/6)`` even in float64, :math:`3.0 \cdot 10^{-8}` relative from the slope :math:`1/6` of its
  value, so a path integral of it never reaches a tolerance below that (the adaptive rule stopped at
  its cap at ``tol=1e-11``). It runs as :math:`\text{relu6}(x + 3) / 6`, torch's value to the bit,
  whose derivative is :math:`1/6` in the replay dtype.
* ``F.embedding_bag`` (``nn.EmbeddingBag``) has no forward-mode derivative. It runs as a lookup
  followed by the bag's reduction: with the membership :math:`M_{bj} = [o_b \le j < o_{b+1}]
  [i_j \ne \text{padding}]` of position ``j`` in bag ``b`` (offsets :math:`o`, or one bag per row of a
  2-D input), ``sum`` is :math:`\sum_j M_{bj} w_j E_{i_j}` (per-sample weights :math:`w`, else 1),
  ``mean`` divides it by :math:`\max(1, \sum_j M_{bj})` and ``max`` takes the largest
  :math:`E_{i_j}` over the bag per coordinate; an empty bag gives zeros, as torch's kernel does.

Functional operations without a forward-mode derivative (``F.grid_sample``, ``torch.cdist``, ``F.pdist``) and
``F.rrelu`` in evaluation mode run as the plain forms of :mod:`~explaind.kernel.functional_rewrites`.

Every form equals the fused kernel up to float rounding. :class:`FusedKernelRewrite` is a
``TorchFunctionMode`` that swaps them in; :func:`needs_rewrite` says whether a model holds such a
module, and :func:`~explaind.kernel.rewrite_scan.reachable_rewrite` whether its forward code can call such a
function on any branch; either keeps the mode on for every forward. Any other model runs its first forward in the
mode, which records whether it rewrote anything (:attr:`FusedKernelRewrite.rewrote`: a functional call the scan
could not see); if not, every later forward runs with no mode at all
(:class:`~explaind.kernel.explained.FunctionalModel`).
Dropout between recurrent layers in training mode is drawn as torch's CPU kernel draws it; on CUDA it is refused
(:class:`~explaind.exceptions.UnsupportedModelError`).

**Packing.** torch packs a padded batch ``(T, B, *)`` with lengths :math:`L_b` (sorted,
non-increasing) into ``data`` ``(N, *)``, :math:`N = \sum_b L_b`, holding step ``t``'s rows ``b < b_t`` one step after
the other, :math:`b_t = \#\{b : L_b > t\}` (``batch_sizes``). :class:`Packing` does the same in
two ways (see :mod:`~explaind.kernel.recurrent`):

* lengths that are plain tensors (a batched forward, or ``vmap`` over parameters only): the packed
  layout itself, built with one gather, so the unrolled layers follow torch's per-step batch sizes;
* lengths that ``vmap`` maps over (one input at a time, each with its own length): a packed
  layout's shape would differ from input to input, so ``data`` stays the padded sequence,
  flattened time-major to ``(T B, *)``, ``batch_sizes`` reads ``B`` at every step, and the mask
  :math:`m_{t,b} = [t < L_b]` is kept under that ``batch_sizes`` object: the layers run
  ``masked`` and ``pad_packed_sequence`` puts ``padding_value`` where :math:`m = 0`. Its output
  then has the padded length ``T`` (or ``total_length``), not :math:`\max_b L_b`.

Every ``PackedSequence`` torch builds from these keeps the ``batch_sizes`` object, which is how a
masked one is recognised downstream.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor
from torch.overrides import TorchFunctionMode

from ..exceptions import ConfigError, UnsupportedModelError
from . import functional_rewrites as fr
from .recurrent import KINDS, Steps, run_kernel

__all__ = ["FusedKernelRewrite", "Packing", "needs_rewrite"]


def needs_rewrite(module: nn.Module) -> bool:
    """Whether ``module`` holds a recurrent layer, a weight norm (either implementation), a PReLU, a bag or a
    Hardsigmoid."""
    for m in module.modules():
        if isinstance(m, (nn.RNNBase, nn.PReLU, nn.EmbeddingBag, nn.Hardsigmoid)):
            return True
        if type(m).__name__ == "_WeightNorm":  # torch.nn.utils.parametrizations.weight_norm
            return True
        if any(type(h).__name__ == "WeightNorm" for h in m._forward_pre_hooks.values()):  # torch.nn.utils.weight_norm
            return True
    return False


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """:math:`g \\, v / \\|v\\|` with the norm over every axis except ``dim`` (``-1``: over all axes)."""
    if dim == -1:
        return v * (g / torch.linalg.vector_norm(v))
    axes = [a for a in range(v.dim()) if a != dim % v.dim()]
    return v * (g / torch.linalg.vector_norm(v, dim=axes, keepdim=True))


def _hardsigmoid(x: Tensor, inplace: bool = False) -> Tensor:
    """``F.hardsigmoid(x)`` as :math:`\text{relu6}(x + 3) / 6` (torch's value; derivative :math:`1/6` exactly
    rounded, not ``float32(1/6)``); ``inplace`` is ignored (a new tensor)."""
    return nn.functional.relu6(x + 3.0) / 6.0


def _prelu(x: Tensor, weight: Tensor) -> Tensor:
    """``torch.prelu(x, weight)``: ``x`` where positive, else ``weight * x`` (``weight`` along axis 1).

    Written as ``relu(x) - weight * relu(-x)`` (the same values to the bit: one of the two terms is 0), not as
    ``torch.where(x > 0, ...)``: the probe that names calls whose output can jump (``kernel/jumps.py``) reads a
    comparison as a branch, and PReLU is continuous (a kink, like ReLU's, which ``F.relu`` tells it).
    """
    if weight.numel() != 1 and x.dim() >= 2:
        weight = weight.reshape(weight.shape[0], *([1] * (x.dim() - 2)))
    return nn.functional.relu(x) - weight * nn.functional.relu(-x)


def _embedding_bag(input: Tensor, weight: Tensor, offsets: Tensor | None = None, max_norm: float | None = None,
                   norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean",
                   sparse: bool = False, per_sample_weights: Tensor | None = None, include_last_offset: bool = False,
                   padding_idx: int | None = None) -> Tensor:
    """``F.embedding_bag`` as a lookup and a masked reduction (see the module docstring): ``(bags, dim)``.

    Raises
    ------
    UnsupportedModelError
        For ``max_norm`` (torch renormalises the table in place) and nested inputs.
    """
    if max_norm is not None or input.is_nested:
        what = f"max_norm={max_norm}" if max_norm is not None else "a nested input"
        raise UnsupportedModelError(
            f"F.embedding_bag with {what} cannot be evaluated by explaind: max_norm rewrites the table in place "
            f"and a nested input has no fixed shape. Fix: max_norm=None, and a 2-D input or a 1-D input with "
            f"offsets.")
    if mode not in ("sum", "mean", "max"):
        raise ConfigError(f"F.embedding_bag got mode={mode!r}. Choose one of: 'sum', 'mean', 'max'.")
    rows = nn.functional.embedding(input, weight)  # (n, L, D) for 2-D input, (N, D) for 1-D
    valid = torch.ones_like(input, dtype=torch.bool) if padding_idx is None else \
        input != (padding_idx % weight.shape[0])
    if input.dim() == 2:  # one bag per row
        member = valid
    else:
        n = input.shape[0]
        starts = offsets[:-1] if include_last_offset else offsets  # torch's last bag runs to the end of the input
        ends = torch.cat([starts[1:], offsets.new_full((1,), n)])
        pos = torch.arange(n, device=input.device)
        member = (pos >= starts[:, None]) & (pos < ends[:, None]) & valid  # (B, N)
        rows = rows.unsqueeze(0)  # (1, N, D): broadcast over the bags
    if mode == "max":
        filled = torch.where(member[..., None], rows, torch.full((), -torch.inf, dtype=rows.dtype,
                                                                  device=rows.device))
        return torch.where(member.any(-1)[..., None], filled.amax(-2), torch.zeros((), dtype=rows.dtype,
                                                                                      device=rows.device))
    scale = member.to(rows.dtype)
    if per_sample_weights is not None:
        scale = scale * per_sample_weights.to(rows.dtype)
    total = (scale[..., None] * rows).sum(-2)
    if mode == "mean":
        total = total / member.sum(-1, keepdim=True).clamp_min(1).to(rows.dtype)
    return total


def _vmapped(t: Tensor) -> bool:
    """Whether ``t`` carries a ``vmap`` batch dimension at any functorch level."""
    while is_functorch_wrapped_tensor(t):
        if is_batchedtensor(t):
            return True
        t = get_unwrapped(t)
    return False


class Packing:
    """The packing operations of one evaluation; remembers the masked ``batch_sizes`` it handed out."""

    def __init__(self) -> None:
        self._masked: dict[int, tuple[Tensor, Steps, Tensor]] = {}

    def pack(self, x: Tensor, lengths: Tensor, batch_first: bool) -> tuple[Tensor, Tensor]:
        """``torch._pack_padded_sequence(input, lengths, batch_first)``: ``(data, batch_sizes)``."""
        seq = x.transpose(0, 1) if batch_first else x
        T, B = seq.shape[0], seq.shape[1]
        if lengths.dim() != 1 or lengths.shape[0] != B:
            raise ConfigError(f"pack_padded_sequence got lengths of shape {tuple(lengths.shape)} for a batch of {B} "
                              f"sequences; it takes one length per sequence. Fix: pass lengths of shape ({B},).")
        flat = seq.reshape(T * B, *seq.shape[2:])
        if _vmapped(lengths):
            lens = lengths.to(device=x.device, dtype=torch.long)  # torch asks for lengths on the CPU
            mask = torch.arange(T, device=x.device)[:, None, None] < lens[None, :, None]
            batch_sizes = torch.full((T,), B, dtype=torch.long)
            self._masked[id(batch_sizes)] = (batch_sizes, Steps("masked", T, mask=mask), lengths.to(torch.long))
            return flat, batch_sizes
        lens = [int(v) for v in lengths.tolist()]
        if min(lens) <= 0 or max(lens) > T or any(a < b for a, b in zip(lens, lens[1:])):
            raise ConfigError(
                f"pack_padded_sequence got lengths {lens} for sequences padded to {T} steps; it takes lengths in "
                f"1..{T}, in decreasing order unless enforce_sorted=False. Fix: pass the true lengths, and "
                f"enforce_sorted=False when they are not sorted.")
        sizes = [sum(1 for n in lens if n > t) for t in range(lens[0])]
        idx = [t * B + b for t, n in enumerate(sizes) for b in range(n)]
        return flat[torch.tensor(idx, device=flat.device)], torch.tensor(sizes, dtype=torch.long)

    def steps(self, data: Tensor, batch_sizes: Tensor) -> Steps:
        """The :class:`Steps` of packed ``data`` with ``batch_sizes`` (masked when :meth:`pack` made it so)."""
        masked = self._masked.get(id(batch_sizes))
        if masked is not None and masked[0] is batch_sizes:
            steps = masked[1]
            rows = steps.T * steps.mask.shape[1]  # type: ignore[union-attr]
            if data.shape[0] != rows:
                raise UnsupportedModelError(
                    f"a packed sequence evaluated one input at a time holds {data.shape[0]} rows where {rows} "
                    f"(steps x sequences) were expected: its data was rebuilt with other rows after packing. Fix: "
                    f"apply per-row operations to the padded sequence before pack_padded_sequence.")
            return steps
        if _vmapped(batch_sizes):
            raise UnsupportedModelError(
                "a PackedSequence whose batch_sizes differ from input to input reached a recurrent layer under "
                "vmap. Fix: build it with torch.nn.utils.rnn.pack_padded_sequence inside the model's forward.")
        return Steps("packed", int(batch_sizes.shape[0]), sizes=tuple(int(b) for b in batch_sizes.tolist()))

    def pad(self, data: Tensor, batch_sizes: Tensor, batch_first: bool, padding_value: float,
            total_length: int) -> tuple[Tensor, Tensor]:
        """``torch._pad_packed_sequence``: ``(padded, lengths)``, padded ``(total_length, B, *)`` or batch first."""
        steps = self.steps(data, batch_sizes)
        rest = data.shape[1:]
        if steps.layout == "masked":
            mask = steps.mask
            B = mask.shape[1]  # type: ignore[union-attr]
            seq = data.reshape(steps.T, B, *rest)
            padded = torch.where(mask.reshape(steps.T, B, *([1] * len(rest))), seq,  # type: ignore[union-attr]
                                 torch.full((), padding_value, dtype=data.dtype, device=data.device))
            if total_length > steps.T:
                fill = torch.full((total_length - steps.T, B, *rest), padding_value, dtype=data.dtype,
                                  device=data.device)
                padded = torch.cat([padded, fill])
            lengths = self._masked[id(batch_sizes)][2]
        else:
            B, N = steps.sizes[0], data.shape[0]
            offsets = steps.offsets()
            idx = [offsets[t] + b if t < steps.T and b < steps.sizes[t] else N
                   for t in range(total_length) for b in range(B)]
            pad_row = torch.full((1, *rest), padding_value, dtype=data.dtype, device=data.device)
            rows = torch.cat([data, pad_row])[torch.tensor(idx, device=data.device)]
            padded = rows.reshape(total_length, B, *rest)
            lengths = torch.tensor([sum(1 for n in steps.sizes if n > b) for b in range(B)], dtype=torch.long)
        return (padded.transpose(0, 1) if batch_first else padded), lengths


class FusedKernelRewrite(TorchFunctionMode):
    """Inside the block, weight norm, the recurrent kernels, sequence packing, PReLU, embedding bags, Hardsigmoid,
    grid sampling, distances and evaluation-mode RReLU run as plain operations.

    :attr:`rewrote` turns true at the first operation run in its plain form: a forward run once in the block
    tells whether the model needs the block at all (the census of :class:`~explaind.kernel.explained.FunctionalModel`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.packing = Packing()
        self.rewrote = False

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        plain = _PLAIN.get(func)
        if plain is not None:
            out = plain(*args, **kwargs)
            if out is not None:
                self.rewrote = True
                return out
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in KINDS and getattr(torch, name, None) is func:
            self.rewrote = True
            return run_kernel(name, list(args) + list(kwargs.values()), self.packing.steps)
        if func is torch._pack_padded_sequence:
            self.rewrote = True
            return self.packing.pack(*args, **kwargs)
        if func is torch._pad_packed_sequence:
            return self.packing.pad(*args, **kwargs)
        if func is Tensor.scatter_:  # pack_padded_sequence(enforce_sorted=False) inverts its permutation so
            with warnings.catch_warnings():  # under vmap: torch's exact fallback warns of its speed only
                warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
                return func(*args, **kwargs)
        return func(*args, **kwargs)


#: torch function -> its plain form (``None`` from the plain form: run torch's own)
_PLAIN: dict[Any, Any] = {
    torch._weight_norm: _weight_norm,
    torch.prelu: _prelu,  # also nn.functional.prelu
    nn.functional.embedding_bag: _embedding_bag,
    nn.functional.hardsigmoid: _hardsigmoid,
    nn.functional.grid_sample: fr.grid_sample,
    torch.cdist: fr.cdist,
    torch.pdist: fr.pdist,
    nn.functional.rrelu: fr.rrelu,
}
