"""The ninth loops round: schedulers that edit momentum and betas, optimizer options and loop habits.

Cases in tests/_loops9_kit.py, the table in tests/stranger_loops_round9_table.py, documented in
docs/guide_own_model.md, "Round 9: schedulers that edit momentum, optimizer options, loop habits".

Exact means: replica <= 1e-6 against the trained model in evaluation mode, residual share <= 1e-9 without a
warning, ``keep=("train",)`` scores <= 1e-9 against the slow float64 loop reference, whose own per-step residual is
<= 1e-12 (for the optimizer state loaded before recording: the ``initial_state`` term <= 1e-12 against the
reference's carried part; for a checkpoint trajectory, which has no samples to split: the quadrature share and the
attribution's total against the model). The fixes of this round, each refused or warned before without naming its
cause: a ``maximize=True`` loop over the negated loss (the gradient check's message named no sign), an update by hand
with no ``optimizer.step()`` (a log line, then "no recorded steps" from the estimator), a second
``optimizer.step()`` on one backward (told to call ``rec.log_batch``, which would not help), a per-layer gradient
scale (no fix named) and LBFGS, which no adapter can express (told to write one), now refused saying so and naming
the checkpoint trajectory that explains such a run (exact: ``lbfgs_saved_each_step_from_checkpoints``).
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from _loops8_kit import _run, replica_with_defaults
from _loops9_kit import CASES, figures
from _round4_kit import estimator_warnings
from _stranger_loops_kit import assert_exact, mlp, plain, sgd

from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError, UnknownEntryError

EXACT = [
    "plateau_max_abs_cooldown", "plateau_per_group_min_lr", "sequential_lr_two_milestones",
    "chained_cyclic_momentum_and_exponential", "lambda_lr_one_function_per_group", "cyclic_lr_cycling_nadam_beta1",
    "one_cycle_three_phase_radam", "one_cycle_linear_adamax", "exponential_lr_adagrad_lr_decay",
    "sgd_nesterov_weight_decay_per_group", "nadam_momentum_decay_decoupled_foreach",
    "asgd_lambd_t0_weight_decay_step_lr", "asgd_foreach_two_groups", "adadelta_rho_weight_decay_cosine_lr",
    "adadelta_foreach_maximize_negated_loss_callable", "rprop_etas_step_sizes_two_groups",
    "rprop_foreach_maximize_negated_loss_callable",
    "adam_amsgrad_maximize_negated_loss_callable", "adagrad_maximize_negated_loss_callable",
    "clip_norm_error_if_nonfinite_foreach", "nan_loss_backwarded_then_skipped", "two_forwards_two_backwards",
    "uneven_last_micro_batch_mean_over_count", "batch_size_grows_with_curriculum", "manual_update_as_sgd_step",
    "log_batch_twice_per_batch", "head_in_its_own_group_at_lr_times_0.1",
    "other_runs_state_dict_loaded_before_recording", "manual_seed_reset_every_step_dropout",
    "ema_averaged_model_use_buffers_dropout", "lbfgs_saved_each_step_from_checkpoints",
]


@pytest.mark.parametrize("case", EXACT)
def test_exact(case):
    model, traj = CASES[case]()
    assert_exact(figures(case, model, traj))


NEGATED = (r"best scale -1;.*The loop's gradient is -1 times the gradient of loss=.*backwarded the negated loss.*"
           r"maximize=True.*Fix: give loss= the loss the loop backwards.*-F\.cross_entropy\(out, y\)")


@pytest.mark.parametrize("case", ["adam_amsgrad_maximize_weight_decay", "radam_decoupled_maximize_foreach",
                                  "adamax_maximize_weight_decay_foreach", "adagrad_maximize_initial_accumulator"])
def test_a_maximize_loop_over_the_negated_loss_is_refused_naming_the_sign_and_the_loss_callable(case):
    """Before: the message gave "best scale -1" among its generic causes, none of them the sign; the callable it now
    names is exact (``adam_amsgrad_maximize_negated_loss_callable``, ``adagrad_maximize_negated_loss_callable``)."""
    with pytest.raises(TrajectoryError, match=NEGATED):
        CASES[case]()


@pytest.mark.parametrize(("case", "error", "match"), [
    ("adamw_tensor_lr_from_start", ConfigError, r"\['lr'\]=tensor\(0\.0100\) is a tensor.*Fix: pass lr=float"),
    ("gradient_penalty_double_backward", TrajectoryError,
     r"Step 0: the gradient from backward\(\) does not match.*a penalty on the parameters added to the loss by "
     r"hand is no loss of the samples"),
    ("optimizer_step_twice_per_batch", TrajectoryError,
     r"Step 1: optimizer\.step\(\) was called without a logged batch, and no backward\(\) ran since step 0.*second "
     r"optimizer\.step\(\) on one backward.*Fix: remove the extra optimizer\.step\(\)"),
    ("lbfgs_closure_max_iter_4", UnknownEntryError,
     r"No optimizer adapter handles torch\.optim\.lbfgs\.LBFGS\..*No adapter can express torch\.optim\.LBFGS: its "
     r"direction mixes the coordinates.*Fix: train with an elementwise optimizer.*Trajectory\.from_checkpoints"),
    ("head_gradient_scaled_by_hand", TrajectoryError,
     r"gradient of 2\.weight, 2\.bias was changed by more than a global factor.*2\.weight times 0\.1, 2\.bias "
     r"times 0\.1\): a per-layer gradient scale\. Fix: .*own parameter group.*'lr': lr \* factor"),
])
def test_refused_naming_the_cause_and_the_fix(case, error, match):
    with pytest.raises(error, match=match):
        CASES[case]()


def test_a_step_without_a_logged_batch_after_a_backward_still_names_log_batch():
    """The second-step message only where no backward ran since the last step: a forgotten ``log_batch`` keeps its
    own message."""
    def step(s, model, opt, X, y, idx, rec):
        if s == 1:
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
            return
        plain(s, model, opt, X, y, idx, rec)

    with pytest.raises(TrajectoryError, match=r"Step 1: optimizer\.step\(\) was called without a logged batch: "
                                              r"call rec\.log_batch"):
        _run(mlp, sgd, step)


def test_an_update_by_hand_without_optimizer_step_is_warned_naming_it_and_the_sgd_step_that_records_it():
    """Before: a log line ("were not followed by optimizer.step(); dropped") and, when explaining, "the trajectory
    has no recorded steps"; now an ExplaindWarning at the end of ``with rec:`` names the parameters that moved, the
    hand-written update and the fix, torch.optim.SGD(lr=lr) stepped (exact: ``manual_update_as_sgd_step``)."""
    match = (r"6 micro-batch\(es\) were logged, but the recorded optimizer \(torch\.optim\.sgd\.SGD\) never stepped.*"
             r"the parameter\(s\) 0\.weight \(relative change .*p\.data\.add_\(-lr \* p\.grad\).*Fix: update "
             r"through optimizer\.step\(\).*torch\.optim\.SGD\(model\.parameters\(\), lr=lr\)")
    with pytest.warns(ExplaindWarning, match=match):
        model, traj = CASES["manual_update_without_optimizer_step"]()
    assert traj.n_steps == 0


def test_untuned_relu_runs_are_exact_with_the_default_estimators_or_warned_naming_the_divergence():
    """Deep ReLU MLP with SGD momentum at lr 2 and a ReLU CNN with Adamax at lr 1: the default replica within 1e-6
    (about 2e-8) and the residual share 1e-9 without a warning. NAdam at lr 3 diverges: the replica misses the model
    by 2.6 and says so, naming the oscillation and the window after it."""
    for case in ("deep_relu_sgd_momentum_lr2", "relu_cnn_adamax_lr1"):
        model, traj = CASES[case]()
        got = replica_with_defaults(model, traj)
        share, caught = estimator_warnings(traj)
        assert got["replica"] <= 1e-6 and not got["warnings"], (case, got)
        assert share <= 1e-9 and not caught, (case, share, caught)
    model, traj = CASES["deep_relu_nadam_lr3"]()
    got = replica_with_defaults(model, traj)
    assert got["replica"] > 1e-6
    assert any("the replica misses f(x; theta_stop)" in w and "a diverging or oscillating run" in w
               and "Fix: explain the window after them" in w for w in got["warnings"]), got
