"""Hugging Face architectures in a plain loop, round 11, part 2: architectures not covered before.

Tiny configs (hidden 16, one layer, two for Jamba, vocabulary 32, float64, dropout 0.1 wherever the config has
one), passed directly, trained by tests/_zoo9_kit.py's loop (3 AdamW steps of 4 samples at 0.02) and checked on 2
held-out inputs: replica against the trained model in evaluation mode, residual share, and ``keep=("train",)``
against the slow float64 loop reference that replays the recorded dropout masks (cases: tests/_zoo11_cases.py;
figures: ``python tests/hf_zoo_round11_table.py``).

* Exact as built: ModernBERT, FNet, XLM-RoBERTa-XL, Data2VecAudio, SEW, UniSpeech, WavLM.
* Exact to the model's own float32 rounding (RMS norms or the Mamba slow path convert to float32; explaind finds
  the conversions): Granite (with its multipliers), Qwen3, Jamba (Mamba and attention layers, one expert).
* Loud: Nemotron's squared-ReLU feed forward makes kink-dense paths (the quadrature warning names
  ``ReLUSquaredActivation``); LUKE and MarkupLM call Hugging Face's padding check (refusal as round 10's);
  RecurrentGemma applies a ``torch.autograd.Function`` without a ``jvp`` (refused, named); GraniteMoE and OLMoE
  route each token to its top 2 of 4 experts (``experts_implementation="batched_mm"``), a jump along the path the
  estimators warn about; GLPN's depth output is refused naming ``predicted_depth``, and through that wrapper its
  scale-invariant loss (no sum of per-sample terms) is refused at step 0; ProphetNet recorded with the token cross
  entropy of its ``logits`` is refused by the gradient check (its own loss covers both prediction streams).
* Bamba (Mamba-2 and attention) is exact to its float32 rounding.
"""

from __future__ import annotations

import pytest
from _zoo9_kit import assert_exact, assert_float32_exact, record, run
from _zoo11_cases import CASES

from explaind.exceptions import TrajectoryError, UnsupportedModelError

pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]


@pytest.mark.parametrize("name", ["modernbert", "xlm_roberta_xl", "data2vec_audio", "sew", "unispeech", "wavlm"])
def test_model_as_built_is_exact(name):
    assert_exact(run(CASES[name]))


def test_fnet_is_exact():
    """FNet mixes tokens with ``torch.fft.fftn``; the reference with 16 Gauss-Legendre panels."""
    assert_exact(run(CASES["fnet"]))


@pytest.mark.parametrize("name", ["granite", "qwen3", "jamba"])
def test_model_with_float32_inside_is_exact_to_that_rounding(name):
    assert_float32_exact(run(CASES[name]))


def test_nemotron_squared_relu_is_loud_at_its_kinks():
    got = run(CASES["nemotron"], reference=False)
    assert got["replica"] <= 1e-6, got
    assert any("ReLUSquaredActivation" in w for w in got["warnings"]), got["warnings"]


@pytest.mark.parametrize(("name", "owner"), [("luke", "LukeModel"), ("markuplm", "MarkupLMModel")])
def test_padding_check_is_refused_naming_the_check(name, owner):
    with pytest.raises(UnsupportedModelError, match=rf"the forward of {owner} calls Hugging Face's "
                                                    rf"warn_if_padding_and_no_attention_mask"):
        run(CASES[name], reference=False)


def test_recurrent_gemma_function_without_jvp_is_refused_naming_it():
    with pytest.raises(UnsupportedModelError, match=r"custom torch\.autograd\.Function without a jvp"):
        run(CASES["recurrent_gemma"], reference=False)


@pytest.mark.parametrize("name", ["granite_moe_top2", "olmoe_top2"])
def test_top2_routing_is_loud_at_its_jumps(name):
    """Top-2 of 4 experts per token: the routes switch along the steps, the replica is off by a few percent and
    the estimators warn about calls whose output can jump."""
    got = run(CASES[name], reference=False)
    assert got["replica"] > 1e-3 and got["share"] <= 1e-9, got
    assert any("can jump" in w and "topk" in w for w in got["warnings"]), got["warnings"]


def test_glpn_depth_output_is_refused_naming_predicted_depth():
    with pytest.raises(UnsupportedModelError, match=r"'predicted_depth': \(4, 32, 32\).*"
                                                    r"model\(\*\*inputs\)\.predicted_depth"):
        record(CASES["glpn"])


def test_glpn_scale_invariant_loss_is_refused_at_step_0_naming_the_unsplit_route():
    """Through the wrapper the refusal names, GLPN's own loss, ``sqrt(mean(d^2) - 0.5 mean(d)^2)`` over the batch's
    pixels, is no weighted sum of per-sample terms: the recorder refuses step 0 and names ``split=False``."""
    with pytest.raises(TrajectoryError, match=r"Step 0: Loss 'custom:_silog'.*split=False"):
        record(CASES["glpn_depth_silog"])


def test_bamba_with_float32_inside_is_exact_to_that_rounding():
    """Mamba-2 and attention layers (one each)."""
    assert_float32_exact(run(CASES["bamba"]))


def test_prophetnet_own_loss_is_not_the_token_cross_entropy_and_the_check_says_so():
    """ProphetNet's own loss covers the logits of all its prediction streams (``ngram=2``), not only the returned
    ``logits``; recorded as the token cross entropy of those, the gradient check refuses step 0."""
    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match the gradient "
                                              r"of the logged batch under loss 'token_cross_entropy'"):
        record(CASES["prophetnet"])
