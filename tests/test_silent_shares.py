"""Residual shares that stayed silent below ``residual_tol=1e-3`` though well above rounding level, and the default
``residual_tol="auto"`` that makes them loud (explaind/estimators/_residual_tol.py; docs/guide_own_model.md,
"The residual share, and what to do when it warns").

Before, the estimators warned above 1e-3 whatever the run, so these passed without a word:

* a float64 run whose loss weight was 1.001 at one step between two steps the sparse gradient check measured
  (share 1.4e-4; tests/_round13_cases.py);
* Moonshine's own loss, ``logits.float()`` inside a float64 model (share 1.0e-6; tests/_zoo12_cases.py): the
  recorder warned at recording, the estimators said nothing;
* a dropout MLP under float16 autocast with a GradScaler (share 1.9e-4; tests/_real_loop_testkit.py).

``"auto"`` warns above 1e-7 on a float64 run (the exact cases stay below 1e-8), states the share of every run
recorded under autocast with the autocast dtype's unit roundoff as its expected order, and keeps 1e-3 for float32
runs. Each figure is checked against the repository's slow float64 loop references where the case claims exactness.
Batch-hard triplets under Adam with the head's bias kept (share 9.8e-10) are rounding amplification, measured here
against the reference: the whole residual is the bias's update, which Adam made from a gradient that is zero in exact
arithmetic, so that share stays silent.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from _batch_coupled_kit import SHOWN
from _batch_coupled_kit import figures as coupled_figures
from _batch_coupled_kit import reference as coupled_reference
from _real_loop_testkit import MLP_QUAD, mlp_optimizer, record_autocast_mlp
from _round13_cases import CASES as ROUND13
from _round13_cases import figures as round13_figures
from _stranger_loops_kit import QUAD, data

import explaind
from explaind.estimators._residual_tol import FLOAT64_TOL, OTHER_TOL, PROMOTED_TOL, resolve_residual_tol
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.trajectory._output_rounding import EXTRAS_KEY

pytestmark = pytest.mark.usefixtures("one_thread")


def explained(traj, X, **kwargs) -> tuple[explaind.Attribution, list[str]]:
    """``InfluenceEstimator(keep=("train",))`` on ``X``, and the ``ExplaindWarning`` messages of ``transform``."""
    est = explaind.InfluenceEstimator(keep=("train",), **{"device": "cpu", **kwargs}).fit(traj)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        att = est.transform(X)
    return att, [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]


def residual_warnings(said: list[str]) -> list[str]:
    return [w for w in said if "residual share" in w]


# ----------------------------------------------------------------- (a) a loss weight changed at one unchecked step
def _unseen_bump(monkeypatch):
    """The loss weight bumped at step 2 only, recorded as a change the per-step comparison of the loss's derivative at
    the outputs does not see (a weight on a term outside the output, an output above its size limit): that comparison
    switched off (``UNITS`` infinite), so the bump is recorded with step 1's scale, as every change was before it."""
    import explaind.trajectory._output_cotangents as cotangents

    monkeypatch.setattr(cotangents, "UNITS", float("inf"))
    return ROUND13["loss_weight_bump_between_checks"]()


def test_a_loss_weight_changed_at_one_step_the_check_skipped_warns_at_the_default(monkeypatch):
    model, traj = _unseen_bump(monkeypatch)
    att, said = explained(traj, data()[2], **QUAD)
    assert 1e-4 < att.meta["residual_share"] < 2e-4 and att.meta["residual_tol"] == FLOAT64_TOL
    assert any(re.search(r"residual share 0\.000143 > residual_tol=1e-07 \(auto: for a float64 run\).*look at the "
                         r"steps it did not check \(2, 3, 5: check_gradients=True checks every step", w, re.S)
               for w in said), said
    # the old tolerance keeps the old silence
    assert not residual_warnings(explained(traj, data()[2], residual_tol=1e-3, **QUAD)[1])


def test_the_same_weight_checked_at_every_step_is_exact_and_silent_at_the_default():
    name = "loss_weight_bump_checked_every_step"
    model, traj = ROUND13[name]()
    got = round13_figures(name, model, traj)  # against the slow float64 loop reference
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["scores"] <= 1e-9, got
    assert not got["warnings"], got["warnings"]  # the estimators at their defaults
    att, said = explained(traj, data()[2], **QUAD)
    assert att.meta["residual_share"] <= 1e-9 and not said, said


# ----------------------------------------------------------------- (b) a float32 cast inside a float64 model's loss
@pytest.mark.filterwarnings("ignore:The training gradient reaching the output:explaind.exceptions.ExplaindWarning")
def test_moonshines_own_float32_loss_warns_at_the_default_naming_the_cast():
    from _zoo9_kit import run
    from _zoo12_cases import CASES as ZOO12

    got = run(ZOO12["moonshine_audio"])  # the estimators at their defaults, against the loop reference
    assert 1e-7 < got["share"] < 1e-5 and got["replica"] <= 1e-6 and got["train"] <= 1e-9, got
    assert any(re.search(r"residual share 1\.\d+e-06 > residual_tol=1e-07 \(auto: for a float64 run\).*\(1\) the "
                         r"recorder noted while recording that the training gradient reaching the output of the "
                         r"float64 model MoonshineForConditionalGeneration was rounded to float32.*compute the loss "
                         r"in float64", w, re.S) for w in got["warnings"]), got["warnings"]
    exact = run(ZOO12["moonshine_audio_float64_loss"])
    assert exact["share"] <= 1e-9 and exact["train"] <= 1e-9 and not exact["warnings"], exact


def test_a_float64_model_with_float32_norms_is_silent_at_the_default():
    from _zoo9_kit import assert_float32_exact, run
    from _zoo12_cases import CASES as ZOO12

    assert_float32_exact(run(ZOO12["olmo2"]))  # no warning, share <= 1e-7, train scores against the reference


# ------------------------------------------------------- (c) autocast: shares past its rounding stated
def test_a_float16_autocast_run_states_its_share_and_the_expected_order():
    model, traj, X_test = record_autocast_mlp("float16", mlp_optimizer, 6, 8)
    att, said = explained(traj, X_test, **MLP_QUAD)
    share = att.meta["residual_share"]
    assert 1e-5 < share < 1e-3 and att.meta["residual_tol"] == 0.01 * 2.0 ** -11
    assert att.meta["expected_residual_share"] == 2.0 ** -11  # float16's unit roundoff
    assert any(re.search(r"residual share 0\.000\d+ > residual_tol=[0-9.e-]+ \(auto: shares stated for a run recorded "
                         r"under torch\.autocast\(float16\)\).*unit roundoff 0\.00049 times a factor of the run.*"
                         r"this share is 0\.\d+ of it, within 100 of those units, so it is the autocast's rounding\. "
                         r"For scores at rounding level train without autocast; to accept this share silently pass "
                         r"residual_tol=0\.000\d+", w, re.S) for w in said), said
    suggested = float(re.search(r"silently pass residual_tol=([0-9.e-]+)\.", said[-1]).group(1))
    assert share < suggested <= 1.1 * share
    assert not residual_warnings(explained(traj, X_test, residual_tol=suggested, **MLP_QUAD)[1])


def test_strict_raises_on_an_autocast_run_under_auto_and_not_under_a_number_above_its_share():
    _, traj, X_test = record_autocast_mlp("float16", mlp_optimizer, 6, 8)
    with pytest.raises(TrajectoryError, match=r"residual_tol=[0-9.e-]+ \(auto: shares stated .*autocast\(float16\)"):
        explaind.InfluenceEstimator(keep=("train",), strict=True, device="cpu", **MLP_QUAD).fit(traj).transform(X_test)
    att = explaind.InfluenceEstimator(keep=("train",), strict=True, residual_tol=1e-3, device="cpu", **MLP_QUAD).fit(
        traj).transform(X_test)
    assert att.meta["residual_share"] < 1e-3


def test_a_bfloat16_autocast_run_is_stated_with_bfloat16s_unit():
    model, traj, X_test = record_autocast_mlp("bfloat16", mlp_optimizer, 6, 8)
    att, said = explained(traj, X_test, **MLP_QUAD)
    assert att.meta["expected_residual_share"] == 2.0 ** -8
    assert any("torch.autocast(bfloat16)" in w and "unit roundoff 0.0039" in w for w in said), said


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_autocast_share_is_the_dtypes_unit_roundoff_times_a_factor_of_the_run(optimizer):
    """The same run under float16 (with a GradScaler) and under bfloat16: the shares differ by about the ratio of
    the two unit roundoffs (8), so the share over the unit roundoff that "auto" states is a property of the run."""
    make = {"sgd": mlp_optimizer, "adam": lambda p: torch.optim.Adam(p, lr=0.01)}[optimizer]
    ratios = []
    for precision in ("float16", "bfloat16"):
        _, traj, X_test = record_autocast_mlp(precision, make, 8, 8)
        att, _ = explained(traj, X_test, **MLP_QUAD)
        ratios.append(att.meta["residual_share"] / att.meta["expected_residual_share"])
    assert 0.1 < min(ratios) and max(ratios) < 10 and max(ratios) / min(ratios) < 2, ratios


def test_the_same_loop_in_float32_without_autocast_is_silent_at_the_default():
    model, traj, X_test = record_autocast_mlp("float32", mlp_optimizer, 6, 8)
    att, said = explained(traj, X_test, **MLP_QUAD)
    assert att.meta["residual_tol"] == OTHER_TOL and att.meta["residual_share"] <= 2e-6 and not said, said
    assert "expected_residual_share" not in att.meta


# ----------------------------------------------------------------- (d) Adam on a bias the loss cannot see
def test_adam_on_a_bias_the_loss_cannot_see_is_rounding_amplification_and_silent():
    run = SHOWN["batch_hard_triplet_adam_dropout_head_bias"]()
    got = coupled_figures(run)  # the estimators at their defaults
    assert 1e-10 < got["share"] < FLOAT64_TOL and not got["warnings"], got
    ref = coupled_reference(run)  # the slow float64 loop reference: its residual per step and parameter
    E, delta = ref.E, torch.stack(ref.delta)
    sizes = [run.traj.params(0)[n].numel() for n in run.traj.param_names]
    bias = run.traj.param_names.index("3.bias")
    start = int(np.sum(sizes[:bias]))
    in_bias = slice(start, start + sizes[bias])
    rest = torch.ones(E.shape[1], dtype=torch.bool)
    rest[in_bias] = False
    # everything but the head's bias is at float64 rounding; the bias's residual is of the order of its whole
    # update, which is eps-sized Adam noise (1e-8 of the other updates): Adam divides a gradient that is zero in
    # exact arithmetic (rounding) by sqrt(v) + eps, and the recomputed gradients round otherwise
    assert float(E[:, rest].abs().max()) <= 1e-12 * float(delta.abs().max())
    moved, left = float(delta[:, in_bias].abs().max()), float(E[:, in_bias].abs().max())
    assert 0 < moved <= 1e-8 * float(delta.abs().max()) and 0.1 * moved <= left <= 10 * moved
    assert float(E[:, rest].norm()) <= 1e-3 * float(E.norm())


# ----------------------------------------------------------------- the tolerance itself
def test_a_number_keeps_its_meaning_and_bad_values_are_refused_naming_them(monkeypatch):
    _, traj = _unseen_bump(monkeypatch)
    att, said = explained(traj, data()[2], residual_tol=1e-5, **QUAD)
    assert att.meta["residual_tol"] == 1e-5
    assert any("residual share 0.000143 > residual_tol=1e-05:" in w for w in said), said
    for bad, match in [("sometimes", r"residual_tol.*'sometimes'.*'auto'"),
                       (0.0, r"residual_tol=0\.0 is not a tolerance: pass a positive number .* or 'auto'"),
                       (-1.0, r"residual_tol=-1\.0 is not a tolerance")]:
        with pytest.raises(ConfigError, match=match):
            explaind.InfluenceEstimator(residual_tol=bad).fit(traj)


def test_a_float64_run_converting_to_float32_inside_gets_the_promoted_level_unless_the_loss_was_cast():
    """The left-padded Qwen2 of tests/test_stranger_hf_decoders.py (share 5e-7, its float32 RMS norms) relies on
    this level; a float32 cast before the loss, noted by the recorder, keeps the float64 level."""
    _, traj = ROUND13["loss_weight_bump_checked_every_step"]()
    window = (0, traj.n_steps)
    casts = ["norm (RMSNorm): Tensor.to -> float32"]
    limit = resolve_residual_tol("auto", traj, window, casts)
    assert limit.value == PROMOTED_TOL and "converts to float32: norm (RMSNorm)" in limit.label
    assert resolve_residual_tol("auto", traj, window, []).value == FLOAT64_TOL
    traj.manifest.extras[EXTRAS_KEY] = "a float32 cast before the loss"
    assert resolve_residual_tol("auto", traj, window, casts).value == FLOAT64_TOL
    assert FLOAT64_TOL < PROMOTED_TOL < OTHER_TOL


def test_a_float64_run_explained_in_float32_gets_float32s_level_and_stays_silent():
    """The estimator's own float32 rounding is in the share of a float64 run explained with ``dtype="float32"``
    (1e-7 to 3.3e-7 on tests/test_reference_influence.py's float32 cases): ``"auto"`` takes float32's level there,
    and the same run explained in float64 keeps the float64 level and its rounding-level share."""
    _, traj = ROUND13["loss_weight_bump_checked_every_step"]()
    att, said = explained(traj, data()[2], dtype="float32", **QUAD)
    assert att.final.dtype == torch.float32 and att.meta["residual_share"] > 1e-9
    assert att.meta["residual_tol"] == OTHER_TOL and not residual_warnings(said), said
    limit = resolve_residual_tol("auto", traj, (0, traj.n_steps), [], torch.float32)
    assert limit.value == OTHER_TOL and limit.label == "0.001 (auto: for a run explained in float32)"
    att, said = explained(traj, data()[2], **QUAD)
    assert att.meta["residual_tol"] == FLOAT64_TOL and att.meta["residual_share"] <= 1e-9 and not said, said
