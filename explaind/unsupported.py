r"""Model features explaind refuses (complex parameters, randomized leaky ReLUs, random draws when explaining,
operations without a forward-mode derivative) and parameters only the loop's loss reads, each named with the fix.

Both are refused by the recorder (before the first step) and by the engine (a model given to
``Trajectory.load``), each with a message naming the modules or parameters and the fix:

* **complex parameters.** explaind replays a run in one real floating dtype (float64 by default):
  the path :math:`\theta_s + t\,\Delta\theta_s` and the kernels :math:`\varphi_s(x)` of docs/maths.md
  §2 are real, and casting a complex tensor to a real dtype keeps only its real part (torch warns
  and goes on), so a complex parameter would be explained as another model. The same weights as a
  real tensor of shape ``(..., 2)`` read through ``torch.view_as_complex`` in the forward are real
  parameters to the optimizer and to explaind.
* **``nn.RReLU`` in training mode.** Its negative slopes are drawn per element inside torch's fused
  ``rrelu_with_noise`` kernel, which has no ``vmap`` rule and no replay from a captured random state
  (docs/maths.md §1 needs every training forward re-evaluated exactly). In evaluation mode it is the
  leaky ReLU with slope :math:`(l + u)/2`, so ``nn.LeakyReLU((lower + upper) / 2)`` trains a model
  with the same evaluation-mode function that explaind records exactly.

:func:`evaluation_refusal` turns torch errors met while explaind evaluates a model into refusals
that name the cause and the fix: ``torch.autograd.grad`` called inside the forward (torch.func's ``grad`` composes
with explaind's transforms), an in-place ``index_add_``-style call into a tensor the forward created (its
out-of-place form runs under ``vmap``), a forward that draws random numbers in evaluation mode (Monte Carlo
dropout, ``F.dropout(x, p, training=True)``), whose output is no function of the parameters, and an
operation without a forward-mode derivative that explaind does not rewrite (``F.ctc_loss`` inside the forward;
:mod:`explaind.kernel.functional_rewrites` has those it does), which the path derivatives
:math:`\varphi_s(x)\,\Delta\theta_s` need (they are computed with ``torch.func.jvp``).

:func:`loss_only_hint` names, in a failed gradient check, the parameters that ``backward()`` gave a
gradient and the loss of the model's output did not: the loop's loss reads them outside that output
(a learned loss weight, as in uncertainty weighting, or a second head of a tuple), while explaind's
loss sees only ``(outputs, targets)`` (docs/maths.md §1: every update's data part is
:math:`\sum_k w_{s,k}\nabla\ell_k`, with :math:`\ell_k` a function of the model's output on sample
:math:`k`). :func:`extra_outputs_hint` names, in the same message, the other outputs of a model that returns
more than its logits (a tuple, or a mapping with an ``aux_loss``): explaind's loss reads only the
logits, so a loss the loop adds from the others (a mixture-of-experts load-balancing loss, which
couples the samples of a batch) is not the recorded loss.
"""

from __future__ import annotations

import math
import re
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .exceptions import UnsupportedModelError
from .inputs import Inputs

__all__ = ["evaluation_refusal", "extra_outputs_hint", "loss_only_hint", "padding_check_refusal", "refuse_unreplayable"]


def refuse_unreplayable(model: nn.Module, where: str) -> None:
    """Refuse a model holding a complex parameter or buffer, an ``nn.RReLU`` (see the module docstring), or an
    ``nn.FractionalMaxPool2d``/``3d`` (its regions are drawn at every forward, in evaluation mode too).

    Parameters
    ----------
    model : nn.Module
        The model to record or evaluate.
    where : str
        Who refuses, for the message.

    Raises
    ------
    UnsupportedModelError
        Naming every complex tensor, ``nn.RReLU`` or fractional max pooling and the fix.
    """
    found = [f"{name} ({t.dtype})" for name, t in [*model.named_parameters(), *model.named_buffers()]
             if t.is_complex()]
    if found:
        raise UnsupportedModelError(
            f"{where}: the model holds complex tensors {found[:8]}{' ...' if len(found) > 8 else ''}. explaind "
            f"replays a run in a real floating dtype, and casting a complex tensor to it keeps only the real part, "
            f"so the explained model would not be the trained one. Allowed: real floating parameters and buffers. "
            f"Fix: hold each as a real tensor of shape (..., 2), e.g. nn.Parameter(torch.view_as_real(w)) (for a "
            f"buffer, such as rotary factors from torch.polar: self.register_buffer(name, torch.view_as_real(t))), "
            f"and use torch.view_as_complex(self.w) in the forward (the same model, trained and explained exactly).")
    slopes = [f"{name or type(m).__name__} (lower={m.lower}, upper={m.upper})" for name, m in model.named_modules()
              if isinstance(m, nn.RReLU)]
    if slopes:
        raise UnsupportedModelError(
            f"{where}: the model holds nn.RReLU modules {slopes}, which draw a random negative slope per element in "
            f"training mode inside torch's fused rrelu_with_noise kernel; explaind cannot replay those draws "
            f"(the kernel has no vmap rule), so the training forwards cannot be re-evaluated exactly. Allowed: "
            f"activations without random draws, or random layers drawn with torch's generators (dropout). Fix: "
            f"nn.LeakyReLU((lower + upper) / 2), the function RReLU computes in evaluation mode.")
    pools = [f"{name or type(m).__name__} ({type(m).__name__})" for name, m in model.named_modules()
             if isinstance(m, (nn.FractionalMaxPool2d, nn.FractionalMaxPool3d))]
    if pools:
        raise UnsupportedModelError(
            f"{where}: the model holds {pools}, which draw their pooling regions at random at every forward, in "
            f"evaluation mode too: the trained model's outputs are random, no function of its parameters, so no "
            f"replica or score can explain them. Allowed: pooling without random draws. Fix: "
            f"nn.AdaptiveMaxPool2d(output_size) (or nn.AdaptiveMaxPool3d), the deterministic pooling to the same "
            f"output size.")


#: The plain form of operations without a forward-mode derivative that models use, named in the refusal.
#: (F.grid_sample, torch.cdist, F.pdist, F.embedding_bag and weight norm run as plain operations instead:
#: explaind.kernel.rewrites; these are the ones it does not rewrite)
_NO_FORWARD_AD_HINTS = {
    "_ctc_loss": " F.ctc_loss is such an operation: return the per-frame log-probabilities from the forward and "
                 "give the CTC loss as the loss callable (explaind differentiates losses in reverse mode only).",
}


#: torch's folder of higher-order operators (``torch.cond`` and its kin).
_HIGHER_ORDER = str(Path(torch.__file__).parent / "_higher_order_ops")


def evaluation_refusal(exc: BaseException) -> UnsupportedModelError | None:
    """The refusal for a torch error raised while explaind evaluates a model, or ``None`` (see the module
    docstring).

    Parameters
    ----------
    exc : BaseException
        What torch raised inside the model's forward under ``torch.func``.

    Returns
    -------
    UnsupportedModelError or None
        Naming the cause and the fix, for random draws in evaluation mode and operations without a forward-mode
        derivative; ``None`` for any other error.
    """
    text = str(exc)
    if "called random operation while in randomness error mode" in text:
        return UnsupportedModelError(
            "the model's forward draws random numbers in evaluation mode (e.g. Monte Carlo dropout, "
            "F.dropout(x, p, training=True), or torch.rand without a self.training guard), so its output is not a "
            "function of the parameters and cannot be explained; explaind evaluates the model in evaluation mode, "
            "one input at a time under torch.func.vmap, where torch refuses such draws. Training forwards are "
            "replayed from their captured random state, but a test input's forward has none. Fix: draw only in "
            "training mode, F.dropout(x, p, training=self.training), and explain the deterministic model; for a "
            "Monte Carlo average, explain it as a sum over fixed masks held as inputs or buffers.")
    if "You must implement the jvp function for custom autograd.Function" in text:
        return UnsupportedModelError(
            "the model's forward applies a custom torch.autograd.Function without a jvp staticmethod (torch's legacy "
            "nn.CrossMapLRN2d is one), so it has no forward-mode derivative, and explaind computes the path "
            "derivatives of the replica and the scores with torch.func.jvp. Allowed: operations with a forward-mode "
            "derivative. Fix: give the Function a jvp(ctx, *tangents) staticmethod (with setup_context and "
            "generate_vmap_rule = True, torch.func's style), or compute the same function from differentiable torch "
            "operations (for nn.CrossMapLRN2d: nn.LocalResponseNorm, a centred window, trained with it). The call: "
            f"{_user_frame(exc, source=True)}.")
    op = _higher_order_op(exc)
    if op is not None:
        return UnsupportedModelError(
            f"the model's forward calls torch.{op} (a higher-order control-flow operator), which torch.func cannot "
            f"differentiate in forward mode (jvp) nor per sample (grad under vmap) here, and explaind evaluates the "
            f"model under them; torch: '{text.splitlines()[0][:80] if text else type(exc).__name__}'. Fix: compute "
            f"the branches as plain operations and select with torch.where(pred, a, b) (the same values; a predicate "
            f"that flips as the parameters move is a jump, which the quadrature warnings name).")
    if "Cannot access data pointer of Tensor that doesn't have storage" in text:
        return UnsupportedModelError(
            f"the model's forward reads the memory of a tensor that depends on the input or the parameters "
            f"({_user_frame(exc)}): Tensor.numpy(), a NumPy or SciPy function, or a C extension, which the tensors "
            f"torch.func passes through a forward (vmap for one input at a time, jvp for the path derivatives) do "
            f"not have; torch: '{text[:70]}'. Such a value leaves autograd too, so the training gradient ignored "
            f"its dependence on the parameters. Fix: compute it with torch operations in the forward (torch.exp, "
            f"torch.special, torch.linalg, ...).")
    if "call Tensor.retain_grad() inside of a function being transformed" in text:
        return UnsupportedModelError(
            f"the model's forward calls Tensor.retain_grad() ({_user_frame(exc)}), which torch.func cannot run, "
            f"and explaind evaluates the model under torch.func (vmap for one input at a time, jvp for the path "
            f"derivatives). It changes no value. Fix: remove it from the forward (read an activation's gradient "
            f"with a forward hook of your own during the loop, removed before explaining).")
    if _autograd_call(exc) is not None:
        return UnsupportedModelError(
            f"the model's forward calls torch.autograd.{_autograd_call(exc)} itself (an input gradient: a force field, "
            f"a Hamiltonian or energy model), which does not compose with the torch.func transforms explaind "
            f"evaluates the model under (vmap for one input at a time, jvp for the path derivatives); torch: "
            f"'{text[:80]}'. Fix: compute that gradient with torch.func in the forward, the same values, e.g. "
            f"torch.func.vmap(torch.func.grad(energy))(x) for torch.autograd.grad(energy(x).sum(), x, "
            f"create_graph=True), torch.func.vmap(torch.func.jacrev(g))(x) for "
            f"torch.autograd.functional.jacobian(g, x); train and explain that model.")
    match = re.search(r"vmap: (?:aten::)?(\w+)\(self, \*extra_args\) is not possible", text)
    if match and "use out-of-place operators" in text:  # torch writes index_add_ bare, scatter_ as aten::scatter_
        op = match.group(1)
        args = "(mask, values)" if op.startswith("masked") else "(dim, index, values)"
        return UnsupportedModelError(
            f"the model's forward calls the in-place Tensor.{op} on a tensor it created itself (e.g. "
            f"torch.zeros(...).{op}{args}) with values that depend on the input or the parameters, "
            f"which torch.func.vmap cannot run, and explaind evaluates the model one input at a time under vmap "
            f"(torch: 'vmap: {op}(self, *extra_args) is not possible'). Fix: call the out-of-place "
            f"Tensor.{op.rstrip('_')}, the same values (torch.zeros(...).{op.rstrip('_')}{args}).")
    match = re.search(r"forward AD with (\w+) that does not support it", text)
    if match:
        op = match.group(1)
        hint = _NO_FORWARD_AD_HINTS.get(op, "")
        return UnsupportedModelError(
            f"the model's forward calls torch's {op}, which has no forward-mode derivative in torch, and explaind "
            f"computes the path derivatives of the replica and the scores with torch.func.jvp. Allowed: operations "
            f"with a forward-mode derivative (torch's derivatives.yaml). Fix: compute the same function from such "
            f"operations in the forward (a custom torch.autograd.Function with a jvp staticmethod works too).{hint}")
    return None


def _higher_order_op(exc: BaseException) -> str | None:
    """The name of torch's higher-order operator (``cond``, ``while_loop``, ``scan``, ``map``) in whose code ``exc``
    was raised (a frame under torch/_higher_order_ops/), else ``None``."""
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith(_HIGHER_ORDER):
            return Path(frame.filename).stem
    match = re.search(r"torch/_higher_order_ops/(\w+)\.py", str(exc))  # dynamo reports it as "from user code"
    return match.group(1) if match else None


def _user_frame(exc: BaseException, source: bool = False) -> str:
    """``"Class.method, file.py:12"`` of the innermost traceback frame outside torch and this package (with
    ``source``, followed by ``": "`` and that line's code), or ``"line not found"``."""
    library = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(library)]
    if not frames:
        return "line not found"
    code = f": {frames[-1].line}" if source and frames[-1].line else ""
    return f"{frames[-1].name}, {frames[-1].filename}:{frames[-1].lineno}{code}"


def padding_check_refusal(exc: BaseException) -> UnsupportedModelError | None:
    """The refusal for a vmap error raised in Hugging Face's ``warn_if_padding_and_no_attention_mask``, naming the
    model and the fixes, or ``None`` when ``exc`` was raised elsewhere."""
    padding_check = _padding_check_model(exc)
    if padding_check is not None:
        return UnsupportedModelError(
            f"the forward of {padding_check} calls Hugging Face's warn_if_padding_and_no_attention_mask, because it "
            f"was given no attention_mask and its config has a pad_token_id: the check reads whether the pad token "
            f"is among the first and last input ids (pad_token_id in input_ids[:, [-1, 0]], an .item()), which "
            f"torch.func.vmap cannot trace, and explaind evaluates the model one input at a time under vmap. The "
            f"check only warns; it changes no output. Fix (either): pass the padding mask in train_data and the "
            f"test inputs alike as a 4-D boolean mask (explaind.integrations.four_d_attention_mask(mask), a mask "
            f"of ones when nothing is padded), or build the model with pad_token_id=None in its config when no "
            f"input is padded (the check is then skipped; the embedding's padding row trains like the others).")
    return None


def _padding_check_model(exc: BaseException) -> str | None:
    """The class name of the Hugging Face model whose ``warn_if_padding_and_no_attention_mask`` raised ``exc``
    (a frame of that name in its traceback), else ``None``."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_name == "warn_if_padding_and_no_attention_mask":
            return type(frame.f_locals.get("self")).__name__
    return None


def _autograd_call(exc: BaseException) -> str | None:
    """``"grad"`` or ``"backward"`` when ``exc`` was raised inside ``torch.autograd.grad`` or ``backward`` called
    from a model's forward (a frame of torch/autograd/__init__.py of that name), else ``None``."""
    if not isinstance(exc, RuntimeError):
        return None
    autograd_init = str(Path(torch.autograd.__file__))
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == autograd_init and frame.name in ("grad", "backward"):
            return frame.name
    return None


def loss_only_hint(sums: dict[str, tuple[float, ...]], replayed: bool = True) -> str:
    """The failed gradient check's hint for parameters with a loop gradient but none from the model's output.

    Parameters
    ----------
    sums : dict of str to tuple of float
        The check's per-parameter sums ``(D, R, G, E)`` (:class:`explaind.trajectory._checks.StreamedSums`):
        ``R`` the squared norm of the recomputed gradient, ``G`` that of the loop's.
    replayed : bool
        Whether the check replayed the loop's training forwards (else it recomputed in evaluation mode, where a
        branch taken only in training, such as a random draw, is skipped).

    Returns
    -------
    str
        Empty when every parameter with a loop gradient also has a recomputed one; the zero loop gradient named
        when no parameter has one and some have a recomputed one.
    """
    if sums and all(v[2] == 0.0 for v in sums.values()) and any(v[1] > 0.0 for v in sums.values()):
        return (" The loop's gradient is zero at every checked parameter, while loss= gives a nonzero one: the "
                "loop trained with a loss that does not move these outputs (cross entropy over a single output "
                "column, whose log_softmax is 0; a loss of a detached output) or with another loss than loss= "
                "names (an autoencoder's F.mse_loss needs loss='mse').")
    names = [n for n, v in sums.items() if v[1] == 0.0 and v[2] > 0.0]
    if not names:
        return ""
    eval_only = ("; or only the training-mode forward uses them, and the check recomputed in evaluation mode (no "
                 "training forward is replayed: see the random draws below)" if not replayed else "")
    return (f" The parameter(s) {names[:6]} got a gradient from backward() but none through the recomputed loss of "
            f"the output explaind reads (the logits, or a tuple's first element): the loop's loss reaches them "
            f"another way, directly (a learned loss weight or temperature, as in uncertainty weighting) or through "
            f"another output of the model (a second head){eval_only}. Fix for a loss weight or a second head: return "
            f"all the loss reads in that one output (torch.cat([logits, other], 1), a learned weight as a column "
            f"log_var.expand(n, 1)) and give a loss callable that reads it there.")


def negated_loss_hint(sums: Any, sigma: float, tol: float) -> str:
    """The failed gradient check's hint for a loop gradient that is a negative multiple of the recomputed one.

    Parameters
    ----------
    sums : StreamedSums
        The check's sums (:class:`explaind.trajectory._checks.StreamedSums`): per parameter ``(D, R, G, E)`` and
        ``distance_sq(sigma)``.
    sigma : float
        The best scale ``D / R`` of the check.
    tol : float
        The check's relative tolerance.

    Returns
    -------
    str
        Empty unless ``sigma < 0`` and the loop's gradient is ``sigma`` times the recomputed one within ``tol``.
    """
    if sigma >= 0.0:
        return ""
    ref = math.fsum(v[1] for v in sums.sums.values())
    raw = math.fsum(v[2] for v in sums.sums.values())
    off = math.sqrt(math.fsum(sums.distance_sq(sigma).values())) / math.sqrt(max(raw, ref * sigma * sigma, 1e-300))
    if off > tol:
        return ""
    return (f" The loop's gradient is {sigma:.3g} times the gradient of loss= (to {off:.1e} relative): the loop "
            f"backwarded the negated loss, as a loop that ascends -loss with maximize=True does. Fix: give loss= the "
            f"loss the loop backwards, a callable such as loss=lambda out, y: -F.cross_entropy(out, y) (exact), or "
            f"backward the loss itself with maximize=False, which takes the same steps.")


def _hooked(module: nn.Module) -> set[str]:
    """The attributes torch's hook-based reparametrizations recompute before every forward (``weight`` under
    ``torch.nn.utils.prune``, the old ``weight_norm`` and ``spectral_norm``): computed from the parameters by torch
    itself, they are no loss term the loop could add."""
    return {n for h in module._forward_pre_hooks.values()
            for n in (getattr(h, "_tensor_name", None), getattr(h, "name", None)) if isinstance(n, str)}


def attribute_outputs_hint(model: nn.Module) -> str:
    """The failed gradient check's hint for tensors its forward keeps as module attributes (empty when none).

    A tensor attribute that is neither a parameter nor a buffer and carries an autograd graph (``grad_fn``) was
    computed from the parameters by the last forward that ran with gradients (the loop's or the check's): a loss
    the loop adds from it (``loss + model.kl``, a VAE's KL term kept on the model) is not the recorded loss.
    """
    kept = [f"{k!r} on {name or '<root>'} ({type(m).__name__})" for name, m in model.named_modules()
            for k, v in vars(m).items() if torch.is_tensor(v) and v.grad_fn is not None and k not in _hooked(m)]
    if not kept:
        return ""
    return (f" The model keeps tensors its forward computes from the parameters as attributes ({', '.join(kept[:4])}):"
            f" a loss the loop adds from them (a VAE's KL term, an auxiliary loss) is not the recorded loss, which "
            f"reads only the model's output. Fix: when that term is a mean of per-sample terms (a VAE's per-sample "
            f"KL), return it as an output column (torch.cat([logits, kl[:, None]], 1)) with a loss callable that "
            f"adds it; otherwise leave it out of the run you record.")


def extra_outputs_hint(model: nn.Module, x: Any) -> str:
    """The failed gradient check's hint for a model returning more than its logits, or keeping tensors computed
    from the parameters as attributes (:func:`attribute_outputs_hint`); empty otherwise.

    Runs the model once on the first row of ``x`` in evaluation mode without gradients (buffers unchanged) and
    names the outputs besides the logits: a tuple's further tensors, or a mapping's tensors other than ``logits``.

    Parameters
    ----------
    model : nn.Module
        The recorded model.
    x : Tensor or Inputs
        The logged batch's inputs ``(n, ...)``.
    """
    kept = attribute_outputs_hint(model)
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = x[:1].call(model) if isinstance(x, Inputs) else model(x[:1])
    except Exception:  # noqa: BLE001 - a hint must not hide the check's own message
        return kept
    finally:
        model.train(was)
    if isinstance(out, tuple | list):
        extra = [f"output {i}" for i, v in enumerate(out) if i > 0 and torch.is_tensor(v)]
    elif isinstance(out, Mapping):
        extra = [f"{k!r}" for k, v in out.items() if k != "logits" and "logits" in out and torch.is_tensor(v)]
    else:
        extra = []
    if not extra:
        return kept
    return kept + (f" The model returns more than its logits ({', '.join(extra[:4])}); explaind's loss reads only the "
            f"logits, so a loss the loop adds from the other outputs (an auxiliary or load-balancing loss of a "
            f"mixture of experts, which also couples the samples of a batch, or a second head's loss) is not the "
            f"recorded loss. Fix: when that loss is a mean of per-sample terms (a second head), return everything "
            f"it reads in one output (torch.cat([logits, other], 1)) with a loss callable that splits it; a loss "
            f"coupling the samples of a batch (load balancing) has no per-sample split: train without it while "
            f"recording.")
