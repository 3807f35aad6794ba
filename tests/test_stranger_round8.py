"""Eighth round of models, layers and losses nobody tuned for (tests/_round8_cases.py), the exact ones: float64, each
within the bounds (replica <= 1e-6 against the trained model in evaluation mode, residual share <= 1e-9 with no
warning, the slow reference's own residual <= 1e-10, ``keep=("train",)`` scores within 1e-9 of it, or within 3x its
own quadrature error where its panels cannot resolve kinks computed inside ``forward``):

* layers and models: ``nn.LazyLinear`` made concrete by a dry forward, ``prune.l1_unstructured`` (``weight_orig``
  times ``weight_mask`` in a pre-hook), ``Dropout3d`` after ``Conv3d`` with ``ELU``, ``AvgPool2d`` with
  ``ceil_mode``/``count_include_pad=False`` and ``divisor_override``, ``nn.Upsample``, ``SELU``, ``Hardtanh``,
  ``Softsign``; ``nn.MultiheadAttention`` with per-head weights (``average_attn_weights=False``) read downstream;
  ``nn.TransformerEncoderLayer(activation="gelu", batch_first=True)`` with ``src_key_padding_mask``;
  ``nn.TransformerDecoderLayer(norm_first=True)`` with a causal mask and ``memory_key_padding_mask``; a RealNVP
  flow with a ``torch.slogdet`` mixing matrix trained by its likelihood at SGD 0.05; a mixture density network through
  ``torch.distributions.Normal``; a neural ODE by RK4; an FNO-style ``rfft`` spectral convolution with complex weights
  held as real pairs; a ``torch.linalg.solve`` layer; logits clamped by ``torch.clamp``; LoRA written with
  ``parametrize`` on frozen weights; ``F.interpolate(antialias=True)``;
* losses: cross entropy of 4-D segmentation logits (``loss="cross_entropy"`` and as a callable), ``nll_loss`` with
  ``ignore_index`` over the same number of pixels per image, and over different numbers with each image logged with
  its share of the counted pixels (the fix its refusal names), a per-image soft Dice loss, ``label_smoothing``,
  ``multi_margin_loss(p=2, margin=0.5, weight=...)``, ``multilabel_margin_loss``, ``TripletMarginWithDistanceLoss``
  with a cosine distance and ``swap=True``;
* against the reference that replays the recorded buffers: ``LazyConv2d`` and ``LazyBatchNorm2d``, the hook-based
  ``torch.nn.utils.spectral_norm``, ``InstanceNorm1d(affine=True, track_running_stats=True)``.

The loud cases are in tests/test_stranger_round8_more.py; the table is tests/stranger_round8_table.py.
"""

from __future__ import annotations

import pytest
from _round8_cases import CASES
from _round8_kit import assert_buffers_exact, assert_exact

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = [
    "lazy_linear_after_a_dry_run", "prune_l1_unstructured_relu", "dropout3d_conv3d_elu",
    "avgpool_ceil_upsample_divisor_selu_hardtanh_softsign", "mha_per_head_weights_used_downstream",
    "transformer_encoder_layer_gelu_padding_mask", "transformer_decoder_layer_prenorm_memory_mask",
    "realnvp_flow_slogdet_nll_sgd_0_05", "mixture_density_network", "neural_ode_rk4", "fno_spectral_conv_rfft",
    "linalg_solve_layer", "clamped_logits", "lora_by_parametrize_frozen_base", "interpolate_antialias",
    # losses
    "segmentation_ce_string_4d", "segmentation_ce_callable_4d", "segmentation_nll_ignore_index",
    "segmentation_nll_ignore_index_counted_pixels_logged", "dice_per_image", "label_smoothing",
    "multi_margin_p2_weighted", "multilabel_margin", "triplet_with_cosine_distance_swap",
]


@pytest.mark.parametrize("case", EXACT)
def test_exact(case):
    assert_exact(CASES[case]())


@pytest.mark.parametrize("case", ["lazy_conv_batchnorm_after_a_dry_run", "spectral_norm_hook_based",
                                  "instancenorm1d_running_stats"])
def test_layers_with_buffers_are_exact_against_the_recorded_buffers(case):
    assert_buffers_exact(CASES[case]())
