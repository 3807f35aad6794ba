"""Hugging Face architectures in a plain loop, round 15, continued: Pegasus-X (block-local attention with global
tokens), DeepSeek-V2 (multi-head latent attention, both experts routed) and JetMoE's refusal (cases in
tests/_zoo15_cases.py, checks of tests/_zoo9_kit.py)."""

from __future__ import annotations

import pytest
from _zoo9_kit import assert_exact, assert_float32_exact, run
from _zoo15_cases import CASES

from explaind.exceptions import UnsupportedModelError

pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]


def test_pegasus_x_local_blocks_with_global_tokens_is_exact():
    assert_exact(run(CASES["pegasus_x"]))


def test_deepseek_v2_latent_attention_with_both_experts_routed_is_exact_to_its_rounding():
    """Low-rank queries and keys-values with a rotary part (multi-head latent attention), a shared expert beside
    two routed ones, every token routed to both; its RMS norms and router compute in float32."""
    assert_float32_exact(run(CASES["deepseek_v2_mla"]))


def test_jetmoe_refusal_names_the_line_that_reads_the_expert_sizes_as_a_list():
    """JetMoE's top-k gating counts the tokens of each expert and reads the counts as a Python list
    (``expert_size.tolist()``) to split the batch, which vmap cannot trace: refused, naming that line."""
    with pytest.raises(UnsupportedModelError, match=r"modeling_jetmoe\.py:\d+"):
        run(CASES["jetmoe"], reference=False)
