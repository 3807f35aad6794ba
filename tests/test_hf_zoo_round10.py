"""Hugging Face architectures of round 10 in a plain loop, part 1: text encoders whose forward calls Hugging Face's
padding check, encoder-decoders (LED with global attention), and models exact as built.

Tiny configs (hidden 16, one or two layers, vocabulary 32, float64, dropout 0.1 wherever the config has one),
passed directly, trained by tests/_zoo9_kit.py's loop (3 AdamW steps of 4 samples at 0.02) and checked on 2 held-out
inputs: replica against the trained model in evaluation mode, residual share, and ``keep=("train",)`` against the
slow float64 loop reference that replays the recorded dropout masks. ``python tests/hf_zoo_round10_table.py``
prints the figures of every case (set-up: tests/_zoo10_cases.py).

What this round found:

* SqueezeBERT, ConvBERT, RemBERT, Megatron-BERT, Nystromformer, I-BERT and LayoutLM call
  ``warn_if_padding_and_no_attention_mask`` when given no attention mask; it reads the input ids (an ``.item()``),
  which vmap cannot trace. The refusal blamed the attention-mask shortcut of a 2-D mask (none was passed); it now
  names the check, the model and the two fixes, both exact: ``pad_token_id=None`` in the config, or a 4-D mask.
* LED with a ``global_attention_mask`` is refused; the refusal said LED could not be explained "also without global
  attention", but LED with its local-window attention alone is exact (tests/test_hf_zoo_round9_more.py). It now
  names global attention as the cause and leaving the mask out as LED's fix.
"""

from __future__ import annotations

import pytest
from _zoo9_kit import assert_exact, record, run
from _zoo10_cases import CASES, OTHERS

import explaind
from explaind.exceptions import TrajectoryError, UnsupportedModelError

pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]


# ---------------------------------------------------------------- Hugging Face's padding check
PADDING_CHECK = [("squeezebert", "SqueezeBertModel"), ("convbert", "ConvBertModel"), ("rembert", "RemBertModel"),
                 ("megatron_bert", "MegatronBertModel"), ("nystromformer", "NystromformerModel"),
                 ("ibert", "IBertModel"), ("layoutlm", "LayoutLMModel")]


@pytest.mark.parametrize(("name", "owner"), PADDING_CHECK)
def test_padding_check_refusal_names_the_check_and_the_fixes(name, owner):
    """Before: "For Hugging Face models this is the attention-mask shortcut of a 2-D attention_mask" (none passed)."""
    _, traj, X_test, _ = record(CASES[name], check=False)
    with pytest.raises(UnsupportedModelError, match=rf"the forward of {owner} calls Hugging Face's "
                                                    rf"warn_if_padding_and_no_attention_mask.*pad_token_id=None") as e:
        explaind.KernelReplica(device="cpu").fit(traj).predict(X_test)
    assert "shortcut" not in str(e.value)


@pytest.mark.parametrize("name", ["squeezebert_no_pad", "convbert_no_pad", "rembert_no_pad", "megatron_bert_no_pad",
                                  "nystromformer_no_pad", "layoutlm_no_pad", "megatron_bert_mask_4d",
                                  "squeezebert_mask_4d"])
def test_padding_check_fixes_are_exact(name):
    assert_exact(run(CASES[name]))



# ---------------------------------------------------------------- LED's global attention, YOSO's kernel
def _refusal(name: str) -> str:
    _, traj, X_test, _ = record(CASES[name], check=False)
    with pytest.raises(UnsupportedModelError) as err:
        explaind.KernelReplica(device="cpu").fit(traj).predict(X_test)
    return str(err.value)


def test_led_with_global_attention_is_refused_naming_global_attention_and_the_fix():
    """Before: "Hugging Face Longformer (and LED) reads its global-attention indices as values in every forward
    (..., also without global attention)"."""
    text = _refusal("led_global")
    assert "LED with global attention" in text and "leave global_attention_mask out" in text, text
    assert "also without global attention" not in text


def test_yoso_refusal_names_its_old_style_function():
    """YOSO's attention (``use_expectation=True``) calls an old-style ``torch.autograd.Function``."""
    assert "custom torch.autograd.Function written in the old style" in _refusal("yoso")


EXACT = ["biogpt", "blenderbot", "blenderbot_small", "plbart", "perceiver", "esm", "ast"]


@pytest.mark.parametrize("name", EXACT)
def test_model_as_built_is_exact(name):
    assert_exact(run(CASES[name]))


# ---------------------------------------------------------------- distribution heads, a segmentation loss
@pytest.mark.parametrize("name", ["time_series_transformer", "informer"])
def test_forecasters_with_a_student_t_head_are_refused_naming_their_fields(name):
    """The output holds the Student-t head's 3 parameters in ``params`` and no logits; the refusal lists the fields
    and the wrapper that stacks them."""
    with pytest.raises(UnsupportedModelError, match=r"'params': \[\(4, 4\), \(4, 4\), \(4, 4\)\].*'loc'.*"
                                                    r"torch\.stack\(model\(\*\*inputs\)\.params, dim=-1\)"):
        record(OTHERS[name], check=False)


def test_segformer_segmentation_loss_over_counted_pixels_is_refused_naming_the_weights():
    """SegFormer's own segmentation loss averages over the batch's pixels not labelled 255, so a sample's share
    depends on the others' counts; the recorder refuses step 0 and names the weights that make it exact."""
    with pytest.raises(TrajectoryError, match=r"a mean over the counted positions of several per sample.*"
                                              r"weights = n / n\.sum\(\)"):
        record(OTHERS["segformer_segmentation"])


def test_vitmae_random_masking_is_refused_as_a_draw_in_evaluation_mode():
    """ViTMAE draws the patches it masks with torch.rand in every forward (evaluation mode too); trained on the
    reconstruction error of all patches and recorded with ``capture_random=True``, it is refused when explained,
    naming the draw in evaluation mode and the fix."""
    _, traj, X_test, _ = record(OTHERS["vitmae_random_mask"])
    with pytest.raises(UnsupportedModelError, match=r"draws random numbers in evaluation mode.*Fix: draw only in "
                                                    r"training mode"):
        explaind.KernelReplica(device="cpu").fit(traj).predict(X_test)
