"""Hugging Face architectures in a plain loop, round 13, part 1: causal LMs people fine-tune today and that compute
unusually: Qwen3-Next (Gated DeltaNet linear attention beside full attention), Qwen3-MoE (all 4 experts routed, and
top-2 of 4), Llama 4's text model (chunked attention, a layer without RoPE, weightless QK norm), GPT-OSS (attention
sinks, sliding and full layers, clamped SwiGLU experts), Apertus (xIELU activation), Falcon-H1 (Mamba-2 and
attention in parallel) and Zamba2 (Mamba-2 layers and a shared attention block with LoRA adapters).

The loop is tests/_zoo9_kit.py's (3 AdamW steps of 4 samples at 0.02, float64, dropout 0.1 wherever the config has
one, recorded with ``capture_random=True``); the cases are tests/_zoo13_cases.py's. ``python
tests/hf_zoo_round13_table.py`` prints the figures of every case.

What this round found: the RMS norms, routers and state-space scans of these models compute in float32 whatever
the model's dtype; the conversions are found (``meta["promoted_casts"]``), the replica is within 1e-6 of the trained
model and the train scores within 1e-6 of the slow float64 loop reference (``assert_float32_exact``). Apertus'
xIELU activation jumps by about 8e-7 at 0 (its negative branch ends at ``expm1(eps) alpha_n``, ``eps = -1e-6``): the
influence estimator warns about a call that can jump, naming it. (Qwen3-MoE with top-2 of 4 experts switches
routes along the steps and is warned about, as Mixtral's: in the table only, for its time.)
"""

from __future__ import annotations

import pytest
import torch
from _zoo9_kit import assert_float32_exact, run
from _zoo13_cases import CASES

pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]

FLOAT32_PARTS = ["qwen3_moe_all_experts", "llama4_text_dense", "gpt_oss_sinks",
                 "falcon_h1_hybrid", "zamba2_hybrid"]


@pytest.mark.parametrize("name", FLOAT32_PARTS)
def test_causal_lms_with_float32_parts_are_exact_to_their_rounding(name):
    assert_float32_exact(run(CASES[name]))


def test_qwen3_next_gated_deltanet_is_exact_to_the_float32_rounding_of_its_scan():
    """The chunked gated delta rule converts its queries, keys, values, gates and ``beta`` to float32 (13 conversions
    found): the training gradients round there, and the residual share, 2.2e-7, is above
    ``assert_float32_exact``'s 1e-7 and well below the estimator's ``residual_tol`` (1e-3); replica and train
    scores hold as for the other float32 parts."""
    got = run(CASES["qwen3_next_gated_deltanet"])
    assert got["casts"] > 0 and got["ref_quad"] <= 1e-11 and got["check"] <= 1e-7, got
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-6 and got["train"] <= 1e-6 and not got["warnings"], got


def test_apertus_xielu_jumps_at_zero_and_the_estimator_is_loud_about_it():
    """xIELU is ``where(x > 0, ap x^2 + b x, (expm1(min(x, eps)) - x) an + b x)`` with ``eps = -1e-6``: its negative
    branch ends at ``expm1(eps) an`` (about -8e-7 here), not 0, so the activation jumps at 0. The replica holds
    (within 1e-6: the jumps are small), the influence estimator warns about a call that can jump (``Tensor.gt`` of
    ``XIELUActivation``) and keeps what it cannot integrate in ``quadrature_error``."""
    act = CASES["apertus_xielu"].build().double().model.layers[0].mlp.act_fn
    below, above = act(torch.tensor([-1e-12, 1e-12], dtype=torch.float64)).tolist()
    assert 5e-7 < above - below < 1e-6, (below, above)
    got = run(CASES["apertus_xielu"], reference=False)
    assert got["replica"] <= 1e-6 and got["check"] <= 1e-7, got
    assert any("can jump" in w and "XIELUActivation" in w and "Tensor.gt" in w for w in got["warnings"]), got
