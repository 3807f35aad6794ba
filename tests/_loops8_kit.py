"""Cases of the eighth loops round (tests/test_stranger_loops_round8.py, tests/stranger_loops_round8_table.py):
optimizers, schedulers, loop structures and numerics a new user brings, written from docs/quickstart.md and
docs/guide_own_model.md only.

Every case builds on tests/_stranger_loops_kit.py (float64, 6 steps of 6 of 24 samples, a small tanh MLP unless
the case names another model) and is measured by its :func:`measure`: the replica against the trained model in
evaluation mode, the residual share, the ``keep=("train",)`` scores against the slow loop reference
(tests/reference.py) and that reference's own per-step residual. A case is a function returning
``(model, trajectory)``; one that the library refuses raises.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _round4_kit import replica_warnings
from _stranger_loops_kit import BATCH, DT, STEPS, N, adam, batches, data, mlp, plain, sgd, train
from torch import nn
from torch.optim import lr_scheduler

import explaind

Case = Callable[[], tuple[nn.Module, Any]]


def _run(build: Callable[[], nn.Module], make_opt: Callable[[nn.Module], Any], step: Callable = plain,
         after: Callable[[Any, nn.Module], Callable[[int], None]] | None = None,
         **rec_kwargs: Any) -> tuple[nn.Module, Any]:
    model = build()
    opt = make_opt(model)
    return model, train(model, opt, step=step, after=after(opt, model) if after else None, **rec_kwargs)


# ---------------------------------------------------------------------------------------------- optimizers


class SignSGD(torch.optim.Optimizer):
    """A hand-written optimizer: ``p -= lr * sign(grad)``."""

    def __init__(self, params: Any, lr: float = 0.01) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


class NoisySGD(torch.optim.SGD):
    """A subclass of SGD that adds noise to every update (its own ``step``)."""

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p), alpha=1e-3)
        return out


class PlainSubclassSGD(torch.optim.SGD):
    """A subclass of SGD that changes nothing (a project's own name for it)."""


def refused_at_recorder(make_opt: Callable[[nn.Module], Any]) -> Case:
    """A case whose optimizer is handed to the recorder (refused there, or recorded)."""
    return lambda: _run(mlp, make_opt)


def state_edit(edit: Callable[[Any, int], None], make_opt: Callable[[nn.Module], Any] = sgd) -> Case:
    """The optimizer's state edited by ``edit(opt, s)`` after step ``s`` (a restart, a checkpoint loaded)."""
    return lambda: _run(mlp, make_opt, after=lambda opt, model: (lambda s: edit(opt, s)))


def clear_state(opt: Any, s: int) -> None:
    """``opt.state.clear()`` after step 2: the momentum restarts (a warm restart)."""
    if s == 2:
        opt.state.clear()


def scale_momentum(opt: Any, s: int) -> None:
    """Every momentum buffer halved by hand after step 2."""
    if s == 2:
        for state in opt.state.values():
            state["momentum_buffer"].mul_(0.5)


def scale_momentum_data(opt: Any, s: int) -> None:
    """Every momentum buffer halved through ``.data`` after step 2 (torch's version counter does not see it)."""
    if s == 2:
        for state in opt.state.values():
            state["momentum_buffer"].data.mul_(0.5)


def reload_same_state(opt: Any, s: int) -> None:
    """``opt.load_state_dict(copy.deepcopy(opt.state_dict()))`` after step 2 (a checkpoint of this very state)."""
    if s == 2:
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def reset_adam_step(opt: Any, s: int) -> None:
    """Adam's ``state["step"]`` set back to 0 after step 2 (its bias correction restarts)."""
    if s == 2:
        for state in opt.state.values():
            state["step"].zero_()


def load_other_run(opt: Any, s: int) -> None:
    """``opt.load_state_dict`` after step 2 from a checkpoint of another run (Adam, same shapes)."""
    if s == 2:
        other = mlp()
        other_opt = adam(other)
        X, y, _ = data()
        for idx in batches()[:3]:
            other_opt.zero_grad()
            F.cross_entropy(other(X[idx] * 2), y[idx]).backward()
            other_opt.step()
        opt.load_state_dict(other_opt.state_dict())


def pre_hook_scaling() -> tuple[nn.Module, Any]:
    """A step pre-hook registered on the optimizer that halves every gradient (``register_step_pre_hook``)."""
    def make(model):
        opt = sgd(model)

        def halve(optimizer, args, kwargs):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(0.5)

        opt.register_step_pre_hook(halve)
        return opt
    return _run(mlp, make)


def reversed_groups() -> tuple[nn.Module, Any]:
    """Per-layer groups listed in the reverse order of the model's parameters, each with its own lr and momentum."""
    def make(model):
        layers = list(model.children())[::-1]
        groups = [{"params": list(m.parameters()), "lr": 0.05 * (i + 1), "momentum": 0.5 + 0.2 * i}
                  for i, m in enumerate(m for m in layers if list(m.parameters()))]
        return torch.optim.SGD(groups, lr=0.1)
    return _run(mlp, make)


def tensor_betas() -> tuple[nn.Module, Any]:
    """``Adam(betas=(tensor, tensor))`` (torch accepts tensor betas)."""
    return _run(mlp, lambda m: torch.optim.Adam(m.parameters(), lr=0.01,
                                                betas=(torch.tensor(0.9, dtype=DT), torch.tensor(0.99, dtype=DT))))


# ---------------------------------------------------------------------------------------------- schedulers


def scheduled(make: Callable[[Any], Any], call: Callable[[Any, int], None] | None = None) -> Case:
    """A scheduler built by ``make(opt)`` and stepped after each step (or by ``call(sched, s)``)."""
    def after(opt, model):
        sched = make(opt)
        return (lambda s: call(sched, s)) if call else (lambda s: sched.step())
    return lambda: _run(mlp, sgd, after=after)


def scheduler_before_step() -> tuple[nn.Module, Any]:
    """``scheduler.step()`` called before ``optimizer.step()`` (torch warns about the order)."""
    holder: dict[str, Any] = {}

    def step(s, model, opt, X, y, idx, rec):
        if "sched" not in holder:
            holder["sched"] = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        holder["sched"].step()
        opt.step()
    return _run(mlp, sgd, step)


def warm_restarts_fractional() -> tuple[nn.Module, Any]:
    """``CosineAnnealingWarmRestarts`` stepped with a fractional epoch, ``sched.step(epoch + i / iters)``."""
    return scheduled(lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=1, T_mult=2),
                     lambda sched, s: sched.step(s / 4 + 0.25))()


# ---------------------------------------------------------------------------------------------- loop structure


def indices_as(convert: Callable[[torch.Tensor], Any]) -> Case:
    """The batch indexed and logged as ``convert(idx)`` (a numpy array, a list, an int32 tensor)."""
    def step(s, model, opt, X, y, idx, rec):
        raw = convert(idx)
        opt.zero_grad()
        F.cross_entropy(model(X[raw]), y[raw]).backward()
        rec.log_batch(raw)
        opt.step()
    return lambda: _run(mlp, sgd, step)


def zero_weight_samples() -> tuple[nn.Module, Any]:
    """A weighted mean of ``reduction="none"`` losses whose weights are 0 for two samples of each batch."""
    def step(s, model, opt, X, y, idx, rec):
        v = torch.ones(len(idx), dtype=DT)
        v[:2] = 0.0
        w = v / v.sum()
        opt.zero_grad()
        (F.cross_entropy(model(X[idx]), y[idx], reduction="none") * w).sum().backward()
        rec.log_batch(idx, w)
        opt.step()
    return _run(mlp, sgd, step)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.X[i], self.y[i], i


def dataloader_loop(batch_size: int, n: int, steps: int, cycle: bool) -> tuple[nn.Module, Any]:
    """A shuffled ``DataLoader`` (``drop_last=False``) over the first ``n`` samples yielding ``(x, y, index)``,
    iterated through ``itertools.cycle`` (``cycle``) or epoch by epoch, ``steps`` steps."""
    X, y, _ = data()
    model = mlp()
    opt = sgd(model)
    torch.manual_seed(3)
    loader = torch.utils.data.DataLoader(_Indexed(X[:n], y[:n]), batch_size=batch_size, shuffle=True)
    source = itertools.cycle(loader) if cycle else itertools.chain.from_iterable(itertools.repeat(loader))
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for xb, yb, ib in itertools.islice(source, steps):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            rec.log_batch(ib)
            opt.step()
    return model, rec.trajectory


def optimizer_recreated() -> tuple[nn.Module, Any]:
    """A new SGD momentum optimizer built every 2 steps from step 2 on (a loop that builds it inside the epoch loop);
    the recorder holds the first one."""
    X, y, _ = data()
    model = mlp()
    opt = sgd(model)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s, idx in enumerate(batches()):
            if s % 2 == 0 and s > 0:
                opt = sgd(model)
            plain(s, model, opt, X, y, idx, rec)
    return model, rec.trajectory


def empty_batch_step(log_empty: bool) -> Case:
    """Step 2's batch is empty (a filter kept no sample): SGD momentum still moves the weights. The loop sums the
    losses (``reduction="sum"`` over 0 samples is 0); ``log_empty``: ``rec.log_batch`` of the empty index tensor,
    else ``log_batch`` is skipped for that step."""
    def step(s, model, opt, X, y, idx, rec):
        if s == 2:
            idx = idx[:0]
        opt.zero_grad()
        (F.cross_entropy(model(X[idx]), y[idx], reduction="sum") / BATCH).backward()
        if len(idx) or log_empty:
            rec.log_batch(idx, torch.full((len(idx),), 1.0 / BATCH, dtype=DT))
        opt.step()
    return lambda: _run(mlp, sgd, step)


def empty_batch_skipped() -> tuple[nn.Module, Any]:
    """Step 2's empty batch skipped as a whole (``continue`` before its forward): the fix the refusal names."""
    def step(s, model, opt, X, y, idx, rec):
        if s == 2 and len(idx[:0]) == 0:
            return
        plain(s, model, opt, X, y, idx, rec)
    return _run(mlp, sgd, step)


def group_edit(edit: Callable[[Any, nn.Module, int], None], make_opt: Callable[[nn.Module], Any] = sgd) -> Case:
    """``edit(opt, model, s)`` of the parameter groups after each step ``s``."""
    return lambda: _run(mlp, make_opt, after=lambda opt, model: (lambda s: edit(opt, model, s)))


def remove_then_readd(opt: Any, model: nn.Module, s: int) -> None:
    """The first layer's weight taken out of the optimizer after step 1 and put back after step 3 (its momentum
    buffer kept by torch meanwhile)."""
    params = opt.param_groups[0]["params"]
    if s == 1:
        params.remove(model[0].weight)
    elif s == 3:
        params.insert(0, model[0].weight)


def set_by_hand(key: str, value: Any, at: int = 2) -> Callable[[Any, nn.Module, int], None]:
    """``param_groups[0][key] = value`` after step ``at``."""
    def edit(opt, model, s):
        if s == at:
            opt.param_groups[0][key] = value
    return edit


def accumulation_by_accident(every: int, **rec_kwargs: Any) -> Case:
    """``zero_grad`` only every ``every`` steps, ``optimizer.step()`` at every step (no division)."""
    def step(s, model, opt, X, y, idx, rec):
        if s % every == 0:
            opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        opt.step()
    return lambda: _run(mlp, sgd, step, **rec_kwargs)


def two_losses_retain_graph() -> tuple[nn.Module, Any]:
    """Two halves of the batch's loss backwarded separately from one forward (``retain_graph=True``)."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        losses = F.cross_entropy(model(X[idx]), y[idx], reduction="none")
        (losses[:3].sum() / len(idx)).backward(retain_graph=True)
        (losses[3:].sum() / len(idx)).backward()
        rec.log_batch(idx)
        opt.step()
    return _run(mlp, sgd, step)


def grad_step(edit: Callable[[nn.Module], None]) -> Callable:
    """The textbook step with ``edit(model)`` between ``backward()`` and ``log_batch``."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        edit(model)
        rec.log_batch(idx)
        opt.step()
    return step


def clip_zero_at_step_3(s, model, opt, X, y, idx, rec) -> None:
    """``clip_grad_norm_(max_norm=0)`` at step 3 (a clip factor of 0: the step moves by momentum alone)."""
    grad_step(lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.0 if s == 3 else 1e9))(
        s, model, opt, X, y, idx, rec)


def clip_with_total_norm(model: nn.Module) -> None:
    """torch's split clipping API: ``get_total_norm`` of the gradients, then ``clip_grads_with_norm_``."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), 0.05, total)


def scaled_loss(factor: float, make_opt: Callable[[nn.Module], Any]) -> Case:
    """``(loss * factor).backward()``."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        (F.cross_entropy(model(X[idx]), y[idx]) * factor).backward()
        rec.log_batch(idx)
        opt.step()
    return lambda: _run(mlp, make_opt, step)


# ---------------------------------------------------------------------------------------------- numerics


class ReluCNN(nn.Module):
    """Two ReLU convolutions and a linear head on 1x2x2 images made from the 4 features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(1, 4, 2, padding=1), nn.Conv2d(4, 4, 2)
        self.fc = nn.Linear(4 * 2 * 2, 3)
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x.reshape(-1, 1, 2, 2)))
        return self.fc(F.relu(self.c2(h)).flatten(1))


def replica_with_defaults(model: nn.Module, traj: Any, **options: Any) -> dict[str, Any]:
    """tests/_round4_kit.py's default replica (``options`` added): ``replica`` and ``warnings``."""
    replica, caught = replica_warnings(model, traj, **options)
    return {"replica": replica, "warnings": caught}


CASES: dict[str, Case] = {
    # optimizers
    "asgd": refused_at_recorder(lambda m: torch.optim.ASGD(m.parameters(), lr=0.01)),
    "hand_written_optimizer": refused_at_recorder(lambda m: SignSGD(m.parameters())),
    "sgd_subclass_own_step": refused_at_recorder(lambda m: NoisySGD(m.parameters(), lr=0.1)),
    "sgd_subclass_no_change": refused_at_recorder(lambda m: PlainSubclassSGD(m.parameters(), lr=0.1)),
    "adam_capturable_from_start": refused_at_recorder(lambda m: torch.optim.Adam(m.parameters(), lr=0.01,
                                                                                 capturable=True)),
    "adam_differentiable_from_start": refused_at_recorder(lambda m: torch.optim.Adam(m.parameters(), lr=0.01,
                                                                                     differentiable=True)),
    "adam_tensor_betas": tensor_betas,
    "sgd_groups_in_reverse_order": reversed_groups,
    "optimizer_state_cleared_mid_run": state_edit(clear_state),
    "momentum_buffer_halved_by_hand": state_edit(scale_momentum),
    "momentum_buffer_halved_through_data": state_edit(scale_momentum_data),
    "adam_state_saved_and_loaded_back": state_edit(reload_same_state, adam),
    "adam_step_count_reset": state_edit(reset_adam_step, adam),
    "adam_state_loaded_from_another_run": state_edit(load_other_run, adam),
    "step_pre_hook_halving_gradients": pre_hook_scaling,
    # schedulers
    "scheduler_step_before_optimizer_step": scheduler_before_step,
    "scheduler_stepped_twice_per_step": scheduled(lambda o: lr_scheduler.ExponentialLR(o, 0.8),
                                                  lambda sched, s: (sched.step(), sched.step())),
    "warm_restarts_fractional_epoch": warm_restarts_fractional,
    "polynomial_lr": scheduled(lambda o: lr_scheduler.PolynomialLR(o, total_iters=4, power=2.0)),
    "multiplicative_lr": scheduled(lambda o: lr_scheduler.MultiplicativeLR(o, lambda e: 0.5 if e % 2 else 1.5)),
    # loop structure
    "indices_numpy_array": indices_as(lambda i: i.numpy()),
    "indices_python_list": indices_as(lambda i: i.tolist()),
    "indices_int32_tensor": indices_as(lambda i: i.to(torch.int32)),
    "weights_zero_for_two_samples": zero_weight_samples,
    "itertools_cycle_dataloader": lambda: dataloader_loop(5, N, STEPS, cycle=True),
    "drop_last_false_last_batch_of_one": lambda: dataloader_loop(5, 21, 10, cycle=False),
    "optimizer_built_again_every_2_steps": optimizer_recreated,
    "empty_batch_logged": empty_batch_step(True),
    "empty_batch_not_logged": empty_batch_step(False),
    "zero_grad_every_2_steps": accumulation_by_accident(2),
    "zero_grad_every_2_steps_check_off": accumulation_by_accident(2, check_gradients=False),
    "two_losses_backwarded_with_retain_graph": two_losses_retain_graph,
    "clip_grads_with_norm_and_get_total_norm": lambda: _run(mlp, adam, grad_step(clip_with_total_norm)),
    # numerics
    "adam_lr5_relu_cnn": lambda: _run(ReluCNN, lambda m: torch.optim.Adam(m.parameters(), lr=5.0)),
    "loss_times_1e6_sgd": scaled_loss(1e6, lambda m: torch.optim.SGD(m.parameters(), lr=1e-7, momentum=0.9)),
    "loss_times_1e-6_adam": scaled_loss(1e-6, adam),
    "clip_max_norm_1e-3_every_step": lambda: _run(
        mlp, sgd, grad_step(lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3))),
    "sgd_weight_decay_0.5": lambda: _run(mlp, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9,
                                                                         weight_decay=0.5)),
    "adamw_weight_decay_0.5": lambda: _run(mlp, lambda m: torch.optim.AdamW(m.parameters(), lr=0.05,
                                                                             weight_decay=0.5)),
    "sgd_nesterov_weight_decay_dampening_0": lambda: _run(mlp, lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, nesterov=True, dampening=0.0, weight_decay=0.05)),
    "adam_betas_set_to_zero_by_hand": group_edit(set_by_hand("betas", (0.0, 0.0)), adam),
    "sgd_negative_weight_decay_by_hand": group_edit(set_by_hand("weight_decay", -0.1)),
    "lambda_lr_negative_factor": scheduled(lambda o: lr_scheduler.LambdaLR(o, lambda e: -0.5 if e == 2 else 1.0)),
    "clip_max_norm_0_at_one_step": lambda: _run(mlp, sgd, clip_zero_at_step_3),
    "param_removed_from_group_and_put_back": group_edit(remove_then_readd),
    "empty_batch_skipped": empty_batch_skipped,
    "adam_lr10_relu_cnn": lambda: _run(ReluCNN, lambda m: torch.optim.Adam(m.parameters(), lr=10.0)),
    "momentum_0.999_lr1": lambda: _run(mlp, lambda m: torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.999)),
}

#: Cases whose ReLU paths are measured with the default (adaptive) replica instead of the 8-node rule.
DEFAULT_RULE = ("adam_lr5_relu_cnn", "adam_lr10_relu_cnn")
