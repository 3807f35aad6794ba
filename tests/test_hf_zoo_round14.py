"""Hugging Face architectures in a plain loop, round 14: causal LMs and encoder-decoders not covered before: OpenAI
GPT, GPT-Neo (global and local attention layers), MiniMax (lightning attention beside full attention, both experts
routed), Doge (dynamic mask attention), DBRX (experts without an implementation switch), mT5 and BigBird-Pegasus
(full attention).

tests/_zoo9_kit.py trains each tiny float64 model (dropout 0.1 wherever the config has it) for 3 AdamW steps in a
plain loop and checks the replica against the trained model in evaluation mode, the residual share and
``keep=("train",)`` against the slow float64 loop reference (cases in tests/_zoo14_cases.py). GPT-Neo, MiniMax,
Doge and mT5 compute parts of their forward in float32 whatever their dtype (attention, RMS norms, routers):
their training gradients round there (``assert_float32_exact``).
"""

from __future__ import annotations

import pytest
from _zoo9_kit import assert_exact, assert_float32_exact, run
from _zoo14_cases import CASES

from explaind.exceptions import UnsupportedModelError

pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]


@pytest.mark.parametrize("name", ["openai_gpt", "bigbird_pegasus"])
def test_models_are_exact(name):
    assert_exact(run(CASES[name]))


@pytest.mark.parametrize("name", ["gpt_neo_local", "minimax_lightning", "mt5"])
def test_models_with_float32_parts_are_exact_to_their_rounding(name):
    assert_float32_exact(run(CASES[name]))


def test_doge_keeps_the_top_scores_of_its_dynamic_mask_and_is_loud_about_it():
    """Doge's dynamic mask attention keeps, per query, the ``keep_window_size`` largest scores of its mask (a
    ``torch.topk`` on values that move with the parameters) when the sequence is longer: the kept keys switch along
    the paths, the replica is off by more than 1e-6 and the estimators warn about a call that can jump. With the
    window as long as the sequence nothing is dropped, and the run is exact to its float32 parts."""
    got = run(CASES["doge"], reference=False)
    assert got["replica"] > 1e-6 and any("can jump" in w and "topk" in w for w in got["warnings"]), got
    assert_float32_exact(run(CASES["doge_window_whole"]))


def test_dbrx_refusal_names_experts_without_a_switch_and_the_dense_experts_are_exact():
    """DBRX's ``DbrxExperts`` loop over the routed experts (``one_hot``, ``nonzero``) whatever the config says. The
    refusal named ``experts_implementation='batched_mm'`` as the fix, which DBRX does not have; it now says so and
    names the fix that applies: an experts forward that runs every expert on every token weighted by its routing
    weight (tests/_zoo14_cases.py's ``_dense_dbrx_experts``), exact with both experts routed."""
    with pytest.raises(UnsupportedModelError, match=r"DbrxFFN, top_k=2, experts_implementation=None\) have no such "
                                                    r"switch.*runs every expert on every token"):
        run(CASES["dbrx_all_experts"], reference=False)
    assert_exact(run(CASES["dbrx_dense_experts"]))
