"""Cases of the fifteenth round (tests/test_stranger_round15.py, tests/test_stranger_round15_more.py,
tests/stranger_round15_table.py): popular training code as its authors write it (timm's training script,
distillation, weight tying with a no-decay list, schedulers stepped per batch, gradient checkpointing, GANs, SAM
through ``.data``, a forgotten ``zero_grad()``, ReLU at untuned rates).

Every case builds on tests/_stranger_loops_kit.py (float64, 6 steps of 6 of 24 samples; loops in
tests/_round15_loops.py, models in tests/_round15_models.py) and is measured by :func:`figures` (replica against the
trained model in evaluation mode, residual share, ``keep=("train",)`` scores against the slow float64 loop reference
and that reference's own per-step residual); the ReLU cases (:data:`DEFAULT_RULE`) with the default estimators. A
case is a function returning ``(model, trajectory)``; one that the library refuses raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _round14_cases import loss_step, record, run
from _round14_loops import sam_step
from _round15_loops import (
    forgotten_zero_grad,
    gan_train,
    hand_smoothed_targets,
    kd_in_loop_step,
    kd_step,
    scheduled_per_batch,
    scheduler_before_step,
    timm_step,
    validation_mid_step,
)
from _round15_models import (
    GAN,
    CheckpointedSequential,
    Distilled,
    ModelEmaV2,
    SimCLRNet,
    TiedLM,
    focal_loss,
    kd_loss,
    relu_mlp,
    token_data,
)
from _stranger_loops_kit import adam, batches, dropout_mlp, measure, mlp, plain, sgd
from reference import Reference, rel_err
from replay_reference import ReplayReference
from torch import nn
from torch.optim import lr_scheduler

import explaind
from explaind.exceptions import ExplaindWarning

Case = Callable[[], tuple[nn.Module, Any]]


def timm_script(build: Callable[[], nn.Module] = mlp, make_opt: Callable[[nn.Module], Any] = sgd,
                max_norm: float = 0.5) -> Case:
    """timm's loop (:func:`~_round15_loops.timm_step`) with a hand-written ``ModelEmaV2`` of the model."""
    def case():
        model = build()
        ema = ModelEmaV2(model)
        return model, record(model, make_opt(model), timm_step(ema, max_norm))
    return case


def distilled(pinned: bool, **rec_kwargs: Any) -> Case:
    """:class:`~_round15_models.Distilled` (the teacher's columns beside the student's) under ``kd_loss``, Adam over
    the student's parameters."""
    def case():
        model = Distilled(pinned)
        opt = torch.optim.Adam(model.student.parameters(), lr=0.01)
        return model, record(model, opt, kd_step, loss=kd_loss, **rec_kwargs)
    return case


def distilled_p0() -> tuple[nn.Module, Any]:
    """The refusal's fix for a teacher in evaluation mode inside the training model: its dropout set to ``p=0`` and
    the teacher left in the model's mode (``pinned=False``, no ``teacher.eval()``)."""
    model = Distilled(pinned=False)
    model.teacher[2].p = 0.0
    model.train()
    opt = torch.optim.Adam(model.student.parameters(), lr=0.01)
    return model, record(model, opt, kd_step, loss=kd_loss)


def no_decay_groups(model: nn.Module, decay: float = 0.1) -> list[dict[str, Any]]:
    """The usual exclusion list: no weight decay on biases, norms and embeddings (by name and by ``ndim``)."""
    skip = ("bias", "norm", "emb")
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if p.ndim >= 2 and not any(k in n for k in skip)], "weight_decay": decay},
            {"params": [p for n, p in named if p.ndim < 2 or any(k in n for k in skip)], "weight_decay": 0.0}]


def tied_lm() -> tuple[nn.Module, Any]:
    """:class:`~_round15_models.TiedLM` (embedding = output projection) under AdamW with the no-decay list."""
    ids, y, _ = token_data()
    model = TiedLM()
    opt = torch.optim.AdamW(no_decay_groups(model), lr=0.02)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(ids, y))
    with rec:
        for s, idx in enumerate(batches()):
            plain(s, model, opt, ids, y, idx, rec)
    return model, rec.trajectory


def tied_after_optimizer() -> tuple[nn.Module, Any]:
    """Weight tying written after the optimizer was built: the optimizer holds the head's old weight, no parameter of
    the model any more."""
    ids, y, _ = token_data()
    model = TiedLM()
    model.head.weight = nn.Parameter(model.emb.weight.detach().clone())
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    model.head.weight = model.emb.weight
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(ids, y))
    with rec:
        for s, idx in enumerate(batches()):
            plain(s, model, opt, ids, y, idx, rec)
    return model, rec.trajectory


def per_batch(make_opt: Callable[[nn.Module], Any], make_sched: Callable[[Any], Any], metric: bool = False) -> Case:
    return run(make_opt=make_opt, step=scheduled_per_batch(make_sched, metric))


def gan(recorded: str, **kwargs: Any) -> Case:
    def case():
        model = GAN()
        return model, gan_train(model, recorded, **kwargs)
    return case


def gan_checkpoints() -> tuple[nn.Module, Any]:
    """The GAN trained unrecorded (a recorder would refuse it), the discriminator's ``state_dict`` saved before the
    run and after every step of its optimizer, explained by ``Trajectory.from_checkpoints`` (returned with the
    discriminator)."""
    model, saved = GAN(), []
    _unrecorded_gan(model, saved)
    return model.D, explaind.Trajectory.from_checkpoints(saved, GAN().D)


def _unrecorded_gan(model: GAN, saved: list[dict[str, torch.Tensor]]) -> None:
    """:func:`~_round15_loops.gan_train`'s loop without a recorder."""
    from _stranger_loops_kit import data

    X, _, _ = data()
    opt_D = torch.optim.Adam(model.D.parameters(), lr=0.01)
    opt_G = torch.optim.Adam(model.G.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(9)
    saved.append({k: v.detach().clone() for k, v in model.D.state_dict().items()})
    for idx in batches():
        z = torch.randn(len(idx), 2, generator=gen, dtype=X.dtype)
        opt_D.zero_grad()
        real_out, fake_out = model.D(X[idx])[:, 0], model.D(model.G(z).detach())[:, 0]
        (F.binary_cross_entropy_with_logits(real_out, torch.ones_like(real_out))
         + F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out))).backward()
        opt_D.step()
        saved.append({k: v.detach().clone() for k, v in model.D.state_dict().items()})
        opt_G.zero_grad()
        g_out = model.D(model.G(z))[:, 0]
        F.binary_cross_entropy_with_logits(g_out, torch.ones_like(g_out)).backward()
        opt_G.step()


def replica_only(model: nn.Module, traj: Any) -> dict[str, Any]:
    """The replica (8-node Gauss-Legendre) against ``model`` on the kit's test inputs, for runs with no train axis."""
    from _stranger_loops_kit import QUAD, data

    _, _, X_test = data()
    with torch.no_grad():
        truth = model.eval()(X_test)
    return {"replica": rel_err(explaind.KernelReplica(**QUAD).fit(traj).predict(X_test), truth)}


def simclr_run(columns: bool) -> Any:
    """SimCLR's NT-Xent (tests/_batch_coupled_kit.py's two views of 6 sources, ``batch_coupled_loss``) on
    :class:`~_round15_models.SimCLRNet`; with ``columns`` the terms read the projection's 4 columns only."""
    import _batch_coupled_kit as kit

    g = kit.gen(12)
    source = torch.randn(6, 5, generator=g, dtype=kit.DT)
    X = torch.cat([source + 0.3 * torch.randn(6, 5, generator=g, dtype=kit.DT),
                   source + 0.3 * torch.randn(6, 5, generator=g, dtype=kit.DT)])
    ids = torch.cat([torch.arange(6), torch.arange(6)]).to(kit.DT)
    gb = kit.gen(2)
    order = []
    for _ in range(kit.STEPS):
        pick = torch.randperm(6, generator=gb)[:3]
        order.append([torch.cat([pick, pick + 6])])
    model = SimCLRNet(columns)
    terms = (lambda out, i: kit.nt_xent_terms(out[:, :4], i)) if columns else kit.nt_xent_terms
    traj = kit.record(model, "sgd", X, ids, terms, order)
    return kit.Run(model, traj, torch.randn(3, 5, generator=g, dtype=kit.DT), terms)


def simclr_head_dropped() -> tuple[nn.Module, Any]:
    """SimCLR trained with its head, the head replaced by ``nn.Identity()`` after training, then explained."""
    run = simclr_run(False)
    run.model.head = nn.Identity()
    explaind.KernelReplica(quadrature="gauss-legendre", nodes=8, device="cpu").fit(run.traj)
    return run.model, run.traj


def simclr_representation_columns() -> tuple[nn.Module, Any]:
    run = simclr_run(True)
    return run.model, run


def grad_data_zeroed(s, model, opt, X, y, idx, rec) -> None:
    """The step of pre-1.0 scripts: ``p.grad.data.zero_()`` for every parameter (no version counter moves)."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.data.zero_()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def untuned(make_opt: Callable[[nn.Module], Any], step: Callable = plain) -> Case:
    return run(build=relu_mlp, make_opt=make_opt, step=step)


CASES: dict[str, Case] = {
    # left open in round 14
    "sam_written_through_data": run(step=sam_step(False, "data")),
    "asam_written_through_data": run(step=sam_step(True, "data")),
    "sam_written_through_data_adam": run(make_opt=adam, step=sam_step(False, "data")),
    "sam_written_through_data_check_off": run(step=sam_step(False, "data"), check_gradients=False),
    "gan_one_recorder_discriminator_optimizer": gan("D"),
    "gan_one_recorder_check_off": gan("D", check_gradients=False),
    "gan_discriminator_alone_recorded": gan("D_only"),
    "gan_discriminator_checkpoints": gan_checkpoints,
    # timm's training script
    "timm_model_ema_v2_clip_nonfinite_set_to_none_false": timm_script(),
    "timm_model_ema_v2_adamw_clip": timm_script(make_opt=lambda m: torch.optim.AdamW(m.parameters(), lr=0.02,
                                                                                     weight_decay=0.05)),
    # distillation
    "distillation_teacher_columns_pinned_eval": distilled(True),
    "distillation_teacher_columns_eval_once": distilled(False),
    "distillation_teacher_in_the_loop": run(make_opt=adam, step=kd_in_loop_step),
    # weight tying and a no-decay list
    "tied_embedding_lm_adamw_no_decay_list": tied_lm,
    # schedulers stepped per batch
    "onecycle_adam_cycle_momentum_per_batch": per_batch(adam, lambda o: lr_scheduler.OneCycleLR(
        o, max_lr=0.05, total_steps=6, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95)),
    "cosine_warm_restarts_adamw_per_batch": per_batch(
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1),
        lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=1, eta_min=0.001)),
    "reduce_on_plateau_adam_per_batch_loss": per_batch(
        lambda m: torch.optim.Adam(m.parameters(), lr=0.05),
        lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5), metric=True),
    # losses as written
    "focal_loss_callable_adam": run(make_opt=adam, step=loss_step(focal_loss), loss=focal_loss),
    "label_smoothing_module_instance_as_loss": run(step=loss_step(nn.CrossEntropyLoss(label_smoothing=0.1)),
                                                   loss=nn.CrossEntropyLoss(label_smoothing=0.1)),
    "label_smoothing_in_the_loop_cross_entropy_recorded": run(step=loss_step(
        nn.CrossEntropyLoss(label_smoothing=0.1))),
    "label_smoothing_by_hand_soft_targets_cross_entropy_recorded": run(step=hand_smoothed_targets),
    # loop habits
    "scheduler_stepped_before_the_optimizer": run(step=scheduler_before_step),
    "weight_tying_after_the_optimizer_was_built": tied_after_optimizer,
    "zero_grad_forgotten_at_step_3": run(step=forgotten_zero_grad(3)),
    "zero_grad_forgotten_at_step_1": run(step=forgotten_zero_grad(1)),
    "zero_grad_forgotten_at_step_3_checked": run(step=forgotten_zero_grad(3), check_gradients=True),
    "zero_grad_forgotten_at_step_3_check_off": run(step=forgotten_zero_grad(3), check_gradients=False),
    "grad_data_zero_by_hand_every_step": run(step=grad_data_zeroed),
    "grad_data_zero_by_hand_check_off": run(step=grad_data_zeroed, check_gradients=False),
    "simclr_projection_head_dropped_after_training": simclr_head_dropped,
    "simclr_representation_as_output_columns": simclr_representation_columns,
    "distillation_teacher_dropout_p0_train_mode": distilled_p0,
    "validation_forward_in_training_mode_mid_step_dropout_captured": run(
        build=dropout_mlp, step=validation_mid_step, capture_random=True),
    "checkpoint_sequential_dropout_non_reentrant_captured": run(build=CheckpointedSequential,
                                                                 capture_random=True),
    # ReLU at untuned rates (default estimators)
    "relu_adam_lr1": untuned(lambda m: torch.optim.Adam(m.parameters(), lr=1.0)),
    "relu_adam_lr0.3_timm_clip": lambda: timm_script(relu_mlp, lambda m: torch.optim.Adam(m.parameters(), lr=0.3),
                                                     max_norm=1.0)(),
    "relu_sgd_lr5": untuned(lambda m: torch.optim.SGD(m.parameters(), lr=5.0)),
    "relu_sgd_lr2_momentum": untuned(lambda m: torch.optim.SGD(m.parameters(), lr=2.0, momentum=0.9)),
}

#: Cases measured with the default estimators (ReLU at untuned rates).
DEFAULT_RULE = ("relu_adam_lr1", "relu_adam_lr0.3_timm_clip", "relu_sgd_lr5", "relu_sgd_lr2_momentum")

#: Cases whose training forward draws: against the reference that replays the recorded draws.
REPLAYED = ("checkpoint_sequential_dropout_non_reentrant_captured",
            "validation_forward_in_training_mode_mid_step_dropout_captured")


def recorded(name: str) -> tuple[nn.Module, Any, list[str]]:
    """Case ``name``'s model, trajectory and the ExplaindWarning messages raised while it ran."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, traj = CASES[name]()
    return model, traj, [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]


def assert_default_rule_exact(name: str) -> None:
    """The default replica within 1e-6 and the default estimator's share within 1e-9, neither warning."""
    from _loops8_kit import replica_with_defaults
    from _round4_kit import estimator_warnings

    model, traj = CASES[name]()
    got, (share, said) = replica_with_defaults(model, traj), estimator_warnings(traj)
    assert got["replica"] <= 1e-6 and not got["warnings"], got
    assert share <= 1e-9 and not said, (share, said)


def figures(name: str, model: nn.Module, traj: Any) -> dict[str, Any]:
    """The figures of case ``name``: :func:`~_stranger_loops_kit.measure` against the slow loop reference (the
    replayed cases against ``ReplayReference``, checkpointing switched off for the reference's plain forwards)."""
    if name == "gan_discriminator_checkpoints":
        got = replica_only(model, traj)
        return {**got, "share": 0.0, "scores": float("nan"), "reference_residual": 0.0, "warnings": []}
    if name == "simclr_representation_as_output_columns":
        import _batch_coupled_kit as kit
        return kit.figures(traj)
    if name == "tied_embedding_lm_adamw_no_decay_list":
        return measure(model, traj, X_test=token_data()[2])
    if name in REPLAYED:
        return measure(model, traj, ReplayReference, before_reference=lambda: setattr(model, "checkpointed", False))
    return measure(model, traj, Reference)
