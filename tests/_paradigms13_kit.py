"""Cases of the thirteenth round (tests/test_paradigms_round13.py, tests/paradigms_round13_table.py): fine-tuning
and learning from the model's own outputs, each a tiny float64 plain loop recorded with ``explaind.Recorder``.

A case returns a :class:`Run` (tests/_paradigms12_draws.py: the trained model, its trajectory, test inputs and the
slow float64 loop reference class) or raises where the library refuses the loop. Models in
tests/_paradigms13_models.py; the cases that select samples or train two networks in
tests/_paradigms13_select.py. Figures: tests/_paradigms12_draws.py's ``figures`` (replica against the trained
model in evaluation mode, residual share, ``keep=("train",)`` scores against the reference and its own residual)
and, for the untuned-rate cases (:data:`DEFAULT_RULE`), ``default_figures`` (the default estimators).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _paradigms12_draws import Case, Run, default_figures, figures, record, sgd  # noqa: F401 - re-exported
from _paradigms13_models import (
    DT,
    EWC,
    MeanTeacher,
    Mixout,
    Offset,
    SoftPrompt,
    TwoViews,
    adapters,
    body,
    fisher,
    lora,
    pretrained,
    views,
)
from _paradigms13_select import SELECT_CASES
from _stranger_loops_kit import N, batches, data
from replay_reference import BufferReference, ReplayReference

import explaind

# ---------------------------------------------------------------------------------------------- parameter-efficient


def lora_run(merge: bool = False, lr: float = 0.1, optim: str = "sgd") -> Run:
    """LoRA written by hand on the pretrained MLP: the base weights frozen, only ``A`` and ``B`` in the optimizer;
    with ``merge`` the factors are merged into the base after recording (``W += scale B A``, ``B = 0``)."""
    X, y, X_test = data()
    model = lora(pretrained())
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trained, lr=lr, momentum=0.9) if optim == "sgd" else torch.optim.Adam(trained, lr=lr)
    traj = record(model, opt, X, y, "cross_entropy", batches())
    if merge:
        for m in model:
            if hasattr(m, "merge"):
                m.merge()
    return Run(model, traj, X_test)


def adapter_run() -> Run:
    """Bottleneck adapters after each hidden activation of the frozen pretrained MLP, the head trained too."""
    X, y, X_test = data()
    model = adapters(pretrained())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    return Run(model, record(model, opt, X, y, "cross_entropy", batches()), X_test)


def prompt_run() -> Run:
    """Prompt tuning: only the two soft-prompt vectors prepended to the tokens train (:class:`SoftPrompt`)."""
    X, y, X_test = data()
    model = SoftPrompt()
    opt = torch.optim.SGD([model.prompt], lr=0.5, momentum=0.9)
    return Run(model, record(model, opt, X, y, "cross_entropy", batches()), X_test)


def bitfit_run() -> Run:
    """BitFit: the pretrained MLP with every weight frozen, only the biases in the optimizer."""
    X, y, X_test = data()
    model = pretrained()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    return Run(model, record(model, opt, X, y, "cross_entropy", batches()), X_test)


def mixout_run(capture: bool = True) -> Run:
    """Mixout on the pretrained MLP's hidden layer (:class:`Mixout`, the draw in the training forward), recorded
    with ``capture_random=True`` (or without, ``capture=False``)."""
    X, y, X_test = data()
    model = Mixout(pretrained())
    torch.manual_seed(13)
    traj = record(model, sgd(model), X, y, "cross_entropy", batches(), capture_random=capture)
    return Run(model, traj, X_test, ReplayReference)


# ---------------------------------------------------------------------------------------------- fine-tuning schedules


def probe_then_full(how: str) -> Run:
    """Linear probing (SGD on the head, steps 0-2) then full fine-tuning (Adam on everything, steps 3-5).

    ``how="two_recordings"``: each phase recorded on its own, the run returned the second (its start, the probed
    model); ``"requires_grad"``: one Adam over every parameter, the body's ``requires_grad`` off in the first phase;
    ``"second_optimizer"``: one recording of the probe's SGD, the Adam of the second phase created mid-run."""
    X, y, X_test = data()
    model = pretrained()
    steps = batches()
    loop = F.cross_entropy
    if how == "two_recordings":
        record(model, torch.optim.SGD(model[4].parameters(), lr=0.2), X, y, "cross_entropy", steps[:3])
        traj = record(model, torch.optim.Adam(model.parameters(), lr=0.01), X, y, "cross_entropy", steps[3:])
        return Run(model, traj, X_test)
    probe = torch.optim.SGD(model[4].parameters(), lr=0.2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01) if how == "requires_grad" else probe
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    full = None
    with rec:
        for s, idx in enumerate(steps):
            for p in model[:4].parameters():
                p.requires_grad_(s >= 3)
            if s == 3 and how == "second_optimizer":
                full = torch.optim.Adam(model.parameters(), lr=0.01)
            step = full or opt
            step.zero_grad()
            loop(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            step.step()
    return Run(model, rec.trajectory, X_test)


def unfreezing_run(lr: float = 0.01) -> Run:
    """ULMFiT's gradual unfreezing (the head alone for 2 steps, then the middle layer, then all) with layer-wise
    learning-rate decay (``lr * 0.5 ** depth`` from the head down), one AdamW over three parameter groups."""
    X, y, X_test = data()
    model = pretrained()
    layers = [model[4], model[2], model[0]]
    opt = torch.optim.AdamW([{"params": m.parameters(), "lr": lr * 0.5 ** d} for d, m in enumerate(layers)],
                            lr=lr, weight_decay=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s, idx in enumerate(batches()):
            for d, m in enumerate(layers):
                m.requires_grad_(d <= s // 2)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return Run(model, rec.trajectory, X_test)


def pretrained_start() -> Run:
    """A fine-tuning run whose start is loaded before recording: ``load_state_dict`` of the pretrained weights
    (saved with ``torch.save`` and read back with ``torch.load(weights_only=True)``) into a fresh model."""
    import io

    X, y, X_test = data()
    buf = io.BytesIO()
    torch.save(pretrained().state_dict(), buf)
    buf.seek(0)
    model = body(seed=9)
    model.load_state_dict(torch.load(buf, weights_only=True))
    return Run(model, record(model, sgd(model), X, y, "cross_entropy", batches()), X_test)


# ---------------------------------------------------------------------------------------------- anchored penalties


LAM = 0.5


def penalty_in_loop(kind: str = "l2sp") -> Run:
    """L2-SP (``lam ||theta - theta_0||^2``) or EWC (``lam sum F (theta - theta_0)^2``) added to the loss by hand
    in the loop, ``loss="cross_entropy"`` recorded."""
    X, y, X_test = data()
    model = pretrained()
    anchor = [p.detach().clone() for p in model.parameters()]
    weight = fisher(model) if kind == "ewc" else [torch.ones_like(a) for a in anchor]
    opt = sgd(model)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for idx in batches():
            opt.zero_grad()
            pen = sum((w * (p - a) ** 2).sum() for p, a, w in zip(model.parameters(), anchor, weight))
            (F.cross_entropy(model(X[idx]), y[idx]) + LAM * pen).backward()
            rec.log_batch(idx)
            opt.step()
    return Run(model, rec.trajectory, X_test)


def l2sp_offset(lr: float = 0.1) -> Run:
    """L2-SP exactly: :class:`Offset` trained by SGD with coupled ``weight_decay=2 lam`` on the offsets."""
    X, y, X_test = data()
    model = Offset(pretrained())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=2 * LAM)
    return Run(model, record(model, opt, X, y, "cross_entropy", batches()), X_test)


def ewc_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy on the logits plus ``lam`` times the penalty column, a mean of per-sample terms."""
    return F.cross_entropy(out[:, :3], y) + LAM * out[:, 3].mean()


def ewc_column() -> Run:
    """EWC exactly: :class:`EWC` returns the penalty as an output column, the loss callable adds ``lam`` of it."""
    X, y, X_test = data()
    net = pretrained()
    model = EWC(net, fisher(net))
    return Run(model, record(model, sgd(model), X, y, ewc_loss, batches()), X_test)


def continual_replay() -> Run:
    """Two tasks in sequence: task A's rows then task B's (the inputs shifted, other labels) concatenated in
    ``train_data``; steps 0-2 on task A, steps 3-5 on 4 rows of task B and 2 replayed rows of task A."""
    X, y, X_test = data()
    inputs, labels = torch.cat([X, X + 1.0]), torch.cat([y, (y + 1) % 3])
    g = torch.Generator().manual_seed(91)
    steps = [idx for idx in batches()[:3]]
    steps += [torch.cat([N + torch.randperm(N, generator=g)[:4], torch.randperm(N, generator=g)[:2]])
              for _ in range(3)]
    model = pretrained()
    return Run(model, record(model, sgd(model), inputs, labels, "cross_entropy", steps), X_test)


# ---------------------------------------------------------------------------------------------- self-training


THRESHOLD = 0.4


def fixmatch_loss(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """FixMatch's unlabelled loss: the weak view's detached argmax as the strong view's target where the weak
    view's confidence reaches :data:`THRESHOLD`, a mean of per-sample terms over the batch."""
    strong, weak = out[:, :3], out[:, 3:].detach()
    conf, label = torch.softmax(weak, 1).max(1)
    return (F.cross_entropy(strong, label, reduction="none") * (conf >= THRESHOLD)).mean()


def fixmatch(in_loop: bool = False, lr: float = 0.1, optim: str = "sgd") -> Run:
    """FixMatch on views drawn once (:func:`views`): the pseudo-labels computed in the loss callable from the weak
    view's output columns (:class:`TwoViews`); or (``in_loop``) as usually written, ``model(weak).argmax()`` under
    ``no_grad`` in the loop, the strong view trained on them, ``train_data`` the strong views."""
    pairs = views()
    train, test = pairs[:N], pairs[N:]
    net = pretrained()
    if not in_loop:
        model = TwoViews(net)
        opt = sgd(model, lr) if optim == "sgd" else torch.optim.Adam(model.parameters(), lr=lr)
        return Run(model, record(model, opt, train, torch.zeros(N, dtype=DT), fixmatch_loss, batches()), test)
    opt = sgd(net, lr)
    strong = train[:, 4:]
    rec = explaind.TrajectoryRecorder(net, opt, loss="cross_entropy", train_data=(strong, torch.zeros(N).long()))
    with rec:
        for idx in batches():
            with torch.no_grad():
                conf, label = torch.softmax(net(train[idx, :4]), 1).max(1)
            opt.zero_grad()
            (F.cross_entropy(net(strong[idx]), label, reduction="none") * (conf >= THRESHOLD)).mean().backward()
            rec.log_batch(idx)
            opt.step()
    return Run(net, rec.trajectory, test[:, 4:])


def consistency(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy on the labels plus the squared distance of the softmaxes to the (detached) teacher's."""
    gap = ((torch.softmax(student, 1) - torch.softmax(teacher.detach(), 1)) ** 2).sum(1)
    return F.cross_entropy(student, y) + gap.mean()


def teacher_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`consistency` on :class:`MeanTeacher`'s two output blocks."""
    return consistency(out[:, :3], out[:, 3:], y)


def mean_teacher(how: str) -> Run:
    """Mean-teacher consistency: an EMA of the student (decay 0.6) whose softmax the student is pulled to, beside
    the labels' cross entropy (:func:`consistency`). ``how="buffers"``: the teacher as buffers the training forward
    moves (:class:`MeanTeacher`, ``capture_random=True``, which replays the buffer updates); ``"closure"``: the
    teacher a copy outside the recorded model, updated after every step, read by the loss callable from its closure
    (the targets ``[x, y]``); ``"in_place"``: the teacher's softmax written into ``train_data``'s targets before
    each step (a soft pseudo-label), the loss the squared distance to them."""
    import copy

    X, y, X_test = data()
    if how == "buffers":
        model = MeanTeacher(pretrained())
        traj = record(model, sgd(model), X, y, teacher_loss, batches(), capture_random=True)
        return Run(model, traj, X_test, BufferReference)
    model = pretrained()
    teacher = copy.deepcopy(model).requires_grad_(False)
    opt = sgd(model)
    xy = torch.cat([X, y[:, None].to(DT)], 1)
    soft = torch.zeros(N, 3, dtype=DT)

    def closure_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return consistency(out, teacher(t[:, :4]), t[:, 4].long())

    def soft_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((torch.softmax(out, 1) - t) ** 2).sum(1).mean()

    loss = closure_loss if how == "closure" else soft_loss
    targets = xy if how == "closure" else soft
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, targets))
    with rec:
        for idx in batches():
            with torch.no_grad():
                soft[idx] = torch.softmax(teacher(X[idx]), 1)
            opt.zero_grad()
            loss(model(X[idx]), targets[idx]).backward()
            rec.log_batch(idx)
            opt.step()
            with torch.no_grad():
                for t, p in zip(teacher.parameters(), model.parameters()):
                    t.mul_(0.6).add_(0.4 * p)
    return Run(model, rec.trajectory, X_test)


CASES: dict[str, Case] = {
    # parameter-efficient fine-tuning
    "lora_by_hand_frozen_base": lora_run,
    "lora_merged_into_base_after_recording": lambda: lora_run(merge=True),
    "lora_adam_lr1_untuned": lambda: lora_run(lr=1.0, optim="adam"),
    "bottleneck_adapters_and_head": adapter_run,
    "prompt_tuning_soft_prompt_prepended": prompt_run,
    "bitfit_biases_only": bitfit_run,
    "mixout_to_pretrained_weights_capture_random": mixout_run,
    "mixout_to_pretrained_weights_no_capture": lambda: mixout_run(capture=False),
    # fine-tuning schedules
    "linear_probe_then_full_two_recordings": lambda: probe_then_full("two_recordings"),
    "linear_probe_then_full_one_adam_requires_grad": lambda: probe_then_full("requires_grad"),
    "linear_probe_then_full_second_optimizer_mid_run": lambda: probe_then_full("second_optimizer"),
    "gradual_unfreezing_layerwise_lr_decay": unfreezing_run,
    "gradual_unfreezing_adamw_lr1_untuned": lambda: unfreezing_run(lr=1.0),
    "pretrained_start_loaded_weights_only": pretrained_start,
    # anchored penalties, continual learning
    "l2sp_penalty_added_in_loop": penalty_in_loop,
    "ewc_penalty_added_in_loop": lambda: penalty_in_loop("ewc"),
    "l2sp_as_offset_with_weight_decay": l2sp_offset,
    "l2sp_offset_sgd_lr3_untuned": lambda: l2sp_offset(lr=3.0),
    "ewc_penalty_as_output_column": ewc_column,
    "continual_two_tasks_with_replay": continual_replay,
    # self-training
    "fixmatch_pseudo_labels_in_loss_callable": fixmatch,
    "fixmatch_pseudo_labels_in_loop": lambda: fixmatch(in_loop=True),
    "fixmatch_adam_lr1_untuned": lambda: fixmatch(lr=1.0, optim="adam"),
    "mean_teacher_as_buffers_moved_in_forward": lambda: mean_teacher("buffers"),
    "mean_teacher_read_by_loss_closure": lambda: mean_teacher("closure"),
    "mean_teacher_soft_labels_written_into_train_data": lambda: mean_teacher("in_place"),
    **SELECT_CASES,
}

#: Untuned learning rates: measured with the default estimators (adaptive rule) instead of the 8-node rule.
DEFAULT_RULE = tuple(name for name in CASES if name.endswith("_untuned"))

