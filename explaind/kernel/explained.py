r"""The explained function :math:`g(\theta, x)` on a private copy of the recorded model.

:class:`FunctionalModel` evaluates the trajectory's template with any parameters through
:func:`torch.func.functional_call` (frozen parameters and buffers are constants).
:class:`Explained` picks what is explained, :math:`g(\theta, x) \in \mathbb{R}^O`:

* ``"outputs"``: every output of the model, flattened (``O`` = outputs per input);
* ``"target"``: one chosen output per test input (``O = 1``, like Captum's ``target``), given as a flat
  index or, for outputs of shape ``(n, d_1, ..., d_r)`` such as token logits ``(n, length, vocab)``, as
  ``r`` indices per input (e.g. ``(position, token)``);
* ``"loss"``: the per-sample loss of ``(f(x; theta), y)`` (``O = 1``).

:meth:`Explained.build` validates a user's ``target``/``y`` and builds one for a set of test inputs.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..exceptions import ConfigError, UnsupportedModelError
from ..inputs import Inputs, call_model
from ..models import copy_memo, drop_backward_hooks, refuse_renormalising_embeddings, refuse_script_modules
from ..outputs import model_output
from ..unsupported import _user_frame, evaluation_refusal, padding_check_refusal, refuse_unreplayable
from .casts import KeepReplayDtype
from .rewrite_scan import reachable_rewrite
from .rewrites import FusedKernelRewrite, needs_rewrite

#: torch's error for an in-place operation whose own tensor cannot hold the broadcast result: under vmap, a tensor the
#: forward created (unbatched) updated in place with a batched one (``buf[:, :k] += h``).
#: What torch.func.vmap says of a forward that branches on values: ``.item()`` and its kin, then indexing with a
#: boolean mask (and other operators whose output shape depends on values).
VALUE_BRANCHES = ("vmap: It looks like you", "vmap: We do not support batching operators that can support dynamic")
SELF_SHAPE = r"output with shape \[[\d, ]*\] doesn't match the broadcast shape"

__all__ = ["FunctionalModel", "Explained", "ExplainedKind", "Params"]

ExplainedKind = Literal["outputs", "target", "loss"]
Params = dict[str, Tensor]

#: torch's kernels without a forward-mode derivative that :class:`FusedKernelRewrite` replaces
_REWRITTEN_OPS = ("grid_sampler_2d", "grid_sampler_3d", "_cdist_forward", "_euclidean_dist", "_pdist_forward",
                  "_embedding_bag", "_weight_norm_interface")


def _rewritten_op(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's refusal of forward-mode differentiation of a kernel the rewrite mode replaces."""
    text = str(exc)
    return "forward AD with" in text and any(f"forward AD with {op} " in text for op in _REWRITTEN_OPS)


class FunctionalModel:
    """A private copy of the template model, in evaluation mode, on the compute device and dtype.

    Parameters
    ----------
    module : nn.Module
        The trajectory's template (``traj.model``); it is copied, never modified.
    constants : mapping
        Frozen parameters and buffers, passed to every ``functional_call``.
    loss_fn : callable
        Per-sample training loss ``(outputs, targets) -> (n,)``.
    device, dtype
        Where and in which floating dtype everything is computed.
    shared : sequence, optional
        Objects the copy keeps rather than copies, wherever the module holds them: the private
        generators passed to the recorder (``traj.generators``), so that a replay setting their state
        reaches the draws of the copy (a generator held by a helper object the module holds).
    """

    def __init__(self, module: nn.Module, constants: Mapping[str, Tensor], loss_fn: Any, device: torch.device,
                 dtype: torch.dtype, shared: Sequence[Any] = ()):
        refuse_renormalising_embeddings(module, "explaind cannot evaluate this model")
        refuse_script_modules(module, "explaind cannot evaluate this model")
        refuse_unreplayable(module, "explaind cannot evaluate this model")
        _refuse_batch_statistics(module)
        self.shared = tuple(shared)
        self.module = self.copy(module).to(device=device, dtype=dtype).eval()
        drop_backward_hooks(self.module)  # they change no output (explaind.models.backward_hooks_off)
        self.device = device
        self.dtype = dtype
        self.constants = {k: self.cast(v) for k, v in constants.items()}
        self.loss_fn = loss_fn
        #: embeddings whose padding row torch's backward leaves out (see :meth:`outputs`)
        self._padded = [m for m in self.module.modules() if isinstance(m, nn.Embedding) and m.padding_idx is not None]
        #: recurrent layers, weight norms and the functional calls torch.func cannot transform run as plain
        #: operations (:mod:`~explaind.kernel.rewrites`): ``True`` for a model holding such a module or whose forward
        #: code can reach such a call on any branch (:mod:`~explaind.kernel.rewrite_scan`), ``True``/``False`` once
        #: the census (the first forward, run in the rewrite mode) has told for any other, ``None`` until then
        self._rewrite: bool | None = True if needs_rewrite(self.module) or reachable_rewrite(self.module) else None
        #: :meth:`outputs` converts to this dtype where the forward converts below it (:mod:`~explaind.kernel.casts`)
        self.keep_dtype = False

    def rewritten(self) -> contextlib.AbstractContextManager[Any]:
        """The block in which the fused kernels ``torch.func`` cannot transform run as plain operations.

        Until a forward has completed in it (the census), the block is the rewrite mode and records whether it
        rewrote anything; afterwards it is the mode for a model that needed it and no mode at all otherwise.
        """
        if self._rewrite is None:
            return self._census()
        return FusedKernelRewrite() if self._rewrite else contextlib.nullcontext()

    @contextlib.contextmanager
    def _census(self) -> Iterator[None]:
        """The rewrite mode, whose :attr:`~explaind.kernel.rewrites.FusedKernelRewrite.rewrote` after a forward that
        completed fixes :attr:`_rewrite`; ``torch.compile``'d code runs eagerly in it."""
        mode = FusedKernelRewrite()
        # a torch.compile'd model runs this one forward eagerly: compiled under the mode, it would be compiled again
        # without it (dynamo guards the mode stack), using up its recompile limit
        with torch.compiler.set_stance("force_eager"), mode:
            yield
        if self._rewrite is None:
            self._rewrite = mode.rewrote

    def copy(self, module: nn.Module) -> nn.Module:
        """A deep copy of ``module`` that holds the objects of :attr:`shared` themselves."""
        return copy.deepcopy(module, copy_memo(module, self.shared))

    def cast(self, t: Any) -> Any:
        """Move to the compute device; floating tensors also to the compute dtype (every tensor of :class:`Inputs`)."""
        if isinstance(t, Inputs):
            return t.map(self.cast)
        t = torch.as_tensor(t)
        if t.is_floating_point():
            return t.detach().to(device=self.device, dtype=self.dtype)
        return t.detach().to(device=self.device)

    def cast_params(self, params: Mapping[str, Tensor], names: Sequence[str]) -> Params:
        """``{name: cast(params[name])}`` for ``names``."""
        return {n: self.cast(params[n]) for n in names}

    def __call__(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Model outputs ``f(x; params)`` of shape ``(n, ...)`` (the logits of a tuple or ``ModelOutput``).

        ``scaled_dot_product_attention`` runs its math backend, the one with forward-mode derivatives,
        and ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` their standard forward (their
        evaluation-mode fast path has no forward-mode derivatives and bypasses the layers' hooks).
        Recurrent layers and weight norms run as plain operations (:meth:`rewritten`).
        """
        with sdpa_kernel(SDPBackend.MATH), _standard_attention(), self.rewritten():
            try:
                out = model_output(call_model(self.module, {**self.constants, **params}, x))
                if isinstance(out, Tensor) and out.is_complex():
                    raise UnsupportedModelError(
                        f"the model returns complex outputs ({out.dtype}), and explaind explains real ones (the "
                        f"path integrals, the scores and the replica are real). Fix: return real outputs, e.g. "
                        f"torch.view_as_real(out).flatten(-2) (the real and imaginary parts as outputs) or out.abs() "
                        f"if that is what the loss reads, and give the loss those")
                return out
            except AssertionError as exc:  # torch's higher-order ops (torch.cond) under jvp
                refusal = evaluation_refusal(exc)
                if refusal is not None:
                    raise refusal from exc
                raise
            except RuntimeError as exc:
                if self._rewrite is False and _rewritten_op(exc):  # a branch the census did not take
                    self._rewrite = True
                    return self(params, x)
                refusal = evaluation_refusal(exc)
                if refusal is not None:
                    raise refusal from exc
                if "call Tensor.requires_grad_() (or perhaps" in str(exc):
                    raise UnsupportedModelError(
                        "a forward hook or the forward itself calls Tensor.requires_grad_(False), which torch.func "
                        "cannot run (requires_grad_(True), as in the input-embedding hook of Hugging Face's "
                        "gradient checkpointing, is inert inside explaind's model calls). Fix: remove that call "
                        "from the forward or the hook; it marks tensors for autograd and changes no value."
                    ) from exc
                if "vmap: inplace arithmetic" in str(exc) or re.search(SELF_SHAPE, str(exc)):
                    raise UnsupportedModelError(
                        "the model's forward writes a tensor that depends on the input or the parameters into a "
                        "tensor it created itself, in place (e.g. buf = torch.zeros(...); buf[:, :k] = weights, or "
                        "buf[:, :k] += weights), which torch.func.vmap cannot run (torch: 'vmap: inplace arithmetic "
                        "... is not possible', or 'output with shape ... doesn't match the broadcast shape'), "
                        "and explaind evaluates the model one input at a time under vmap. Hugging Face BigBird's "
                        "attention_type='block_sparse' does this (it assembles its attention probabilities so). "
                        "Fix: build such tensors out of place (torch.cat, torch.stack, torch.where, F.pad) in the "
                        "model's forward; for BigBird train and explain with attention_type='original_full'."
                        f" The call: {_user_frame(exc, source=True)}."
                    ) from exc
                if "In order to use an autograd.Function with functorch transforms" in str(exc):
                    raise UnsupportedModelError(
                        "the model's forward applies a custom torch.autograd.Function written in the old style "
                        "(forward(ctx, ...) without a setup_context staticmethod), which torch.func cannot "
                        "transform, and explaind evaluates the model under torch.func (vmap for one input at a time, "
                        "jvp for the path derivatives). Fix: write it in torch.func's style (docs: 'Extending "
                        "torch.func with autograd.Function'): forward(*inputs) without ctx, a setup_context(ctx, "
                        "inputs, output) staticmethod that saves what backward and jvp need, generate_vmap_rule = "
                        "True, and a jvp(ctx, *tangents) staticmethod; or compute the same function from "
                        "differentiable torch operations." + _old_style_sites(self.module)
                    ) from exc
                if not any(m in str(exc) for m in VALUE_BRANCHES):
                    raise
                if any(type(m).__name__.startswith(("Longformer", "LED")) for m in self.module.modules()):
                    raise UnsupportedModelError(
                        "Hugging Face Longformer and LED with global attention (a global_attention_mask in the "
                        "inputs, or LongformerForSequenceClassification, which puts global attention on the first "
                        "token by itself) read the global-attention indices as values in the forward (nonzero() "
                        "on the global_attention_mask), which torch.func.vmap cannot trace, and explaind evaluates "
                        "the model one input at a time under vmap: such a run cannot be explained (its training "
                        "records exactly). Fix: for LED, leave global_attention_mask out of train_data and the test "
                        "inputs (its local-window attention alone is explained exactly); or train a model with "
                        "dense attention (RoBERTa, or BigBird with attention_type='original_full') for the run you "
                        "want explained."
                    ) from exc
                padding = padding_check_refusal(exc)
                if padding is not None:
                    raise padding from exc
                routed = _top_k_routers(self.module)
                if routed:
                    raise UnsupportedModelError(
                        f"the model's mixture-of-experts blocks ({'; '.join(routed[:4])}) run their experts with "
                        f"a loop such as Hugging Face's experts_implementation='eager', which looks up the "
                        f"experts a batch's tokens were routed to (nonzero() on the routing mask), a branch on "
                        f"values that torch.func.vmap "
                        f"cannot trace, and explaind evaluates the model one input at a time under vmap. Routing "
                        f"each token to its top-k experts is also a jump: the chosen experts switch as the router's "
                        f"weights move, which no path integral crosses. Fix: build the model with "
                        f"experts_implementation='batched_mm' (a config argument), which vmap traces, and for the "
                        f"run you want explained route every token to all experts (num_experts_per_tok equal to "
                        f"the number of experts: softmax weights over all of them, a continuous forward); with "
                        f"top-k routing the estimators then warn about the router's torch.topk and keep the jumps "
                        f"in quadrature_error.{_no_switch(routed)}"
                    ) from exc
                raise UnsupportedModelError(
                    f"the model's forward branches on the values of its inputs ({exc.args[0][:60]}...), which "
                    f"torch.func.vmap cannot trace, and explaind evaluates the model one input at a time under "
                    f"vmap. In a forward of your own look for .item(), .tolist(), bool(tensor) in an if, "
                    f"torch.nonzero, boolean-mask indexing and F.one_hot (which reads its input's largest value); "
                    f"fix: compute the same values with tensor operations (torch.where, torch.gather, "
                    f"(idx[..., None] == torch.arange(k)).to(dtype) for a one-hot). For Hugging Face models this "
                    f"is the attention-mask shortcut of a 2-D attention_mask: "
                    f"pass a 4-D boolean mask instead (explaind.integrations.four_d_attention_mask(mask), for a "
                    f"causal LM four_d_attention_mask(mask, causal=True): a 4-D mask is used as given, so without "
                    f"causal=True the model would see later tokens; left padding included), in train_data and the "
                    f"test inputs alike, or no mask for right-padded causal LMs. An encoder-decoder that hands the "
                    f"encoder's mask to its decoder's cross attention (Pix2Struct) cannot take the encoder's 4-D mask "
                    f"(its (n, 1, L, L) shape does not fit the decoder's queries): call the encoder and the decoder "
                    f"apart in a module of your own, the encoder with four_d_attention_mask(mask) and the decoder "
                    f"with encoder_attention_mask=mask.bool()[:, None, None, :].expand(n, 1, T, L) for its T "
                    f"queries (see docs/guide_own_model.md)."
                    f" The call: {_user_frame(exc, source=True)}."
                ) from exc

    def outputs(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        r"""Model outputs like :meth:`__call__`, differentiable in every parameter entry (what :math:`g` uses).

        Torch's backward of an embedding with ``padding_idx`` leaves the padding row out (its
        gradient is zero) although the forward reads it; when that row moves (weight decay) the
        Jacobian must include it for :math:`\Phi_s \cdot \Delta\theta_s` to add up to the change of
        :math:`g`. So the padding index is lifted during this forward (the forward is unchanged);
        training losses (:meth:`sample_loss`) keep torch's gradient, the one the optimizer saw.

        With :attr:`keep_dtype`, conversions in the forward below the compute dtype keep the compute
        dtype (:class:`~explaind.kernel.casts.KeepReplayDtype`): :math:`g` is then the model's function
        without their rounding, while :meth:`sample_loss` still rounds as the training run did.
        """
        saved = [(m, m.padding_idx) for m in self._padded]
        for m, _ in saved:
            m.padding_idx = None
        try:
            with KeepReplayDtype(self.dtype) if self.keep_dtype else contextlib.nullcontext():
                return self(params, x)
        finally:
            for m, idx in saved:
                m.padding_idx = idx

    def sample_loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Per-sample training losses ``l_k(params)``, shape ``(n,)``."""
        return self.loss_fn(self(params, x), y).reshape(-1)


def _refuse_batch_statistics(module: nn.Module) -> None:
    """Refuse batch norms that normalise with the statistics of the batch in evaluation mode too."""
    bad = [f"{name or type(m).__name__!r} ({type(m).__name__})" for name, m in module.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats]
    if bad:
        raise UnsupportedModelError(
            f"the batch norm module(s) {', '.join(bad)} have track_running_stats=False, so even in evaluation mode "
            f"they normalise with the statistics of the batch they are given: a test input's output depends on "
            f"the other inputs of its batch, while explaind explains each input's output on its own. Fix: "
            f"track_running_stats=True (the default), or a per-sample normalisation (nn.LayerNorm, nn.GroupNorm)."
        )


@contextlib.contextmanager
def _standard_attention() -> Iterator[None]:
    """Switch off torch's fused attention fast path (``torch.backends.mha``) inside the block."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@dataclass(frozen=True)
class Explained:
    """The explained quantity for a set of test inputs.

    Attributes
    ----------
    kind : {"outputs", "target", "loss"}
    aux : Tensor
        Per-input auxiliary data, shape ``(T, ...)``: one-hot target rows ``(T, O_model)``
        (``"target"``), test targets ``y`` (``"loss"``), or zeros ``(T, 1)`` (``"outputs"``).
    n_outputs : int
        ``O``.
    """

    kind: ExplainedKind
    aux: Tensor
    n_outputs: int

    def __call__(self, fm: FunctionalModel, params: Mapping[str, Tensor], x: Tensor, aux: Tensor) -> Tensor:
        """``g(params, x)`` of shape ``(n, O)``."""
        out = fm.outputs(params, x)
        if self.kind == "loss":
            return fm.loss_fn(out, aux).reshape(-1, 1)
        flat = out.reshape(out.shape[0], -1)
        if self.kind == "target":
            return (flat * aux).sum(-1, keepdim=True)
        return flat

    def take(self, idx: Tensor | slice) -> Explained:
        """The same quantity for a subset of the test inputs."""
        return Explained(self.kind, self.aux[idx], self.n_outputs)

    @classmethod
    def build(cls, fm: FunctionalModel, theta: Params, X: Tensor, target: Any, y: Any, owner: str) -> Explained:
        """:math:`g` for inputs ``X``: all outputs (``None``), ``target`` indices, or ``"loss"`` with ``y``.

        ``theta`` (any parameters of the run) sizes the model's outputs; ``owner`` names the caller
        in error messages.

        Raises
        ------
        ConfigError
            When ``y`` is missing or misshaped for ``"loss"``, or ``target`` is not one in-range
            output index per input.
        """
        T = X.shape[0]
        if target is None:
            return cls("outputs", torch.zeros(T, 1, dtype=fm.dtype, device=fm.device), _n_outputs(fm, theta, X))
        if isinstance(target, str):
            if getattr(fm.loss_fn, "batch_coupled", False):
                raise ConfigError(
                    f"{owner}: target='loss' explains the loss of each test input alone, but the training loss is "
                    f"batch-coupled (explaind.batch_coupled_loss): its term on a batch of one test input is not a "
                    f"term of any batch (CLIP's InfoNCE of a single pair is 0). Fix: explain the outputs "
                    f"(target=None: the embeddings) or one output index per input (target=[...]).")
            if y is None:
                raise ConfigError(f"{owner}: target='loss' needs the test targets: call transform(X, y) with y of "
                                  f"length {T}.")
            yy = fm.cast(torch.as_tensor(y))
            if yy.shape[0] != T:
                raise ConfigError(f"{owner}: y has {yy.shape[0]} entries but X has {T} inputs; pass one target "
                                  f"per test input.")
            return cls("loss", yy, 1)
        shape = _output_shape(fm, theta, X)
        n_out = math.prod(shape)
        tgt = _flat_target(torch.as_tensor(target), shape, T, owner)
        if tgt.numel() == 1 and T != 1:
            tgt = tgt.expand(T)
        if tgt.shape[0] != T or tgt.is_floating_point() or tgt.dtype == torch.bool:
            raise ConfigError(f"{owner}: target must be None, 'loss', an int, {T} ints (one output index per test "
                              f"input, flat) or a ({T}, {len(shape)}) array of indices into the output shape "
                              f"{shape}; got {target!r}.")
        if int(tgt.min()) < 0 or int(tgt.max()) >= n_out:
            raise ConfigError(f"{owner}: target indices must lie in 0..{n_out - 1} (the model has {n_out} outputs "
                              f"per input); got values from {int(tgt.min())} to {int(tgt.max())}.")
        onehot = torch.nn.functional.one_hot(tgt.long(), n_out).to(device=fm.device, dtype=fm.dtype)
        return cls("target", onehot, 1)


def _output_shape(fm: FunctionalModel, theta: Params, X: Tensor) -> tuple[int, ...]:
    """Shape of the model's outputs for one input, ``(d_1, ..., d_r)``."""
    with torch.no_grad():
        out = fm(theta, X[:1])
    return tuple(int(d) for d in out.shape[1:])


def _n_outputs(fm: FunctionalModel, theta: Params, X: Tensor) -> int:
    """Number of model outputs per input (``O`` of ``target=None``)."""
    return math.prod(_output_shape(fm, theta, X))


def _flat_target(tgt: Tensor, shape: tuple[int, ...], T: int, owner: str) -> Tensor:
    """Flat output indices ``(T,)`` from flat indices or from ``(T, r)`` indices into ``shape`` (row-major)."""
    if tgt.dim() != 2 or tgt.shape[1] < 2 or tgt.is_floating_point() or tgt.dtype == torch.bool:
        return tgt.reshape(-1)
    if tgt.shape != (T, len(shape)):
        raise ConfigError(f"{owner}: a target of indices into the output shape {shape} must have shape "
                          f"({T}, {len(shape)}), one row per test input; got {tuple(tgt.shape)}.")
    bounds = torch.tensor(shape)
    if bool((tgt < 0).any()) or bool((tgt >= bounds).any()):
        raise ConfigError(f"{owner}: target indices must lie within the output shape {shape} (0 <= index < size "
                          f"along each axis); got rows from "
                          f"{tgt.min(0).values.tolist()} to {tgt.max(0).values.tolist()}.")
    strides = torch.tensor([math.prod(shape[i + 1:]) for i in range(len(shape))])
    return (tgt.long() * strides).sum(1)


def _top_k_routers(model: nn.Module) -> list[str]:
    """``"<path> (<class>, top_k=k, experts_implementation=...)"`` for every module of ``model`` that routes tokens
    to ``top_k`` of its ``experts`` (``top_k`` on the block or on a child router: Hugging Face's sparse
    mixture-of-experts blocks); ``[]`` when there is none."""
    found = []
    for name, m in model.named_modules():
        experts = getattr(m, "experts", None)
        top_k = next((c.top_k for c in (m, *m.children()) if isinstance(getattr(c, "top_k", None), int)),
                     None)
        if isinstance(experts, nn.Module) and top_k is not None:
            impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
            found.append(f"{name or '<root>'} ({type(m).__name__}, top_k={top_k}, experts_implementation={impl!r})")
    return found


def _no_switch(routed: list[str]) -> str:
    """For the blocks of :func:`_top_k_routers` whose experts have no ``experts_implementation`` (DBRX's
    ``DbrxExperts`` loop over the routed experts whatever the config says), the fix that applies to them."""
    bare = [r for r in routed if r.endswith("experts_implementation=None)")]
    if not bare:
        return ""
    return (f" The experts of {'; '.join(bare[:4])} have no such switch (the config argument changes nothing): "
            f"replace the experts module's forward, before training, by one that runs every expert on every token "
            f"and weighs expert e by the sum over k of top_k_weights[..., k] * (top_k_index[..., k] == e), the "
            f"same function when every token is routed to all experts.")


def _old_style_sites(model: nn.Module) -> str:
    """A sentence naming the modules of ``model`` whose class's ``forward`` calls ``F.apply`` for an old-style
    ``torch.autograd.Function`` ``F`` of the class's own Python module (no ``setup_context``), and the fix for a
    model one did not write; ``""`` when none is found."""
    sites = []
    for name, m in model.named_modules():
        cls = type(m)
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        space = vars(sys.modules.get(cls.__module__, inspect))
        for fname, obj in space.items():
            if (isinstance(obj, type) and issubclass(obj, torch.autograd.Function) and f"{fname}.apply(" in source
                    and "setup_context" not in vars(obj)):
                sites.append(f"{fname}.apply in {name or '<root>'} ({cls.__name__})")
    if not sites:
        return ""
    shown = "; ".join(sites[:4]) + (f"; and {len(sites) - 4} more" if len(sites) > 4 else "")
    return (f" Found: {shown}. In a model you did not write, replace those modules before training by ones that "
            f"compute the same function with torch operations (e.g. model.<path> = MyModule(), whose forward is the "
            f"Function's forward written out), and record that run.")

