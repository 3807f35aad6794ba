"""Training recipes of the fourteenth round (tests/_round14_cases.py) written as their papers' repositories write
them: SAM and ASAM (two forward-backward passes, the perturbation written into the weights and restored), a
Lookahead wrapper around the optimizer, an EMA of the weights by ``get_ema_multi_avg_fn`` evaluated mid-run, the
inputs edited in the loop (cutout, mixup with per-sample lambdas, label noise), a hard-example loss over the top-k
losses, class weights in the loss, batch sizes and accumulation counts that change with the step, layer-wise
learning-rate decay with a warm-up written by hand, and a loop that trains a ``torch.func`` parameter dict.

Every step has the signature of tests/_stranger_loops_kit.py's ``plain``: ``step(s, model, opt, X, y, idx, rec)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _stranger_loops_kit import BATCH, STEPS, N, batches, data

import explaind

RHO = 0.05


def sam_step(adaptive: bool, restore: str = "copy") -> Callable:
    """SAM (Foret et al. 2021; ASAM, Kwon et al. 2021, with ``adaptive``): the gradient at ``theta + e``,
    ``e = rho T^2 g / ||T g||`` (``T = |theta|`` for ASAM, 1 for SAM), then the weights restored and the base
    optimizer stepped. ``restore``: ``"copy"`` (``p.data = old_p``, the reference repository's code), ``"sub"``
    (``p.sub_(e_w)``, its first version) or ``"data"`` (``p.data.add_(e_w)`` and ``p.data.sub_(e_w)``: writes
    through ``.data``, which torch's version counter does not count). ``rec.log_batch`` after the second backward,
    right before the step."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            norm = torch.stack([((p.abs() if adaptive else 1.0) * p.grad).norm(2) for p in params]).norm(2)
            saved = []
            for p in params:
                e_w = (p.pow(2) if adaptive else 1.0) * p.grad * (RHO / (norm + 1e-12))
                saved.append((p.data.clone(), e_w))
                (p.data if restore == "data" else p).add_(e_w)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        with torch.no_grad():
            for p, (old, e_w) in zip(params, saved):
                if restore == "copy":
                    p.data = old
                else:
                    (p.data if restore == "data" else p).sub_(e_w)
        opt.step()
    return step


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019) as its popular wrappers write it: the inner optimizer's ``param_groups`` and
    ``state`` shared, every ``k`` steps the slow weights moved ``alpha`` of the way to the fast ones and copied back
    into them."""

    def __init__(self, base: torch.optim.Optimizer, k: int = 3, alpha: float = 0.5) -> None:
        self.base, self.k, self.alpha, self.count = base, k, alpha, 0
        super().__init__([p for g in base.param_groups for p in g["params"]], base.defaults)
        self.param_groups, self.state = base.param_groups, base.state
        self.slow = [p.detach().clone() for g in base.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        loss = self.base.step(closure)
        self.count += 1
        if self.count % self.k == 0:
            for p, q in zip([p for g in self.param_groups for p in g["params"]], self.slow):
                q.add_(p - q, alpha=self.alpha)
                p.copy_(q)
        return loss


def cutout_step(s, model, opt, X, y, idx, rec) -> None:
    """Cutout on the batch's tensors in the loop: one random feature per sample zeroed (a new draw every step)."""
    opt.zero_grad()
    x = X[idx].clone()
    x[torch.arange(len(idx)), torch.randint(0, x.shape[1], (len(idx),))] = 0.0
    F.cross_entropy(model(x), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def mixup_step(s, model, opt, X, y, idx, rec) -> None:
    """Mixup in the loop with a lambda per sample (``Beta(0.4, 0.4)``) and ``torch.randperm`` pairing, the loss mixed
    with the same lambdas."""
    opt.zero_grad()
    lam = torch.distributions.Beta(0.4, 0.4).sample((len(idx),)).to(X.dtype)
    perm = torch.randperm(len(idx))
    out = model(lam[:, None] * X[idx] + (1 - lam[:, None]) * X[idx][perm])
    (lam * F.cross_entropy(out, y[idx], reduction="none")
     + (1 - lam) * F.cross_entropy(out, y[idx][perm], reduction="none")).mean().backward()
    rec.log_batch(idx)
    opt.step()


def label_noise_step(s, model, opt, X, y, idx, rec) -> None:
    """Label noise drawn in the loop: each label replaced by a random class with probability 0.3, every step."""
    opt.zero_grad()
    target = y[idx].clone()
    flip = torch.rand(len(idx)) < 0.3
    target[flip] = torch.randint(0, 3, (int(flip.sum()),))
    F.cross_entropy(model(X[idx]), target).backward()
    rec.log_batch(idx)
    opt.step()


TOPK = 3


def top_k_terms(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Online hard-example mining as batch-coupled terms: ``n / k`` times each of the ``k`` largest losses of the
    micro-batch, 0 for the others (their mean is the mean of the top-k)."""
    losses = F.cross_entropy(out, y, reduction="none")
    keep = torch.zeros_like(losses).scatter(0, losses.detach().topk(TOPK).indices, 1.0)
    return losses * keep * (len(losses) / TOPK)


def top_k_step(s, model, opt, X, y, idx, rec) -> None:
    """The mean of the batch's ``TOPK`` largest losses, the whole batch logged."""
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx], reduction="none").topk(TOPK).values.mean().backward()
    rec.log_batch(idx)
    opt.step()


CLASS_WEIGHTS = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)


def class_weighted_step(logged: bool) -> Callable:
    """``F.cross_entropy(out, y, weight=CLASS_WEIGHTS)`` (class-balanced, normalised by the batch's weight sum);
    ``logged``: the per-sample weights ``w_k / sum w`` given to ``log_batch``."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx], weight=CLASS_WEIGHTS).backward()
        w = CLASS_WEIGHTS[y[idx]]
        rec.log_batch(idx, w / w.sum() if logged else None)
        opt.step()
    return step


def growing_batches() -> list[torch.Tensor]:
    """A curriculum of batch sizes growing with the step (2, 3, 4, 5, 6, 6) over a fixed permutation."""
    order = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    sizes = (2, 3, 4, 5, 6, 6)
    starts = [sum(sizes[:s]) % (N - BATCH) for s in range(STEPS)]
    return [order[a:a + b] for a, b in zip(starts, sizes)]


def accumulation_step(counts: Callable[[int], int], divisor: Callable[[int], int]) -> Callable:
    """Gradient accumulation over ``counts(s)`` micro-batches of the step's batch, each mean divided by
    ``divisor(s)`` (the step's count, or a stale one), each micro-batch logged."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        for part in idx.chunk(counts(s)):
            (F.cross_entropy(model(X[part]), y[part]) / divisor(s)).backward()
            rec.log_batch(part)
        opt.step()
    return step


def llrd_groups(model: Any, base: float = 0.1, decay: float = 0.6) -> list[dict[str, Any]]:
    """Layer-wise learning-rate decay: a group per layer, ``lr = base decay^(depth from the top)``, the target rate
    kept under a key of the user's own (``"lr_target"``)."""
    layers = [*model.layers, model.head]
    groups = []
    for i, layer in enumerate(layers):
        lr = base * decay ** (len(layers) - 1 - i)
        groups.append({"params": list(layer.parameters()), "lr": lr, "lr_target": lr})
    return groups


def hand_warmup(opt: Any, warm: int = 3) -> Callable[[int], None]:
    """A linear warm-up written by hand after every step, ``for g in opt.param_groups: g["lr"] = ...``."""
    def after(s: int) -> None:
        for g in opt.param_groups:
            g["lr"] = g["lr_target"] * min(1.0, (s + 2) / (warm + 1))
    return after


def functional_train(model: Any, make_opt: Callable[[Any], Any], **rec_kwargs: Any) -> Any:
    """The loop trains a ``torch.func`` parameter dict (detached copies of the model's parameters) with
    ``functional_call``; the optimizer holds those tensors, the recorder is given the model and that optimizer."""
    X, y, _ = data()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    opt = make_opt(list(params.values()))
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), **rec_kwargs)
    with rec:
        for idx in batches():
            opt.zero_grad()
            F.cross_entropy(torch.func.functional_call(model, params, (X[idx],)), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory


class SAM(torch.optim.Optimizer):
    """SAM as the most used PyTorch implementation writes it: an optimizer holding ``base_optimizer`` (built from
    the class it is given over the same ``param_groups``), with ``first_step`` (``p.add_(e_w)``, the old weights
    kept in ``state[p]["old_p"]``) and ``second_step`` (``p.data = old_p``, then the base optimizer's step)."""

    def __init__(self, params: Any, base_optimizer: type, rho: float = RHO, adaptive: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        norm = torch.stack([((p.abs() if g["adaptive"] else 1.0) * p.grad).norm(2)
                            for g in self.param_groups for p in g["params"] if p.grad is not None]).norm(2)
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_((p.pow(2) if group["adaptive"] else 1.0) * p.grad * scale)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable | None = None) -> None:
        raise RuntimeError("SAM needs first_step and second_step")


def sam_class_step(sam: SAM) -> Callable:
    """The loop of that implementation's README, two forward-backward passes around ``sam.first_step``, whichever
    optimizer the recorder was given (the wrapper or its ``base_optimizer``)."""
    def step(s, model, opt, X, y, idx, rec):
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        sam.first_step(zero_grad=True)
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        sam.second_step(zero_grad=True)
    return step


def noisy_labels(y: torch.Tensor, p: float = 0.3, seed: int = 3) -> torch.Tensor:
    """The fix of label noise drawn in the loop: each label replaced by a random class with probability ``p``, drawn
    once before recording (the targets given as ``train_data``)."""
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=gen) < p
    return torch.where(flip, torch.randint(0, 3, (len(y),), generator=gen), y)


def curriculum_length(s: int) -> int:
    """The sequence length of step ``s``: 2, 3, 4, 5, 6, 6."""
    return min(6, s + 2)


def token_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``N`` training sequences of 6 token ids, their labels (3 classes), 3 test sequences."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 10, (N + 3, 6), generator=gen)
    return ids[:N], torch.randint(0, 3, (N,), generator=gen), ids[N:]


def length_curriculum_train(model: Any, opt: Any, how: str, **rec_kwargs: Any) -> Any:
    """A sequence-length curriculum: the loop truncates every batch to :func:`curriculum_length` (``how="cut"``),
    sets the model's ``max_len`` buffer to it before the step's forward (``"buffer"``), or leaves it to the model's
    counter (``"counted"``); ``"masked"``: no curriculum, 2 token ids of every row set to 0 in the loop (BERT-style
    masking drawn anew at every step)."""
    ids, y, _ = token_data()
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(ids, y), **rec_kwargs)
    with rec:
        for s, idx in enumerate(batches()):
            opt.zero_grad()
            x = ids[idx, :curriculum_length(s)] if how == "cut" else ids[idx].clone()
            if how == "buffer":
                model.max_len.fill_(curriculum_length(s))
            if how == "masked":
                x.scatter_(1, torch.rand(x.shape).argsort(1)[:, :2], 0)
            F.cross_entropy(model(x), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory


def func_grad_step(s, model, opt, X, y, idx, rec) -> None:
    """The gradient from ``torch.func.grad`` over ``functional_call`` with the model's own parameters, assigned to
    ``.grad`` by hand."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.grad(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (X[idx],)), y[idx]))(params)
    for name, p in model.named_parameters():
        p.grad = grads[name]
    rec.log_batch(idx)
    opt.step()


def functional_call_step(s, model, opt, X, y, idx, rec) -> None:
    """``functional_call(model, dict(model.named_parameters()), ...)`` and ``backward()``: the model's own tensors."""
    opt.zero_grad()
    F.cross_entropy(torch.func.functional_call(model, dict(model.named_parameters()), (X[idx],)), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def zero_grad_per_micro_batch(s, model, opt, X, y, idx, rec) -> None:
    """Accumulation over two micro-batches of 3 with ``opt.zero_grad()`` inside the micro-batch loop (a common bug:
    only the last micro-batch's gradient reaches the step), each micro-batch logged."""
    for part in idx.chunk(2):
        opt.zero_grad()
        (F.cross_entropy(model(X[part]), y[part]) / 2).backward()
        rec.log_batch(part)
    opt.step()


def activation_penalty_step(s, model, opt, X, y, idx, rec) -> None:
    """AWD-LSTM's activation regularisation written in the loop: ``CE(out.logits) + 2 * out.hidden.pow(2).mean()``
    (the model returns a dataclass with ``logits`` and ``hidden``)."""
    opt.zero_grad()
    out = model(features=X[idx])
    (F.cross_entropy(out.logits, y[idx]) + 2.0 * out.hidden.pow(2).mean()).backward()
    rec.log_batch(idx)
    opt.step()
