r"""Checks of the model an estimator's ``fit`` replays the recorded steps with.

docs/recording.md, "Python attributes changed between steps" and "Losses that read parameters", has the user's side.

* :func:`~explaind.trajectory._attribute_record.check_model`: the model's plain attributes, children, modes, hooks,
  plain tensors and config fields against the fingerprint the recording kept (edits after ``with rec:``);
  :func:`~explaind.trajectory._attribute_record.check_final_state`: the recorded model object's parameters and
  buffers against their values when ``with rec:`` ended (``update_bn`` or training after recording).
* :func:`check_parameter_names`: recorded parameters that are no parameters of the model any more (renamed or
  replaced after the run, as ``torch.nn.utils.prune.remove`` replaces ``weight_orig``), refused.
* :func:`coupling_and_state`: a sample's evaluation-mode output that depends on the rest of its batch (its size, its
  row's position, other rows), measured on a few training samples as one batch against one at a time; warned, and
  a forward that keeps state between calls (the same batch evaluated again gives other outputs) warned instead.
* :func:`loss_reads_parameters`: a loss callable that reads a parameter of the model directly (``exp(-log_var) *
  CE + log_var`` with ``log_var = model.log_var``), not through the outputs. The engine evaluates
  :math:`\ell_k(f(x_k; \theta_s))` (docs/maths.md §1) with such a parameter at its value *now*, at every step, and
  its gradient through the loss is not in the kernel: a recorded (trained) parameter read that way makes every step
  inexact. The recorder's gradient check refuses it at record time; with the check off (or a trajectory loaded
  later) it is found here by one loss evaluation on two training samples whose outputs carry no gradient: a loss
  value that still requires a gradient reads a tensor that does. A frozen tensor (not recorded: constant over the
  run) read that way is exact. Either way the scores are returned detached
  (:class:`~explaind.kernel.attribution.Attribution`), never holding an autograd graph.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .._compiled import compile_backend
from ..exceptions import TrajectoryError
from ..inputs import Inputs
from ..outputs import model_output
from ..trajectory._attribute_record import check_final_state, check_model
from ..trajectory._common import evaluation_mode, warn_user

__all__ = ["check_parameter_names", "check_recorded_model", "coupling_and_state", "loss_reads_parameters"]

logger = logging.getLogger("explaind.estimators")


def check_recorded_model(traj: Any, who: str) -> None:
    """Both checks of the module docstring on ``traj.model`` (warnings naming ``who``, e.g. ``"KernelReplica"``)."""
    try:
        model = traj.model
    except Exception:  # noqa: BLE001 - a trajectory without a model has nothing to compare
        return
    check_parameter_names(traj, model, f"{who}.fit")
    check_model(traj, model, f"{who}.fit")
    check_final_state(traj, model, f"{who}.fit")
    coupled, stateful = coupling_and_state(traj, model)
    if stateful:
        warn_user(logger, f"{who}.fit: the model's outputs for the same training samples differ between two "
                          f"evaluations (evaluation mode, the same parameters, buffers and seed): the forward keeps "
                          f"state between calls (an attribute it reassigns, such as a key/value cache or the previous "
                          f"batch's activations, or a module-level counter or flag), so its output is no function of "
                          f"its input and parameters, and the replica, the residual share and the scores are "
                          f"inexact. Fix: compute every forward from its inputs and parameters alone (a cache may "
                          f"hold only tensors that depend on neither; switch key/value caching off, use_cache=False, "
                          f"while training and explaining).")
    elif coupled > _COUPLED_TOL.get(next(model.parameters()).dtype, 1e-3):
        warn_user(logger, f"{who}.fit: the model's outputs for training samples evaluated as one batch differ from "
                          f"their outputs evaluated one at a time (evaluation mode, relative difference "
                          f"{coupled:.3g}): a sample's output depends on the rest of its batch, through the batch's "
                          f"size or its rows' positions (torch.arange(x.shape[0]), lengths or masks made from the "
                          f"batch index), other rows (x.mean(0), a sort or a roll over the batch) or batch "
                          f"statistics. explaind splits a step into per-sample terms and explains each test input "
                          f"on its own (docs/maths.md section 1), so the residual share and the scores are inexact. "
                          f"Fix: compute everything a sample's output needs from that sample alone (lengths from its "
                          f"own padding, (x != 0).any(-1).sum(1); pad_packed_sequence(..., total_length=x.shape[1]), "
                          f"which otherwise pads to the batch's longest sequence; running statistics instead of "
                          f"batch ones).")
    read = loss_reads_parameters(traj, model)
    recorded = [n for n in read if n in set(traj.param_names)]
    if recorded:
        loss = getattr(traj.loss, "name", "the loss")
        warn_user(logger, f"{who}.fit: the loss {loss} reads the model's parameter(s) {recorded} directly, not "
                          f"through the model's outputs. The engine evaluates every step's loss with their values "
                          f"as they are now, not the step's, and their gradient through the loss is outside the "
                          f"kernel, so the replica and the scores are inexact (the residual share measures it; "
                          f"recording with check_gradients=True refuses it at the first step). Fix: return them from "
                          f"forward as extra output columns (torch.cat([logits, self.log_var.expand(len(x), 1)], 1)) "
                          f"and read them there in the loss.")


def check_parameter_names(traj: Any, model: torch.nn.Module, who: str) -> None:
    """A :class:`TrajectoryError` when recorded parameters are gone from ``model`` (renamed or replaced after the
    run: ``torch.nn.utils.prune.remove`` turns ``weight_orig`` back into a new ``weight``): the engine would replay
    the recorded values under names the forward no longer reads, and read the model's own tensors instead."""
    now = {n for n, _ in model.named_parameters()}
    gone = [n for n in traj.param_names if n not in now]
    if not gone:
        return
    new = sorted(now - set(traj.param_names))
    text = (f"{who}: the recorded parameters {gone} are not parameters of the model any more (its parameters not in "
            f"the recording: {new}), so the engine cannot put the recorded values where the forward reads them. "
            f"Fix: explain the model with the parameters it was recorded with")
    if any(n.endswith("_orig") for n in gone):  # prune.remove: weight_orig and weight_mask replaced by weight
        text += (" ('<name>_orig' is what torch.nn.utils.prune keeps; prune.remove after the run replaces it by a new "
                 "parameter '<name>': explain before prune.remove, or call it on a copy, "
                 "pruned = copy.deepcopy(model), and keep the recorded model as it is)")
    if not new:  # modules removed (a head dropped after training, SimCLR's projection head) or replaced by Identity
        text += (" (a head removed or replaced after training, as SimCLR drops its projection head: the recorded "
                 "run is the model with the head; to explain the representation the head was fed, record a forward "
                 "that returns it as output columns beside the head's output and let the loss callable read the "
                 "head's columns, torch.cat([self.head(h), h], 1), exact with its split over samples; a model "
                 "keeping the head and skipping it by a flag gives the representation's replica exactly, but its "
                 "per-sample scores recompute the training loss with the flag as it is now)")
    raise TrajectoryError(text + ".")


#: Relative difference between batched and one-at-a-time outputs above which :func:`coupling_and_state` is warned about,
#: per parameter dtype (other dtypes: 1e-3): far above the rounding of kernels that block a batch differently.
_COUPLED_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}


def coupling_and_state(traj: Any, model: torch.nn.Module, n: int = 4) -> tuple[float, bool]:
    """``(coupling, stateful)``.

    ``coupling``: the largest difference between ``model``'s evaluation-mode outputs for the first ``n`` training
    samples as one batch and one at a time, relative to the largest output (``0.0`` without plain tensor training
    data, when the forward fails on either, or when compiled code sits inside the module; a ``torch.compile`` wrapper
    is measured by its eager module; the global random state, every module's mode and torch's attention fast-path
    switch are left as they were, and so are the buffers, restored before the second evaluation). ``stateful``: a
    second evaluation of the same batch after the single ones, under the same seed, gives other outputs (a forward
    that keeps state between calls outside its buffers: a cache in an attribute, a call counter).
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile(model): its eager module, as the engine evaluates it
    if any(compile_backend(m) is not None for m in model.modules()):
        return 0.0, False  # compiled code in place would recompile for these batch sizes, and count against its limit
    try:
        x, _ = traj.train_samples(torch.arange(min(n, int(traj.n_train))))
        if not isinstance(x, torch.Tensor) or x.shape[0] < 2:
            return 0.0, False
        x = x.to(next(model.parameters()).device)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        buffers = [(b, b.detach().clone()) for b in model.buffers()]  # a forward that updates them: as they were
        try:  # torch's inference-only attention fast path off, as the engine evaluates (nn.TransformerEncoder)
            torch.backends.mha.set_fastpath_enabled(False)
            with evaluation_mode(model), torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.default_generator.manual_seed(0)  # a forward that draws in evaluation mode draws the same twice
                batch = model_output(model(x))
                alone = torch.cat([model_output(model(x[i:i + 1])) for i in range(x.shape[0])])
                for b, saved in buffers:
                    b.copy_(saved)
                torch.default_generator.manual_seed(0)
                again = model_output(model(x))
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            torch.backends.mha.set_fastpath_enabled(fastpath)
        if not batch.is_floating_point():
            return 0.0, False
        scale = float(batch.abs().max())
        scale = scale if scale > 0 else 1.0
        tol = _COUPLED_TOL.get(batch.dtype, 1e-3)  # nondeterministic kernels (CUDA) round differently each time
        stateful = again.shape == batch.shape and float((again - batch).abs().max()) / scale > tol
        if batch.shape != alone.shape:
            return 0.0, stateful
        return float((batch - alone).abs().max()) / scale, stateful
    except Exception as exc:  # noqa: BLE001 - the check must not replace the estimator's own errors
        logger.info("The batch-coupling check could not run (%s: %s).", type(exc).__name__, exc)
        return 0.0, False


def loss_reads_parameters(traj: Any, model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s parameters that ``traj.loss`` reads other than through the outputs (on two training
    samples; ``[]`` for a registered loss, without training data, or when the forward or loss cannot run)."""
    loss = traj.loss
    if not str(getattr(loss, "name", "")).startswith("custom:"):
        return []
    try:
        x, y = traj.train_samples(torch.arange(min(2, int(traj.n_train))))
        device = next(model.parameters()).device
        x, y = x.to(device), y.to(device)
        # evaluation mode, the global random state and every module's own mode left as they were
        with evaluation_mode(model), torch.random.fork_rng(devices=[]), torch.no_grad():
            out = model_output(x.call(model) if isinstance(x, Inputs) else model(x)).detach()
        with torch.enable_grad():
            value = loss.implementation(out, y)
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            return []
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(value.sum(), [p for _, p in named], allow_unused=True)
    except Exception as exc:  # noqa: BLE001 - the check must not replace the estimator's own errors
        logger.info("The loss-reads-parameters check could not run (%s: %s).", type(exc).__name__, exc)
        return []
    return [n for (n, _), g in zip(named, grads, strict=True) if g is not None]
