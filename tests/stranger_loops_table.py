"""Print the table of docs/guide_own_model.md, "Torch training features": loop features a new user writes.

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_loops_table.py

Each row records a float64 run (tests/_stranger_loops_kit.py: 6 steps of 6 samples of a small tanh model) and
prints the replica's relative error against the trained model in evaluation mode, the residual share, the train
scores' relative error against the slow float64 loop reference (``Reference``, or ``ReplayReference`` and
``BufferReference`` when masks or batch statistics are replayed) and that reference's own largest per-step
residual relative to its largest update; or the exception and the sentence of its message that names the cause.
The load average is printed first: the figures do not depend on it (no timings).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _stranger_loops_kit import (
    DT,
    Checkpointed,
    NoGradBackbone,
    adam,
    autograd_step,
    closure_step,
    data,
    dropout_mlp,
    measure,
    mlp,
    plain,
    sgd,
    swa_run,
    train,
    two_optimizer_step,
)
from reference import Reference
from replay_reference import BufferReference, ReplayReference
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel

import explaind
from explaind.exceptions import ExplaindWarning


def batchnorm_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def grad_step(edit, log_first=False):
    """A step whose ``.grad`` is changed by ``edit(model)`` before (or, ``log_first``, after) ``log_batch``."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        if log_first:
            rec.log_batch(idx)
        edit(model)
        if not log_first:
            rec.log_batch(idx)
        opt.step()
    return step


def duplicate_step(s, model, opt, X, y, idx, rec):
    idx = torch.cat([idx[:4], idx[:2]])  # sampling with replacement repeats samples within a batch
    plain(s, model, opt, X, y, idx, rec)


def one_log_step(s, model, opt, X, y, idx, rec):
    opt.zero_grad()
    for part in (idx[:4], idx[4:]):  # micro-batches of 4 and 2, each mean halved, logged once as one batch
        (F.cross_entropy(model(X[part]), y[part]) / 2).backward()
    rec.log_batch(idx)
    opt.step()


def freeze_step(s, model, opt, X, y, idx, rec):
    if s == 3:
        model[0].weight.requires_grad_(False)
    opt.zero_grad(set_to_none=False)
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.drop, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Dropout2d(0.3), nn.Linear(4, 3)
        self.to(DT).to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.conv(x.reshape(-1, 1, 2, 2)))).mean((2, 3)))


def run(build, make_opt, step=plain, reference=Reference, after=None, unwrap=None, **kw) -> dict[str, Any]:
    """Record, then measure; ``unwrap(model)`` runs before the slow reference (checkpointing off for plain torch)."""
    model = build()
    opt = make_opt(model)
    traj = train(model, opt, step=step, after=after(opt, model) if after else None, **kw)
    return measure(model, traj, reference, before_reference=(lambda: unwrap(model)) if unwrap else None)


def scheduled(make):
    def after(opt, model):
        sched = make(opt)
        return lambda s: sched.step()
    return after


def swa_against_average():
    model, swa, traj = swa_run()
    figures = measure(model, traj)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        report = explaind.KernelReplica(device="cpu").fit(traj).fidelity_report(data()[2], model=swa)
    named = any("AveragedModel" in str(w.message) for w in caught)
    return {**figures, "note": f"fidelity_report against the AveragedModel: {report['model_max_rel_error']:.2g}"
                               f"{', warns naming it' if named else ''}"}


def two_optimizers():
    model = mlp()
    first, second = torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.Adam(model[2].parameters(), lr=0.01)
    return train(model, first, step=two_optimizer_step(first, second))


def refused_optimizers():
    """LBFGS and SparseAdam over dense parameters: refused at the recorder (the first error is raised when both are)."""
    errors = []
    for cls in (torch.optim.LBFGS, torch.optim.SparseAdam):
        model = mlp()
        try:
            explaind.TrajectoryRecorder(model, cls(model.parameters()), loss="cross_entropy")
        except Exception as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)
    if len(errors) == 2:
        raise errors[0]
    raise AssertionError(f"only {len(errors)} of LBFGS, SparseAdam refused")


def sparse_adam():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6, sparse=True), nn.Flatten(), nn.Linear(6, 3)).to(DT)
    return explaind.TrajectoryRecorder(model, torch.optim.SparseAdam(list(model[0].parameters())), loss="cross_entropy")


def clip_subset(m):
    torch.nn.utils.clip_grad_norm_(m[0].parameters(), 0.01)


NOT_RNG = {"use_reentrant": False, "preserve_rng_state": False}
ROWS: list[tuple[str, Callable[[], Any], str]] = [
    ("checkpoint(use_reentrant=False) around dropout",
     lambda: run(lambda: Checkpointed({"use_reentrant": False}), sgd, reference=ReplayReference,
                 unwrap=lambda m: setattr(m, "options", None)), ""),
    ("checkpoint(use_reentrant=True) around dropout",
     lambda: run(lambda: Checkpointed({"use_reentrant": True}), sgd, reference=ReplayReference,
                 unwrap=lambda m: setattr(m, "options", None)), ""),
    ("checkpoint(preserve_rng_state=False) around dropout",
     lambda: run(lambda: Checkpointed(NOT_RNG), sgd, check_gradients=True), "draws random numbers"),
    ("the same, check_gradients=False",
     lambda: run(lambda: Checkpointed(NOT_RNG), sgd, reference=ReplayReference, check_gradients=False,
                 unwrap=lambda m: setattr(m, "options", None)), ""),
    ("a private generator inside a checkpointed block",
     lambda: run(lambda: Checkpointed({"use_reentrant": False}, private=True), sgd, check_gradients=True),
     "draws random numbers"),
    ("step(closure), SGD momentum, log_batch in the closure",
     lambda: run(mlp, sgd, closure_step("inside"), check_gradients=True), ""),
    ("step(closure), Adam, log_batch before step", lambda: run(mlp, adam, closure_step("before")), ""),
    ("step(closure) with dropout, log_batch in the closure",
     lambda: run(dropout_mlp, sgd, closure_step("inside"), reference=ReplayReference), ""),
    ("step(closure) with dropout, log_batch before step",
     lambda: run(dropout_mlp, sgd, closure_step("before")), "closure"),
    ("step(closure) with batch norm, log_batch in the closure",
     lambda: run(batchnorm_mlp, sgd, closure_step("inside"), reference=BufferReference), ""),
    ("clip_grad_norm_(norm_type=inf), Adam",
     lambda: run(mlp, adam, grad_step(lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01, float("inf")))),
     ""),
    ("clip_grad_norm_ after log_batch, Adam",
     lambda: run(mlp, adam, grad_step(lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01), True)), ""),
    ("clip_grad_norm_ over the first layer only", lambda: run(mlp, adam, grad_step(clip_subset)), "global factor"),
    ("clip_grad_value_(0.01)",
     lambda: run(mlp, adam, grad_step(lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), 0.01))),
     "global factor"),
    ("ChainedScheduler(LinearLR, ExponentialLR), SGD momentum",
     lambda: run(mlp, sgd, after=scheduled(lambda o: lr_scheduler.ChainedScheduler(
         [lr_scheduler.LinearLR(o, 0.3, total_iters=3), lr_scheduler.ExponentialLR(o, 0.8)]))), ""),
    ("SequentialLR(LinearLR, CosineAnnealingLR), Adam",
     lambda: run(mlp, adam, after=scheduled(lambda o: lr_scheduler.SequentialLR(
         o, [lr_scheduler.LinearLR(o, 0.3, total_iters=2), lr_scheduler.CosineAnnealingLR(o, 4)], milestones=[2]))),
     ""),
    ("backbone under torch.no_grad(), AdamW over all parameters",
     lambda: run(NoGradBackbone, lambda m: torch.optim.AdamW(m.parameters(), lr=0.01)), ""),
    ("zero_grad(set_to_none=False), a weight frozen at step 3, Adam", lambda: run(mlp, adam, freeze_step), ""),
    ("the same with Adam(weight_decay=0.01)",
     lambda: run(mlp, lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.01), freeze_step),
     "coupled weight decay"),
    ("repeated samples in a batch (sampling with replacement), dropout",
     lambda: run(dropout_mlp, sgd, duplicate_step, reference=ReplayReference), ""),
    ("two uneven micro-batches logged as one batch", lambda: run(mlp, sgd, one_log_step), "does not match"),
    ("the same, check_gradients=False", lambda: run(mlp, sgd, one_log_step, check_gradients=False), ""),
    ("channels_last conv with Dropout2d", lambda: run(ChannelsLast, sgd, reference=ReplayReference), ""),
    ("SWA: AveragedModel + SWALR, against the last iterate", swa_against_average, ""),
    ("AveragedModel given to the recorder",
     lambda: train(AveragedModel(m := mlp()), sgd(m)), "AveragedModel"),
    ("torch.autograd.grad assigned to .grad", lambda: run(mlp, sgd, autograd_step), "autograd.grad"),
    ("a second optimizer over part of the model", two_optimizers, "Two optimizers"),
    ("SparseAdam over nn.Embedding(sparse=True)", sparse_adam, "sparse=True"),
    ("LBFGS, SparseAdam (each; LBFGS's message shown)", refused_optimizers, "Registered adapters"),
]


def _sentence(message: str, key: str) -> str:
    """The sentence of ``message`` holding ``key`` (the first one when ``key`` is empty), cut to 160 characters
    around ``key``."""
    sentences = re.split(r"(?<=[.)])\s+(?=[A-Z])", " ".join(message.split()))
    hit = next((s for s in sentences if key and key in s), sentences[0])
    if len(hit) <= 160:
        return hit
    start = max(0, min(hit.find(key) - 60, len(hit) - 157)) if key in hit else 0
    return ("..." if start else "") + hit[start:start + 157 - (3 if start else 0)] + "..."


def main() -> None:
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print("| in the loop | replica | residual share | scores vs reference | reference residual | outcome |")
    print("|---|---|---|---|---|---|")
    for name, case, key in ROWS:
        try:
            figures = case()
        except Exception as exc:  # the table shows what a user sees
            print(f"| {name} | | | | | {type(exc).__name__}: {_sentence(str(exc), key)} |")
            continue
        note = figures.get("note", "")
        warned = "warns" if figures["warnings"] else ""
        outcome = "; ".join(x for x in (warned, note) if x) or ("exact" if figures["share"] <= 1e-9 else "")
        print(f"| {name} | {figures['replica']:.1e} | {figures['share']:.1e} | {figures['scores']:.1e} | "
              f"{figures['reference_residual']:.1e} | {outcome} |")


if __name__ == "__main__":
    main()
