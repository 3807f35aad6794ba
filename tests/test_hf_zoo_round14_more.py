"""Hugging Face architectures in a plain loop, round 14, part 2: vision, video, audio and text classifiers: PVT
(spatial-reduction attention), UniSpeech-SAT, TimeSformer (divided space-time attention on 2-frame videos), X-MOD
(a language adapter per row), the refusals of XLM, X-MOD and SEW-D, which now name the model's own line, and round
10's MobileNetV2 at a converging rate.

Set up as part 1 (tests/_zoo9_kit.py's loop, cases in tests/_zoo14_cases.py).
"""

from __future__ import annotations

import pytest
import torch
from _zoo9_kit import assert_exact, figures, logits_of, record, run
from _zoo14_cases import CASES, LEFT

from explaind.exceptions import UnsupportedModelError

pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]


@pytest.mark.parametrize("name", ["pvt_spatial_reduction", "unispeech_sat", "timesformer_divided"])
def test_vision_and_audio_classifiers_are_exact(name):
    assert_exact(run(CASES[name]))


def test_xmod_boolean_mask_routing_is_refused_naming_its_line_and_the_where_route_is_exact():
    """X-MOD picks each row's language adapter by indexing with a boolean mask (``hidden_states[lang_mask]``), which
    vmap cannot batch. Before, torch's RuntimeError came out as it was (no cause, no fix); it is now refused like
    ``.item()``, naming the model's line. The fix it names, the same function with tensor operations
    (``torch.where`` over every adapter's output, tests/_zoo14_cases.py's ``_where_adapters``), is exact."""
    with pytest.raises(UnsupportedModelError, match=r"branches on the values of its inputs.*torch\.where.*"
                                                    r"The call: lang_adapter, .*modeling_xmod\.py:\d+: "
                                                    r"lang_hidden_states = hidden_states\[lang_mask\]"):
        run(CASES["xmod_language_adapters"], reference=False)
    assert_exact(run(CASES["xmod_where_adapters"]))


def test_xlm_refusal_names_the_assert_that_reads_a_value():
    """XLM asserts ``lengths.max().item() <= slen`` in its forward whatever its inputs: the refusal names that
    line (before: only the generic causes)."""
    with pytest.raises(UnsupportedModelError, match=r"The call: forward, .*modeling_xlm\.py:\d+: "
                                                    r"assert lengths\.max\(\)\.item\(\) <= slen"):
        run(CASES["xlm"], reference=False)


def test_sew_d_refusal_names_its_softmax_function_without_a_jvp():
    """SEW-D's attention applies ``XSoftmax``, an ``autograd.Function`` without a ``jvp``: the refusal names the
    call (before: torch's legacy CrossMapLRN2d as the only example)."""
    with pytest.raises(UnsupportedModelError, match=r"without a jvp staticmethod.*The call: forward, "
                                                    r".*modeling_sew_d\.py:\d+: attention_probs = XSoftmax\.apply"):
        run(CASES["sew_d"], reference=False)


# ---------------------------------------------------------------- left from earlier rounds: MobileNetV2
def test_mobilenet_v2_at_a_converging_rate_is_exact():
    """Round 10's MobileNetV2 (warmed batch-norm statistics, GELU) diverged at AdamW 0.02: evaluation-mode logits
    up to 3.8e16 after 3 steps, and the replica ran to its cap (round 13). That was the rate: at 1e-4 the logits
    stay small, the replica holds and no warning is raised. (Its train scores against ``BufferReplayReference``,
    6.7e-13, take 395 s: the table's row.)"""
    model, traj, X, y = record(LEFT["mobilenet_v2_converging"])
    with torch.no_grad():
        assert float(logits_of(model(**X)).abs().max()) < 1.0
    got = figures(LEFT["mobilenet_v2_converging"], model, traj, X, y, reference=False)
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["check"] <= 1e-12 and not got["warnings"], got
