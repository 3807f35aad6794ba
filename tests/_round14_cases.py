"""Cases of the fourteenth round (tests/test_stranger_round14.py, tests/test_stranger_round14_more.py,
tests/stranger_round14_table.py): training recipes from papers and popular repositories, written as their authors
write them.

Every case builds on tests/_stranger_loops_kit.py (float64, 6 steps of 6 of 24 samples, a small tanh model unless
the case names another; loops in tests/_round14_loops.py, models in tests/_round14_models.py) and is measured by
:func:`figures` (replica against the trained model in evaluation mode, residual share, ``keep=("train",)`` scores
against the slow float64 loop reference and that reference's own per-step residual); the ReLU cases
(:data:`DEFAULT_RULE`) with the default estimators. A case is a function returning ``(model, trajectory)``; one
that the library refuses raises.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _hf_testkit import MappingReference
from _loops9_kit import DeepRelu
from _round14_loops import (
    SAM,
    Lookahead,
    accumulation_step,
    activation_penalty_step,
    class_weighted_step,
    cutout_step,
    func_grad_step,
    functional_call_step,
    functional_train,
    growing_batches,
    hand_warmup,
    label_noise_step,
    length_curriculum_train,
    llrd_groups,
    mixup_step,
    noisy_labels,
    sam_class_step,
    sam_step,
    token_data,
    top_k_step,
    top_k_terms,
    zero_grad_per_micro_batch,
)
from _round14_models import (
    CutoutInForward,
    DropBlock,
    DropConnect,
    HiddenColumns,
    KeywordOnly,
    KeywordOnlyScores,
    MixupInForward,
    PartAutocast,
    StochasticDepth,
    ThreeLayers,
    TokenPool,
    WeightDrop,
    mixup_mean,
    mixup_terms,
    penalised,
)
from _stranger_loops_kit import QUAD, adam, batches, data, dropout_mlp, measure, mlp, plain, sgd
from reference import Reference, rel_err
from replay_reference import BufferReference, ReplayReference
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning

Case = Callable[[], tuple[nn.Module, Any]]


def record(model: nn.Module, opt: Any, step: Callable = plain, *, loss: Any = "cross_entropy",
           order: list[torch.Tensor] | None = None, after: Callable[[int], None] | None = None,
           labels: Callable[[torch.Tensor], torch.Tensor] | None = None, **rec_kwargs: Any) -> Any:
    """Record ``step`` over ``order`` (default: the kit's 6 batches of 6) with ``loss``; ``after(s)`` after each;
    ``labels(y)``: the targets trained on instead of the kit's."""
    X, y, _ = data()
    y = y if labels is None else labels(y)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), **rec_kwargs)
    with rec:
        for s, idx in enumerate(order if order is not None else batches()):
            step(s, model, opt, X, y, idx, rec)
            if after is not None:
                after(s)
    return rec.trajectory


def run(build: Callable[[], nn.Module] = mlp, make_opt: Callable[[nn.Module], Any] = sgd, step: Callable = plain,
        **kwargs: Any) -> Case:
    """``build()`` trained by ``make_opt``'s optimizer with ``step`` (``kwargs`` to :func:`record`)."""
    def case():
        model = build()
        return model, record(model, make_opt(model), step, **kwargs)
    return case


# ---------------------------------------------------------------------------------------------- optimizer wrappers


def lookahead(make_base: Callable[[nn.Module], Any]) -> Case:
    """The recorder given a :class:`~_round14_loops.Lookahead` wrapper around ``make_base``'s optimizer."""
    return run(make_opt=lambda m: Lookahead(make_base(m)))


def sam_class(recorded: str) -> Case:
    """:class:`~_round14_loops.SAM` over SGD momentum; the recorder given the wrapper (``"wrapper"``) or its
    ``base_optimizer`` (``"base"``)."""
    def case():
        model = mlp()
        sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        opt = sam if recorded == "wrapper" else sam.base_optimizer
        return model, record(model, opt, sam_class_step(sam))
    return case


def lookahead_inner() -> tuple[nn.Module, Any]:
    """The recorder given the optimizer inside :class:`~_round14_loops.Lookahead`; the loop steps the wrapper."""
    model = mlp()
    wrapper = Lookahead(sgd(model))

    def step(s, model, opt, X, y, idx, rec):
        wrapper.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        wrapper.step()
    return model, record(model, wrapper.base, step)


def ema_mid_run() -> tuple[nn.Module, Any]:
    """SGD momentum with an EMA of the weights, ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9),
    use_buffers=True)`` updated after every step and evaluated (``ema.eval()``) after step 2, the model back in
    training mode."""
    model = mlp()
    opt = sgd(model)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9),
                                              use_buffers=True)
    _, _, X_test = data()

    def after(s: int) -> None:
        ema.update_parameters(model)
        if s == 2:
            with torch.no_grad():
                ema.eval()(X_test)
            ema.train()
    return model, record(model, opt, after=after)


def ema_swapped_in() -> tuple[nn.Module, Any]:
    """SGD momentum with an EMA (``get_ema_multi_avg_fn(0.9)``) whose weights are loaded into the model for a
    validation pass after step 2 and the training weights loaded back (``load_state_dict`` both ways)."""
    model = mlp()
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    _, _, X_test = data()

    def after(s: int) -> None:
        ema.update_parameters(model)
        if s == 2:
            backup = copy.deepcopy(model.state_dict())
            model.load_state_dict(ema.module.state_dict())
            with torch.no_grad():
                model.eval()(X_test)
            model.load_state_dict(backup)
            model.train()
    return model, record(model, sgd(model), after=after)


def llrd_warmup(build: Callable[[], nn.Module] = ThreeLayers, optimizer: type = torch.optim.AdamW,
                base: float = 0.1, **opt_kwargs: Any) -> Case:
    """Layer-wise learning-rate decay (a group per layer) under a warm-up written by hand."""
    def case():
        model = build()
        opt = optimizer(llrd_groups(model, base), **opt_kwargs)
        for g in opt.param_groups:
            g["lr"] = g["lr_target"] / 4
        return model, record(model, opt, after=hand_warmup(opt))
    return case


def functional_loop() -> tuple[nn.Module, Any]:
    model = mlp()
    return model, functional_train(model, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))


def parametrized_mid_run(register: Callable[[nn.Module], None]) -> Case:
    """SGD momentum; after step 2 the hidden layer gets a parametrization (``register(model[0])``) and the loop
    goes on with the same optimizer (as a user adds it to a running script)."""
    def case():
        model = mlp()
        return model, record(model, sgd(model), after=lambda s: register(model[0]) if s == 2 else None)
    return case


def orthogonal(layer: nn.Module) -> None:
    torch.nn.utils.parametrizations.orthogonal(layer)


def weight_norm(layer: nn.Module) -> None:
    torch.nn.utils.parametrizations.weight_norm(layer)


def length_curriculum(how: str, **rec_kwargs: Any) -> Case:
    """:class:`~_round14_models.TokenPool` under a sequence-length curriculum written ``how``
    (:func:`~_round14_loops.length_curriculum_train`), Adam."""
    def case():
        model = TokenPool(counted=how == "counted")
        return model, length_curriculum_train(model, adam(model), how, **rec_kwargs)
    return case


def compiled_in_the_loop(build: Callable[[], nn.Module] = mlp, **rec_kwargs: Any) -> Case:
    """The recorder given ``build()``, the loop calling ``torch.compile(model, mode="reduce-overhead")`` (SGD
    momentum)."""
    def case():
        model = build()
        compiled = torch.compile(model, mode="reduce-overhead")

        def step(s, model, opt, X, y, idx, rec):
            opt.zero_grad()
            F.cross_entropy(compiled(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
        return model, record(model, sgd(model), step, **rec_kwargs)
    return case


def keyword_only(build: Callable[[], nn.Module] = KeywordOnly, flags: dict[str, Any] | None = None,
                 held: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
    """:class:`~_round14_models.KeywordOnly` (or ``build()``) with ``train_data=({"features": X, **held}, y)``,
    ``model(features=..., **flags)``; the loop reads the output's first field."""
    X, y, _ = data()
    model = build()
    opt = adam(model)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy",
                                      train_data=({"features": X, **(held or {})}, y))
    with rec:
        for idx in batches():
            opt.zero_grad()
            out = model(features=X[idx], **(flags or {}))
            F.cross_entropy(getattr(out, dataclasses.fields(out)[0].name), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model, rec.trajectory


def loss_step(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
    """The textbook step with ``loss(model(x), y)`` as the loss."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        loss(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        opt.step()
    return step


def activation_penalty_in_the_loop() -> tuple[nn.Module, Any]:
    """:func:`~_round14_loops.activation_penalty_step` on :class:`~_round14_models.KeywordOnly`, recorded with
    ``loss="cross_entropy"``."""
    X, y, _ = data()
    model = KeywordOnly()
    opt = adam(model)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=({"features": X}, y))
    with rec:
        for s, idx in enumerate(batches()):
            activation_penalty_step(s, model, opt, X, y, idx, rec)
    return model, rec.trajectory


def relu(build: Callable[..., nn.Module]) -> Callable[[], nn.Module]:
    return lambda: build(nn.ReLU)


CASES: dict[str, Case] = {
    # two forward-backward passes per step
    "sam_restore_by_copy": run(step=sam_step(False)),
    "asam_restore_by_copy": run(make_opt=adam, step=sam_step(True)),
    "sam_restore_by_sub": run(step=sam_step(False, "sub")),
    "sam_restore_by_copy_check_off": run(step=sam_step(False), check_gradients=False),
    "sam_written_through_data": run(step=sam_step(False, "data")),
    "sam_written_through_data_check_off": run(step=sam_step(False, "data"), check_gradients=False),
    # optimizer wrappers and averages
    "sam_class_wrapper_recorded": sam_class("wrapper"),
    "sam_class_base_optimizer_recorded": sam_class("base"),
    "lookahead_wrapper_sgd": lookahead(sgd),
    "lookahead_inner_optimizer_recorded": lookahead_inner,
    "lookahead_wrapper_adam": lookahead(adam),
    "ema_get_ema_multi_avg_fn_evaluated_mid_run": ema_mid_run,
    "ema_weights_swapped_in_for_validation_and_back": ema_swapped_in,
    # regularisers in forward
    "stochastic_depth_per_sample_captured": run(StochasticDepth, capture_random=True),
    "stochastic_depth_per_sample_not_captured": run(StochasticDepth),
    "dropconnect_on_the_weight_captured": run(DropConnect, adam, capture_random=True),
    "dropblock_captured": run(DropBlock, capture_random=True),
    "awd_weight_drop_plain_attribute_captured": run(WeightDrop, capture_random=True),
    "cutout_in_forward_captured": run(CutoutInForward, capture_random=True),
    "mixup_in_forward_batch_coupled_loss": run(MixupInForward, adam, loss_step(mixup_mean),
                                                loss=explaind.batch_coupled_loss(mixup_terms, batch_loss=mixup_mean),
                                                capture_random=True),
    "mixup_in_forward_plain_callable": run(MixupInForward, adam, loss_step(mixup_mean), loss=mixup_mean,
                                           capture_random=True),
    # the inputs or targets edited in the loop
    "cutout_in_the_loop": run(step=cutout_step),
    "mixup_per_sample_lambda_in_the_loop": run(step=mixup_step),
    "label_noise_in_the_loop": run(step=label_noise_step),
    "label_noise_drawn_before_recording": run(labels=noisy_labels),
    # losses that select or weight
    "top_k_hard_examples_batch_coupled_terms": run(make_opt=adam, step=top_k_step,
                                                   loss=explaind.batch_coupled_loss(top_k_terms)),
    "top_k_hard_examples_cross_entropy": run(make_opt=adam, step=top_k_step),
    "class_weights_in_cross_entropy_logged": run(step=class_weighted_step(True)),
    "class_weights_in_cross_entropy_not_logged": run(step=class_weighted_step(False)),
    # curricula and accumulation that change with the step
    "batch_size_growing_with_the_step": run(make_opt=adam, order=growing_batches()),
    "accumulation_count_changing_mid_run": run(step=accumulation_step(lambda s: 1 + s // 2, lambda s: 1 + s // 2)),
    "accumulation_zero_grad_inside_the_micro_batch_loop": run(step=zero_grad_per_micro_batch),
    "accumulation_count_changing_stale_divisor": run(step=accumulation_step(lambda s: 2 if s < 2 else 3,
                                                                            lambda s: 2)),
    # learning rates per layer
    "llrd_adamw_hand_warmup": llrd_warmup(weight_decay=0.01),
    # loops and models written another way
    "functional_call_loop_param_dict": functional_loop,
    "orthogonal_registered_mid_run": parametrized_mid_run(orthogonal),
    "weight_norm_registered_mid_run": parametrized_mid_run(weight_norm),
    "keyword_only_forward_dataclass_output": keyword_only,
    "dataclass_output_without_logits": lambda: keyword_only(KeywordOnlyScores),
    "keyword_flag_passed_in_the_loop_only": lambda: keyword_only(flags={"temperature": 2.0}),
    "activation_penalty_in_the_loop": activation_penalty_in_the_loop,
    "activation_penalty_as_output_columns": run(HiddenColumns, adam, loss_step(penalised), loss=penalised),
    "keyword_flag_in_train_data": lambda: keyword_only(flags={"temperature": 2.0}, held={"temperature": 2.0}),
    "functional_call_over_the_models_own_parameters": run(make_opt=adam, step=functional_call_step),
    "torch_func_grad_assigned_to_grad": run(step=func_grad_step),
    "sequence_length_curriculum_truncated_in_the_loop": length_curriculum("cut"),
    "sequence_length_curriculum_buffer_set_in_the_loop": length_curriculum("buffer"),
    "sequence_length_curriculum_step_counter_buffer": length_curriculum("counted", capture_random=True),
    "token_masking_in_the_loop": length_curriculum("masked"),
    "autocast_around_part_of_the_model": run(PartAutocast, adam),
    "torch_compile_reduce_overhead_in_the_loop": compiled_in_the_loop(),
    "torch_compile_reduce_overhead_dropout_in_the_loop": compiled_in_the_loop(dropout_mlp),
    # untuned rates, ReLU-heavy
    "relu_stochastic_depth_adam_lr0.3_captured": run(relu(StochasticDepth),
                                                     lambda m: torch.optim.Adam(m.parameters(), lr=0.3),
                                                     capture_random=True),
    "relu_dropconnect_sgd_lr3_captured": run(relu(DropConnect), lambda m: torch.optim.SGD(m.parameters(), lr=3.0),
                                             capture_random=True),
    "relu_llrd_sgd_lr4_momentum_hand_warmup": llrd_warmup(relu(ThreeLayers), torch.optim.SGD, 4.0, momentum=0.9),
    "deep_relu_adam_lr0.5_growing_batches": run(DeepRelu, lambda m: torch.optim.Adam(m.parameters(), lr=0.5),
                                                order=growing_batches()),
}

#: Cases whose ReLU paths are measured with the default estimators (adaptive rule) instead of the 8-node rule.
DEFAULT_RULE = ("relu_stochastic_depth_adam_lr0.3_captured", "relu_dropconnect_sgd_lr3_captured",
                "relu_llrd_sgd_lr4_momentum_hand_warmup", "deep_relu_adam_lr0.5_growing_batches")

#: Cases with draws in the training forward, replayed by the reference (``replay_reference.ReplayReference``).
REPLAYED = ("stochastic_depth_per_sample_captured", "dropconnect_on_the_weight_captured", "dropblock_captured",
            "cutout_in_forward_captured", "mixup_in_forward_batch_coupled_loss",
            "awd_weight_drop_plain_attribute_captured",
            # a batch-coupled loss's terms are taken on each micro-batch as a whole, as the replayed reference does
            "top_k_hard_examples_batch_coupled_terms")


def keyword_figures(model: nn.Module, traj: Any, **flags: Any) -> dict[str, Any]:
    """:func:`~_stranger_loops_kit.measure`'s figures for :class:`~_round14_models.KeywordOnly`, whose inputs are
    the mapping ``{"features": X, **flags}`` (the slow reference: tests/_hf_testkit.py's ``MappingReference``)."""
    _, _, X_test = data()
    inputs = {"features": X_test, **flags}
    with torch.no_grad():
        truth = model.eval()(**inputs).logits
    replica = rel_err(explaind.KernelReplica(**QUAD).fit(traj).predict(inputs), truth)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), **QUAD).fit(traj).transform(inputs)
    ref = MappingReference(traj, inputs, panels=1)
    expected = ref.kept(("train",))
    return {"replica": replica, "share": float(att.meta["residual_share"]),
            "scores": rel_err(np.asarray(att.values).reshape(expected.shape), expected),
            "reference_residual": float(ref.E.abs().max()) / max(float(torch.stack(ref.delta).abs().max()), 1e-300),
            "warnings": [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]}


def figures(name: str, model: nn.Module, traj: Any) -> dict[str, Any]:
    """The figures of case ``name``: :func:`~_stranger_loops_kit.measure` against the slow loop reference (the
    replayed cases against ``ReplayReference``)."""
    if name == "keyword_only_forward_dataclass_output":
        return keyword_figures(model, traj)
    if name == "keyword_flag_in_train_data":
        return keyword_figures(model, traj, temperature=2.0)
    if name == "sequence_length_curriculum_step_counter_buffer":  # the buffers each training forward starts from
        return measure(model, traj, BufferReference, X_test=token_data()[2])
    return measure(model, traj, ReplayReference if name in REPLAYED else Reference)

