"""Refusals, at the recorder, of torch layers explaind cannot record or differentiate as they are.

* **Lazy modules** (``nn.LazyLinear``, ``nn.LazyConv2d``, ``nn.LazyBatchNorm2d``, ...) hold
  ``UninitializedParameter`` and ``UninitializedBuffer`` objects until their first forward infers the input sizes.
  The recorder stores the parameters' shapes and values :math:`\\theta_0` when it is built, before any forward, so a
  model still uninitialised there has no :math:`\\theta_0` to start the path integrals from (docs/maths.md §2).
  torch's own recipe is the fix: one forward on a batch (a dry run) before the optimizer and the recorder are built.
* ``nn.CrossMapLRN2d`` runs torch's legacy ``autograd.Function`` (``forward(ctx, ...)`` with a backward and no
  ``jvp``), so it has no forward-mode derivative, which the replica and the scores need (docs/engine.md §2). Its
  channel window is not :class:`~torch.nn.LocalResponseNorm`'s (the first channel stays in the sums of the later
  ones), so replacing it is a change of model.
* **Sparse parameters and buffers** (a graph's adjacency kept as ``torch.sparse_coo_tensor`` for
  ``torch.sparse.mm``): torch has no forward-mode derivative of sparse products and no value comparison of sparse
  tensors, which the buffer watch makes every step; the same products written dense (``adj.to_dense()`` and
  ``adj @ h``) or over an edge list (``index_add``/``scatter_add``) are exact.

Each refusal is an :class:`~explaind.exceptions.UnsupportedModelError` naming the modules and the fix.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .exceptions import UnsupportedModelError

__all__ = ["refuse_unrecordable_layers"]


def refuse_unrecordable_layers(model: nn.Module, where: str) -> None:
    """Refuse a model whose lazy modules have not run their first forward, that holds sparse tensors, or
    ``nn.CrossMapLRN2d`` (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The model given to the recorder.
    where : str
        Who refuses, for the message.

    Raises
    ------
    UnsupportedModelError
        Naming the uninitialised parameters and buffers (with their modules' classes) and the dry-run fix, the
        sparse ones (with their layouts) and the dense or edge-list fix, or each ``nn.CrossMapLRN2d`` and its fixes.
    """
    modules = dict(model.named_modules())
    found = [f"{name} ({type(modules[name.rpartition('.')[0]]).__name__})"
             for name, t in [*model.named_parameters(), *model.named_buffers()] if is_lazy(t)]
    if found:
        raise UnsupportedModelError(
            f"{where}: the model holds uninitialised parameters or buffers {found[:8]}"
            f"{' ...' if len(found) > 8 else ''}: lazy modules (nn.LazyLinear, nn.LazyConv2d, ...) infer their "
            f"shapes at their first forward, and the recorder stores the starting parameters when it is built, "
            f"so there are none to store yet. Allowed: a model whose parameters all have shapes. Fix: run one "
            f"forward on a batch before building the optimizer and the recorder, as torch's documentation of lazy "
            f"modules asks: with torch.no_grad(): model(X[:2]).")
    sparse = [f"{name} ({t.layout})" for name, t in [*model.named_parameters(), *model.named_buffers()]
              if t.layout != torch.strided]
    if sparse:
        raise UnsupportedModelError(
            f"{where}: the model holds sparse parameters or buffers {sparse[:8]}{' ...' if len(sparse) > 8 else ''} "
            f"(e.g. a graph's adjacency for torch.sparse.mm): torch has no forward-mode derivative of sparse "
            f"products, which the replica and the scores need, nor value comparisons of sparse tensors, which the "
            f"recorder makes every step. Allowed: dense (strided) tensors. Fix: register the tensor dense and "
            f"multiply densely, self.register_buffer('adj', adj.to_dense()) with adj @ h, or keep the edge list as "
            f"index buffers and sum messages with index_add or scatter_add; both give the same values.")
    legacy = [f"{name or '<root>'} (size={m.size}, alpha={m.alpha}, beta={m.beta}, k={m.k})"
              for name, m in modules.items() if isinstance(m, nn.CrossMapLRN2d)]
    if legacy:
        raise UnsupportedModelError(
            f"{where}: the model holds nn.CrossMapLRN2d modules {legacy}, which run torch's legacy "
            f"autograd.Function (forward(ctx, ...), a backward and no jvp): it has no forward-mode derivative, and "
            f"explaind differentiates the replica and the scores with torch.func.jvp, so the run could be recorded "
            f"but never explained. Allowed: layers built from torch operations with forward-mode derivatives. Fix: "
            f"nn.LocalResponseNorm(size, alpha, beta, k), torch's normalisation across channels with a centred "
            f"window (its values differ from CrossMapLRN2d's, so train the model with it), or the same function "
            f"written in torch operations in your own module.")
