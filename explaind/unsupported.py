r"""Model features explaind refuses before anything runs: complex parameters and randomized leaky ReLUs.

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

:func:`evaluation_refusal` turns two torch errors met while explaind evaluates a model into refusals
that name the cause and the fix: a forward that draws random numbers in evaluation mode (Monte Carlo
dropout, ``F.dropout(x, p, training=True)``), whose output is no function of the parameters, and an
operation without a forward-mode derivative (``F.grid_sample``), which the path derivatives
:math:`\varphi_s(x)\,\Delta\theta_s` need (they are computed with ``torch.func.jvp``).
"""

from __future__ import annotations

import re

from torch import nn

from .exceptions import UnsupportedModelError

__all__ = ["evaluation_refusal", "refuse_complex_parameters", "refuse_random_slopes"]


def refuse_complex_parameters(model: nn.Module, where: str) -> None:
    """Refuse a model holding a complex parameter or buffer (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The model to record or evaluate.
    where : str
        Who refuses, for the message.

    Raises
    ------
    UnsupportedModelError
        Naming every complex tensor and the fix.
    """
    found = [f"{name} ({t.dtype})" for name, t in [*model.named_parameters(), *model.named_buffers()]
             if t.is_complex()]
    if found:
        raise UnsupportedModelError(
            f"{where}: the model holds complex tensors {found[:8]}{' ...' if len(found) > 8 else ''}. explaind "
            f"replays a run in a real floating dtype, and casting a complex tensor to it keeps only the real part, "
            f"so the explained model would not be the trained one. Allowed: real floating parameters and buffers. "
            f"Fix: hold each as a real tensor of shape (..., 2), e.g. nn.Parameter(torch.view_as_real(w)), and "
            f"use torch.view_as_complex(self.w) in the forward (the same model, trained and explained exactly).")


def refuse_random_slopes(model: nn.Module, where: str) -> None:
    """Refuse ``nn.RReLU`` modules (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The model to record or evaluate.
    where : str
        Who refuses, for the message.

    Raises
    ------
    UnsupportedModelError
        Naming every ``nn.RReLU`` and the fix.
    """
    found = [f"{name or type(m).__name__} (lower={m.lower}, upper={m.upper})" for name, m in model.named_modules()
             if isinstance(m, nn.RReLU)]
    if found:
        raise UnsupportedModelError(
            f"{where}: the model holds nn.RReLU modules {found}, which draw a random negative slope per element in "
            f"training mode inside torch's fused rrelu_with_noise kernel; explaind cannot replay those draws "
            f"(the kernel has no vmap rule), so the training forwards cannot be re-evaluated exactly. Allowed: "
            f"activations without random draws, or random layers drawn with torch's generators (dropout). Fix: "
            f"nn.LeakyReLU((lower + upper) / 2), the function RReLU computes in evaluation mode.")


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
    match = re.search(r"forward AD with (\w+) that does not support it", text)
    if match:
        op = match.group(1)
        hint = (" F.grid_sample/F.affine_grid (a spatial transformer) is such an operation: resample with "
                "F.interpolate, or gather the four neighbours and weight them by hand." if "grid_sampler" in op
                else "")
        return UnsupportedModelError(
            f"the model's forward calls torch's {op}, which has no forward-mode derivative in torch, and explaind "
            f"computes the path derivatives of the replica and the scores with torch.func.jvp. Allowed: operations "
            f"with a forward-mode derivative (torch's derivatives.yaml). Fix: compute the same function from such "
            f"operations in the forward (a custom torch.autograd.Function with a jvp staticmethod works too).{hint}")
    return None
