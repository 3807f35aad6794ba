"""Sixth round of cases nobody tuned for (tests/_round6_cases.py): exact in float64, or loud naming cause and fix.

Exact (replica <= 1e-6 against the trained model in evaluation mode, residual share <= 1e-9 with no warning, the
slow reference's own residual <= 1e-10, ``keep=("train",)`` scores within 1e-9 of it, or within 3x its own
quadrature error where its panels cannot resolve kinks computed inside ``forward``): PointNet (shared MLP, max over
points), message passing by hand with ``index_add_`` and ``scatter_reduce("amax")``, an MLP-Mixer block, a ConvNeXt
block (depthwise 7x7, channels-last LayerNorm, layer scale), squeeze-and-excitation, weight-standardised convolutions
with GroupNorm, a hypernetwork, capsules with routing by agreement, a neural ODE by Euler steps, a Siamese pair
model, CELU(0.5), cummax, sort pooling, logsumexp pooling; forwards that are piecewise constant where the gradient
is zero (``torch.sign`` and ``floor`` of hidden units: the layers before them never move), a hard Gumbel-softmax
gate (``capture_random=True``; evaluation mode is smooth), top-1 and top-2 expert routing while no route switches;
loops with per-sample importance weights or a per-step curriculum logged as ``log_batch`` weights, and Adam at lr 1.

Loud, each naming cause and fix, with what landed here (the test failed before it): a forward whose output jumps as
the parameters move (``torch.where`` between branches that do not meet, ``Softplus(threshold=1)``, BinaryConnect
``sign(W)`` under a straight-through estimator, argmax and top-k routing that switches at SGD lr 2): the quadrature
warnings now name the call and module (explaind/kernel/jumps.py; before: "a ReLU-dense path", the float32 hint, and
"use a smaller tol", none of which helps); a loop without an optimizer (the error now names torch.optim.SGD); an L1
penalty, a WGAN-GP input-gradient penalty and a weighted mean logged without its weights (the gradient check's
message now names each and the fix). Refused as before, naming the cause: ``torch.fake_quantize_per_tensor_affine``
(no forward-mode derivative), Lookahead by hand, DP-SGD by hand and gradient centralisation (``.grad`` edited).
"""

from __future__ import annotations

import re

import pytest
from _round6_cases import CASES
from _round6_kit import assert_exact

from explaind.exceptions import ConfigError, TrajectoryError, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = [
    "torch_sign_features", "floor_quantised_activations", "gumbel_softmax_hard_captured", "top1_moe_argmax_routing",
    "top2_moe_topk_routing", "pointnet_max_over_points", "gnn_index_add_sum", "gnn_scatter_reduce_amax",
    "mlp_mixer_block", "convnext_block", "squeeze_excitation", "weight_standardised_conv_groupnorm", "hypernetwork",
    "capsules_routing_by_agreement", "neural_ode_euler", "siamese_pairs", "celu_alpha", "cummax_sequence",
    "sort_pooling", "logsumexp_pooling", "importance_weighted_mean_logged", "curriculum_reweighting",
    "adam_lr_1_relu_loss_spikes",
]


@pytest.mark.parametrize("case", EXACT)
def test_exact(case):
    assert_exact(CASES[case]())


@pytest.mark.parametrize(("case", "call"), [
    ("where_with_two_branches", r"<root> \(Head\): Tensor\.gt"),
    ("softplus_threshold_switch", r"<root> \(Head\): torch\.nn\.functional\.softplus"),
    ("binaryconnect_sign_weights", r"<root> \(BinaryConnect\): torch\.sign"),
    ("top1_moe_argmax_route_switches", r"<root> \(Top1MoE\): Tensor\.argmax"),
    ("top2_moe_topk_route_switches", r"<root> \(Top2MoE\): Tensor\.topk"),
])
def test_a_forward_that_jumps_is_named_with_its_call_by_every_warning(case, call):
    """The replica misses the trained model (the jump is no integral of the gradient) and the quadrature error share
    is large: the replica's and the estimator's quadrature warnings and the share warning name the call, the module
    and a continuous forward as the fix, and no longer blame a ReLU-dense path alone, float32 casts or the tol."""
    got = CASES[case]()
    assert got["replica"] > 1e-3 and got["share"] <= 1e-9, got  # the data split is exact; the integral is not
    quad = [w for w in got["warnings"] if w.startswith("the adaptive quadrature left")]
    share = [w for w in got["warnings"] if "quadrature error share" in w]
    assert len(quad) == 2 and len(share) == 1, got["warnings"]
    for w in quad:
        assert re.search(call + r".*Fix: a continuous forward", w), w
        assert "float32 whatever its dtype" not in w, w
    assert re.search(r"Use a continuous forward .*" + call, share[0]), share[0]


@pytest.mark.parametrize(("case", "error", "match"), [
    ("manual_sgd_without_optimizer", ConfigError,
     r"got NoneType\. .*p -= lr \* p\.grad.*Fix: torch\.optim\.SGD\(model\.parameters\(\), lr=lr\)"),
    ("l1_penalty_in_loss", TrajectoryError, r"an L1 penalty .* leave it out of the run you record"),
    ("input_gradient_penalty_double_backward", TrajectoryError, r"penalty on input gradients taken with "
                                                                r"create_graph=True"),
    ("importance_weighted_mean_not_logged", TrajectoryError, r"rec\.log_batch\(idx, weights=w / w\.sum\(\)\)"),
    ("fake_quantize_qat", UnsupportedModelError, r"fake_quantize_per_tensor_affine_cachemask, which has no "
                                                 r"forward-mode derivative"),
    ("lookahead_by_hand", TrajectoryError, r"Step 2: the parameter\(s\) .*changed outside optimizer\.step\(\)"),
    ("dp_sgd_by_hand", TrajectoryError, r"changed by more than a global factor.*noise added to \.grad"),
    ("dp_sgd_by_hand_check_off", TrajectoryError, r"changed by more than a global factor"),
    ("gradient_centralisation", TrajectoryError, r"gradient of 0\.weight, 2\.weight, 4\.weight was changed by more "
                                                 r"than a global factor"),
    ("gradient_centralisation_check_off", TrajectoryError, r"changed by more than a global factor"),
    ("mean_teacher_ema_targets", TrajectoryError, r"exact only when the batch loss is sum_k w_k loss_fn\(sample k\)"),
    ("batch_class_balanced_loss", TrajectoryError, r"normalises by the batch's summed class weights"),
])
def test_refused_naming_the_cause(case, error, match):
    with pytest.raises(error, match=match):
        CASES[case]()


@pytest.mark.parametrize(("case", "low"), [
    ("l1_penalty_in_loss_check_off", 1e-2),
    ("input_gradient_penalty_check_off", 1e-3),
    ("importance_weighted_mean_not_logged_check_off", 0.1),
    ("temperature_annealed_in_loss_closure_check_off", 0.1),
    ("mean_teacher_ema_targets_check_off", 1e-2),
    ("batch_class_balanced_loss_check_off", 0.1),
])
def test_unchecked_runs_warn_with_the_residual_share(case, low):
    """With check_gradients=False the replica is exact and the residual share, which holds the penalty's or the
    unlogged weights' part of the updates, warns."""
    got = CASES[case]()
    assert got["replica"] <= 1e-6 and got["share"] > low, got
    assert any(w.startswith("InfluenceEstimator: residual share") for w in got["warnings"]), got


def test_find_jumps_names_parameter_dependent_calls_only():
    """A comparison of the inputs (a padding mask from token ids) and ReLU/max modules are no jump in the parameters;
    the same comparison on a hidden layer, a sign and an argmax are, each under its module."""
    import torch
    from torch import nn

    from explaind.kernel.jumps import find_jumps

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin, self.act = nn.Embedding(5, 4), nn.Linear(4, 4), nn.ReLU()

        def forward(self, x, jumpy=False):
            keep = (x != 0).to(torch.float64)[..., None]  # inputs only
            h = self.act(self.lin(self.emb(x))) * keep
            if jumpy:
                h = torch.where(h > 0.1, h, 0.5 * h) + torch.sign(h) + h.argmax(-1, keepdim=True)
            return h.amax(1)

    net = Net().double()
    params = dict(net.named_parameters())
    x = torch.tensor([[1, 2, 0]])
    assert find_jumps(net, lambda p: torch.func.functional_call(net, p, (x,)), params, tuple(params)) == ()
    sites = find_jumps(net, lambda p: torch.func.functional_call(net, p, (x, True)), params, tuple(params))
    assert sites == ("<root> (Net): Tensor.gt", "<root> (Net): torch.sign", "<root> (Net): Tensor.argmax"), sites


def test_a_temperature_in_the_loss_callables_closure_is_refused_at_the_next_step():
    """The gradient check passes (at each step the closure holds that step's temperature); the engine would recompute
    every step with the final one (77% of the change residual, named by the residual warning until round 16). The
    recorder now evaluates the callable again on the previous step's outputs and refuses the step after the
    temperature moved, naming the change and the fix."""
    with pytest.raises(TrajectoryError, match=r"Step \d+: the loss callable .* gives .* on the outputs of step \d+.*"
                                              r"it was changed between the steps.*a temperature or margin the loss "
                                              r"needs as an output column"):
        CASES["temperature_annealed_in_loss_closure"]()


def test_sgd_at_lr_1e4_stays_exact_and_names_the_one_step_left_above_tol():
    """SGD at lr 1e4 (the outputs blow up): replica, residual share and scores at rounding level; one (step, input)
    pair is left above tol=1e-11 at a relative error below 1e-7, and the quadrature warnings say so."""
    got = CASES["sgd_lr_1e4_diverging"]()
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["scores"] <= 1e-9, got
    assert got["warnings"] and all(w.startswith("the adaptive quadrature left 1 of 6") for w in got["warnings"]), got
    assert all(float(re.search(r"relative error up to ([0-9.e-]+)", w).group(1)) < 1e-7 for w in got["warnings"])
