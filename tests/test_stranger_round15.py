"""The fifteenth round: popular training code as its authors write it (exact cases).

Cases in tests/_round15_cases.py (loops in tests/_round15_loops.py, models in tests/_round15_models.py), the table in
tests/stranger_round15_table.py, documented in docs/guide_own_model.md, section "Round 15: popular training code as
its authors write it". Exact means: replica <= 1e-6 against the trained model in evaluation mode, residual share
<= 1e-9 without a warning, ``keep=("train",)`` scores <= 1e-9 against the slow float64 loop reference (replaying the
recorded draws where the training forward draws), whose own per-step residual is <= 1e-12. The ReLU cases at
untuned rates: the default replica within 1e-6 and the default estimator's share within 1e-9, without a warning.
"""

from __future__ import annotations

import pytest
from _round15_cases import CASES, DEFAULT_RULE, assert_default_rule_exact, figures
from _stranger_loops_kit import assert_exact

EXACT = [
    "timm_model_ema_v2_clip_nonfinite_set_to_none_false", "timm_model_ema_v2_adamw_clip",
    "distillation_teacher_dropout_p0_train_mode", "tied_embedding_lm_adamw_no_decay_list",
    "onecycle_adam_cycle_momentum_per_batch", "cosine_warm_restarts_adamw_per_batch",
    "reduce_on_plateau_adam_per_batch_loss", "grad_data_zero_by_hand_every_step",
    "checkpoint_sequential_dropout_non_reentrant_captured", "simclr_representation_as_output_columns",
    "focal_loss_callable_adam", "label_smoothing_module_instance_as_loss",
    "validation_forward_in_training_mode_mid_step_dropout_captured", "scheduler_stepped_before_the_optimizer",
]


@pytest.mark.parametrize("case", EXACT)
def test_exact(case):
    model, traj = CASES[case]()
    assert_exact(figures(case, model, traj))


@pytest.mark.parametrize("case", DEFAULT_RULE)
def test_relu_at_untuned_rates_exact_with_the_defaults(case):
    assert_default_rule_exact(case)


def test_a_gan_discriminator_saved_after_every_step_is_replicated_exactly():
    # the alternative the GAN refusals name: the discriminator's state_dict after every step of its optimizer,
    # explained as macro-steps; the replica against the trained discriminator (its own forward, float64)
    model, traj = CASES["gan_discriminator_checkpoints"]()
    assert traj.n_steps == 6
    assert figures("gan_discriminator_checkpoints", model, traj)["replica"] <= 1e-12


def test_a_grad_zeroed_through_data_costs_a_check_that_passes():
    # p.grad.data.zero_() moves no version counter, so every step looks carried over: each is checked, and passes
    _, traj = CASES["grad_data_zero_by_hand_every_step"]()
    checked = traj.gradient_check()
    assert all(float(c) <= 1e-12 for c in checked), checked
