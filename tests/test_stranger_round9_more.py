"""Ninth round of models, layers and losses nobody tuned for (tests/_round9_cases.py): every loud case.

Loud, each naming cause and fix, with what landed in this round (each test failed before it):

* a GAT layer summing into ``torch.zeros(...).index_add_(...)``: an ``UnsupportedModelError`` naming the in-place
  ``Tensor.index_add_`` and its out-of-place form, which is exact (before: torch's raw ``RuntimeError: vmap:
  index_add_(self, *extra_args) is not possible``);
* an energy model whose forward takes ``torch.autograd.grad(..., create_graph=True)`` of its input: an
  ``UnsupportedModelError`` naming the call and ``torch.func.grad``, which is exact (before: torch's raw
  ``RuntimeError: element 0 of tensors does not require grad``);
* ``torch.where(h > 0, sqrt(1 + h) - 1, 0.5 h)`` with ``h < -1`` in the batch: the NaN-gradient refusal now names the
  unused NaN branch and the double-where fix (before: lower the learning rate or clip gradients only);
* ``torch.atan2`` features whose pair crosses the negative x axis at SGD lr 5: the quadrature warnings name the call
  and the fix, its cosine and sine (before: only "a ReLU-dense path", in a model without ReLUs);
* a gradient reversal layer (DANN): ``keep=("train",)`` now takes forward-mode Jacobians and is exact (round 11;
  before: the quadrature-share warning named the custom ``torch.autograd.Function``, and before that a
  ``torch.no_grad()`` block); the replica and ``keep=("step",)`` are exact. With a ``jvp`` that mirrors the
  reversed backward (``-t``) the replica misses the trained model, and its quadrature warnings name the Function and
  the fix (before: float32 casts or jumps);
* a straight-through rounding Function: ``torch.round`` inside its forward is named as a jump (before: not seen, it
  runs under the Function's no_grad), and the share warning names the jump's fix instead of calling the replica
  exact;
* ``torch.autograd.functional.jacobian`` in the forward: refused as ``torch.autograd.grad`` is, the message naming
  ``torch.func.jacrev`` too, which is exact; ``torch.cond`` on a learned gate: an ``UnsupportedModelError`` naming
  it and ``torch.where`` (before: torch's raw ``AssertionError: Expected FakeTensor``);
* a gradient reversal by ``Tensor.register_hook(lambda g: -g)`` in the forward: ``keep=("train",)`` takes
  forward-mode Jacobians, exact (round 11; before: the share warning named the hook), and ``keep=("group",)`` takes
  forward mode, exact (before: reverse-mode Jacobians that follow the hook, 52 % of the change left in
  ``quadrature_error``, warned);
* ``weight.data`` read in the forward (a detached view): the quadrature warnings name ``Tensor.data`` as a stop of
  the gradient (before: float32 casts, then jumps);
* ``h.detach().numpy()`` and back, ``retain_grad()`` in the forward, complex outputs: an ``UnsupportedModelError``
  naming the call and the user's line (or the output dtype) and the fix (before: torch's raw ``RuntimeError``s,
  "Cannot access data pointer", "retain_grad() inside of a function being transformed", "expected scalar type
  Double but found ComplexDouble");
* a GCN whose normalised adjacency is a ``torch.sparse_coo_tensor`` buffer for ``torch.sparse.mm``: refused at the
  recorder naming the buffer, its layout and the dense or edge-list fix, both exact (before: torch's raw
  ``NotImplementedError: Could not run 'aten::equal' with arguments from the 'SparseCPU' backend`` from the buffer
  watch at the first step);
* NaN terms at test inputs only (a ``torch.where`` whose unused ``sqrt`` branch is NaN there, not at the training
  inputs): ``InfluenceEstimator.transform`` and ``CounterfactualEstimator.transform`` refuse, naming the inputs,
  the reverse-mode derivatives and the double-where fix (before: NaN values and NaN shares, which no warning
  compared above a tolerance);
* a norm written ``sqrt((h ** 2).sum())`` of ReLU units, explained at inputs where they are all 0: the replica's
  forward-mode derivative is NaN there; ``KernelReplica`` refuses, naming the inputs, ``sqrt`` at 0 and
  ``torch.linalg.vector_norm``, which is exact (before: NaN predictions without a word);
* a temperature kept as a module-level global and doubled after every step: the residual share warns (0.75), its
  causes now naming a module-level global the forward reads (before: attributes and closures only).

Refused as before, naming the cause: an FNO assembling its spectrum by slice assignment into ``torch.zeros``;
``torch.bucketize`` of a hidden unit (named as a jump).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from _round5_kit import N_TRAIN, QUAD, XV, YV, fit
from _round8_kit import jump_sites
from _round9_cases import CASES, YD
from _round9_functions import GradientReversal, HookReversal, dann_loss
from _round9_models import SqrtUntilFar
from reference import rel_err

import explaind
from explaind.estimators.residual import refuse_non_finite
from explaind.exceptions import ExplaindWarning, TrajectoryError, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("case", "error", "match"), [
    ("gat_segment_softmax_amax_index_add_inplace", UnsupportedModelError,
     r"in-place Tensor\.index_add_ on a tensor it created itself.*Fix: call the out-of-place Tensor\.index_add,"),
    ("energy_gradient_autograd_grad", UnsupportedModelError,
     r"forward calls torch\.autograd\.grad itself.*Fix: compute that gradient with torch\.func.*"
     r"torch\.func\.vmap\(torch\.func\.grad\(energy\)\)\(x\)"),
    ("where_unused_branch_nan", TrajectoryError,
     r"Step 0: the gradient of a\.weight, a\.bias contains NaN.*torch\.where.*0 \* NaN = NaN.*"
     r"Fix: apply the selection to the branch's input too \(the double where\)"),
    ("jacobian_features_autograd_functional", UnsupportedModelError,
     r"forward calls torch\.autograd\.grad itself.*torch\.func\.vmap\(torch\.func\.jacrev\(g\)\)\(x\) for "
     r"torch\.autograd\.functional\.jacobian"),
    ("torch_cond_learned_gate", UnsupportedModelError,
     r"forward calls torch\.cond \(a higher-order control-flow operator\).*Fix: .*torch\.where\(pred, a, b\)"),
    ("numpy_round_trip_in_forward", UnsupportedModelError,
     r"forward reads the memory of a tensor that depends on the input or the parameters \(forward, .*"
     r"_round9_models\.py:\d+\): Tensor\.numpy\(\).*Fix: compute it with torch operations"),
    ("retain_grad_in_forward", UnsupportedModelError,
     r"forward calls Tensor\.retain_grad\(\) \(forward, .*_round9_functions\.py:\d+\).*Fix: remove it"),
    ("complex_outputs", UnsupportedModelError,
     r"the model returns complex outputs \(torch\.complex128\).*Fix: return real outputs, e\.g\. "
     r"torch\.view_as_real\(out\)"),
    ("gcn_sparse_adjacency_sparse_mm", UnsupportedModelError,
     r"TrajectoryRecorder: the model holds sparse parameters or buffers \['adj \(torch\.sparse_coo\)'\].*"
     r"Fix: register the tensor dense"),
    ("hand_written_norm_of_a_zero_vector", UnsupportedModelError,
     r"KernelReplica: the replica is NaN or inf at test inputs \[0, 1\] where the model's outputs are finite: the "
     r"path derivatives \(forward mode, torch\.func\.jvp\) are not finite.*sqrt at 0.*"
     r"torch\.linalg\.vector_norm\(h, dim=-1\), whose derivative at 0 is 0"),
    # refused as before
    ("fno2d_rfft2_irfft2_slice_assignment", UnsupportedModelError,
     r"writes a tensor that depends on the input or the parameters into a tensor it created itself, in place"),
])
def test_refused_naming_the_cause_and_the_fix(case, error, match):
    with pytest.raises(error, match=match):
        CASES[case]()


@pytest.mark.parametrize(("case", "site"), [
    ("bucketize_embedding", r"<root> \(BucketizeEmbedding\): torch\.bucketize"),
    ("atan2_hypot_polar_sgd_5", r"<root> \(PolarFeatures\): torch\.atan2"),
])
def test_jumps_computed_in_forward_are_named(case, site):
    """The replica misses the trained model (the jump is no integral of the gradient; the split is exact), and every
    quadrature warning names the call."""
    got = CASES[case]()
    assert got["replica"] > 1e-3 and got["share"] <= 1e-9, got
    quadrature = [w for w in got["warnings"] if "adaptive quadrature left" in w]
    assert quadrature and all(re.search(r"calls whose output can jump .*" + site, w) for w in quadrature), quadrature


def test_weight_data_in_forward_is_named_as_a_stop_of_the_gradient():
    """``w / w.data.norm()``: the replica misses the trained model (the output moves with the norm, the gradient does
    not), and every quadrature warning names ``Tensor.data`` (before: float32 casts, then jumps)."""
    got = CASES["weight_data_in_forward"]()
    assert got["replica"] > 0.1 and got["share"] <= 1e-9, got
    quadrature = [w for w in got["warnings"] if "adaptive quadrature left" in w]
    assert quadrature and all("detaches tensors that depend on the parameters (<root> (DataNormalised): Tensor.data)"
                              in w and "nor .data" in w for w in quadrature), quadrature


def test_a_module_level_global_changed_between_steps_is_among_the_named_causes():
    """The gradient check passes (each step sees its own temperature); the engine replays with the last one, and the
    residual share warns, now naming a module-level global among the values the forward reads."""
    got = CASES["module_level_global_temperature"]()
    assert got["replica"] <= 1e-6 and got["share"] > 0.5, got
    assert any("residual share" in w and "a module-level global the forward reads" in w
               for w in got["warnings"]), got["warnings"]


def test_the_fixes_the_refusals_name_are_exact():
    """Out-of-place ``index_add`` and ``torch.func.grad`` are the exact cases of tests/test_stranger_round9.py; here
    the double where: the same model without it is the NaN refusal above."""
    got = CASES["where_unused_branch_double_where"]()
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and not got["warnings"], got


def assert_forward_mode_exact(build, keep: tuple[str, ...]) -> None:
    """A DANN model ``build`` trained on ``YD``: ``keep`` takes forward mode (``sweep_["path"] == "jvp"``), with no
    ExplaindWarning, and its total is the trained model's output within 1e-9."""
    model, traj = fit(build, XV, YD, loss=dann_loss)
    X = XV[N_TRAIN:]
    with torch.no_grad():
        truth = model.eval()(X).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        est = explaind.InfluenceEstimator(keep=keep, **QUAD).fit(traj)
        att = est.transform(X)
    assert est.sweep_["path"] == "jvp" and att.meta["quadrature_share"] <= 1e-9, (est.sweep_, att.meta)
    assert rel_err(np.asarray(att.total()), truth) <= 1e-9


def test_gradient_reversal_takes_forward_mode_jacobians_and_is_exact():
    """``keep=("train",)`` takes forward-mode Jacobians (the dot-product test finds the backward apart from the jvp):
    exact against the reference whose Jacobians are ``torch.func.jvp`` columns, silent (before: 52 % of the change
    in ``quadrature_error``, warned); ``keep=("step",)`` runs the jvp as before."""
    got = CASES["gradient_reversal_dann"]()
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and not got["warnings"], got
    assert got["scores"] <= 1e-9 and got["reference_residual"] <= 1e-10, got
    assert_forward_mode_exact(GradientReversal, ("step",))


def test_a_jvp_that_mirrors_a_reversed_backward_is_named_by_the_replica():
    """The replica follows the Function's jvp: ``-t`` is not the derivative of the identity, so the replica misses the
    trained model, and every quadrature warning names the Function and the fix (before: float32 casts and jumps)."""
    got = CASES["gradient_reversal_jvp_mirrors_backward"]()
    assert got["replica"] > 0.1 and got["share"] <= 1e-9, got
    quadrature = [w for w in got["warnings"] if "adaptive quadrature left" in w]
    assert quadrature and all("applies custom torch.autograd.Functions (<root> (GradientReversal): " in w
                              and "custom torch.autograd.Function _ReverseGrad.forward" in w
                              and "Fix: a jvp equal to the derivative of the forward" in w for w in quadrature), got


def test_a_jump_inside_a_custom_function_is_named_and_the_replica_not_called_exact():
    """A straight-through rounding Function: ``torch.round`` runs under the Function's no_grad on a tensor that does
    not require grad, yet is named as a jump; the share warning names the jump's fix, not forward mode (which is not
    exact here: the replica misses the trained model)."""
    got = CASES["straight_through_round_function"]()
    assert got["replica"] > 0.1 and got["share"] <= 1e-9, got
    quadrature = [w for w in got["warnings"] if "adaptive quadrature left" in w]
    assert quadrature and all(re.search(r"calls whose output can jump .*<root> \(QuantizedSTE\): torch\.round", w)
                              for w in quadrature), quadrature
    shares = [w for w in got["warnings"] if "quadrature error share" in w]
    assert shares and all("Use a continuous forward" in w and "exact on this model" not in w for w in shares), shares


def test_a_gradient_hook_in_forward_takes_forward_mode_for_every_axis():
    """``Tensor.register_hook(lambda g: -g)`` in the forward: ``keep=("train",)`` takes forward-mode Jacobians and is
    exact and silent (before: 52 % in ``quadrature_error``, warned naming the hook), and ``keep=("group",)`` takes
    forward mode and adds up to the trained model silently."""
    got = CASES["gradient_reversal_by_tensor_hook"]()
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and not got["warnings"], got
    assert got["scores"] <= 1e-9 and got["reference_residual"] <= 1e-10, got
    assert_forward_mode_exact(HookReversal, ("group",))


def test_nan_scores_at_test_inputs_only_are_refused_naming_the_where():
    """Trained where the unused sqrt branch is finite, explained at 100x held-out inputs where it is NaN: the
    outputs and the replica are finite, the reverse-mode Jacobians of keep=("train",) and the metagradients' start
    are NaN, and both attributions are refused naming the inputs and the double where (before: NaN values, NaN
    shares, no warning); keep=() (forward mode) stays exact and silent."""
    model, traj = fit(SqrtUntilFar, XV, YV)
    X = 100 * XV[N_TRAIN:]
    with pytest.raises(UnsupportedModelError, match=r"NaN or inf at test inputs \[0, 1\] where the model's outputs "
                                                    r"are finite.*reverse-mode Jacobians.*the double where"):
        explaind.InfluenceEstimator(keep=("train",), **QUAD).fit(traj).transform(X)
    with pytest.raises(UnsupportedModelError, match=r"CounterfactualEstimator: the attribution holds NaN or inf at "
                                                    r"test inputs \[0, 1\].*metagradient sweep"):
        explaind.CounterfactualEstimator().fit(traj).transform(X)
    with torch.no_grad():
        truth = model.eval()(X).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=(), **QUAD).fit(traj).transform(X)
    assert rel_err(np.asarray(att.total()), truth) <= 1e-9


def test_the_finiteness_check_names_nan_rows_only_not_finite_terms_whose_sum_overflows():
    ends = torch.zeros(3, 2, dtype=torch.float64)
    terms = torch.tensor([[1e308, 1e308], [float("nan"), 0.0], [1.0, float("inf")]], dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match=r"X: it is NaN or inf at test inputs \[1, 2\] where"):
        refuse_non_finite([ends], [terms], "X", "it is", "d")
    refuse_non_finite([ends[:1]], [terms[:1]], "X", "it is", "d")  # finite terms, an overflowing sum: no error
    ends[1] = float("nan")  # the model's own output is not finite there: not explaind's to refuse
    with pytest.raises(UnsupportedModelError, match=r"test inputs \[2\] where"):
        refuse_non_finite([ends], [terms], "X", "it is", "d")


class _Plain(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g

    @staticmethod
    def jvp(ctx, t):
        return 2 * t


class _Uses(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            n = self.a.weight.norm()
        return _Plain.apply(self.a(x)) / n


def test_a_custom_function_site_is_told_apart_from_a_no_grad_block():
    torch.manual_seed(0)
    sites = jump_sites(_Uses(), torch.randn(1, 4))
    assert len(sites) == 2, sites
    assert any(" under no_grad (_Uses.forward, " in s for s in sites), sites
    assert any(" under no_grad (custom torch.autograd.Function _Plain.forward, " in s for s in sites), sites
