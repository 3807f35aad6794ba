"""The fourteenth round: training recipes from papers and popular repositories, written as their authors write them
(exact cases).

Cases in tests/_round14_cases.py (loops in tests/_round14_loops.py, models in tests/_round14_models.py), the table in
tests/stranger_round14_table.py, documented in docs/guide_own_model.md, section "Round 14: training recipes from
papers, written as their authors write them". Exact means: replica <= 1e-6 against the trained model in evaluation
mode, residual share <= 1e-9 without a warning, ``keep=("train",)`` scores <= 1e-9 against the slow float64 loop
reference (replaying the recorded draws where the training forward draws), whose own per-step residual is <= 1e-12.
The ReLU cases at untuned rates: the default replica within 1e-6 and the default estimator's share within 1e-9,
without a warning.
"""

from __future__ import annotations

import pytest
from _loops8_kit import replica_with_defaults
from _round4_kit import estimator_warnings
from _round14_cases import CASES, DEFAULT_RULE, figures
from _stranger_loops_kit import assert_exact

EXACT = [
    "ema_get_ema_multi_avg_fn_evaluated_mid_run", "stochastic_depth_per_sample_captured",
    "dropconnect_on_the_weight_captured", "dropblock_captured", "cutout_in_forward_captured",
    "mixup_in_forward_batch_coupled_loss", "top_k_hard_examples_batch_coupled_terms",
    "class_weights_in_cross_entropy_logged", "label_noise_drawn_before_recording", "batch_size_growing_with_the_step",
    "accumulation_count_changing_mid_run", "accumulation_count_changing_stale_divisor", "llrd_adamw_hand_warmup",
    "keyword_only_forward_dataclass_output", "autocast_around_part_of_the_model",
    "functional_call_over_the_models_own_parameters", "sequence_length_curriculum_step_counter_buffer",
    "torch_compile_reduce_overhead_in_the_loop", "keyword_flag_in_train_data",
    "ema_weights_swapped_in_for_validation_and_back", "awd_weight_drop_plain_attribute_captured",
    "activation_penalty_as_output_columns",
]


@pytest.mark.parametrize("case", EXACT)
def test_exact(case):
    model, traj = CASES[case]()
    assert_exact(figures(case, model, traj))


@pytest.mark.parametrize("case", [c for c in DEFAULT_RULE if c != "deep_relu_adam_lr0.5_growing_batches"])
def test_relu_at_untuned_rates_exact_with_the_defaults(case):
    model, traj = CASES[case]()
    got = replica_with_defaults(model, traj)
    share, said = estimator_warnings(traj)
    assert got["replica"] <= 1e-6 and not got["warnings"], got
    assert share <= 1e-9 and not said, (share, said)


def test_a_stale_accumulation_divisor_is_checked_at_the_step_its_count_changes():
    # two micro-batches each divided by 2, then three still divided by 2 (a factor 1.5 from step 2 on): step 2, which
    # the sparse schedule (steps 0, 1, 4) skips, is checked because its micro-batches changed, and its scale measured
    _, traj = CASES["accumulation_count_changing_stale_divisor"]()
    checked = traj.gradient_check()
    assert [s for s in range(6) if checked[s] == checked[s]] == [0, 1, 2, 4], checked
    assert all(float(checked[s]) <= 1e-12 for s in (0, 1, 2, 4)), checked
