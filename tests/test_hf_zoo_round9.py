"""Hugging Face causal LMs no other test builds, in a plain loop: exact, or loud naming the cause and the fix.

Tiny configs (hidden 16, one or two layers, vocabulary 32, float64, dropout 0.1 wherever the config has one),
passed directly, trained by tests/_zoo9_kit.py's loop (3 AdamW steps of 4 right-padded sequences on the next-token
loss with ``ignore_index``, labels -100 at the padding; one GPT-J run with SGD, momentum 0.9, at learning rate
1.0) and checked on 2 held-out sequences: replica against the trained model in evaluation mode, residual share,
and ``keep=("train",)`` of the per-sequence loss against the slow float64 loop reference that replays the
recorded dropout masks. ``python tests/hf_zoo_round9_table.py`` prints the
figures of every case.

What this round found and fixed:

* Hugging Face attention passes the config's ``attention_dropout`` to ``F.scaled_dot_product_attention(dropout_p=)``
  or ``F.dropout`` (Cohere, OLMo, Starcoder2, Gemma2, Mixtral, Qwen2-MoE; BART-like Pegasus and MBart for all their
  dropout), so no ``nn.Dropout`` module shows that the forward draws, ``capture_random="auto"`` captured nothing, and
  the gradient check's hint blamed "a branch on self.training" (its two training forwards ran under one seed, so
  they agreed). The recorder now warns at the first training forward that moves torch's generator without a
  capture, naming ``capture_random=True``; the check's hint says the forward draws.
* Bloom's GELU is an old-style ``torch.autograd.Function``: the refusal now names ``GeLUFunction.apply`` and the
  module (``transformer.h.0.mlp.gelu_impl``), and the fix it names (the same function in torch operations) is exact.
* Mixture-of-experts blocks with ``experts_implementation="eager"`` were refused with the message about 2-D
  attention masks; the refusal now names the blocks, their ``top_k`` and the fix (``"batched_mm"``, and routing to
  every expert for a continuous forward).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from _zoo9_cases import CAUSAL
from _zoo9_kit import assert_exact, assert_float32_exact, record, run
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError, UnsupportedModelError

pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]

EXACT = ["gptj", "gpt_bigcode_mqa", "codegen", "bloom_torch_gelu", "mpt", "stablelm", "starcoder2"]
#: models that compute part of their forward in float32 (RMS or layer norms, routers, state-space scans)
FLOAT32 = ["phi3", "cohere", "olmo", "gemma2_softcap", "mamba", "mamba2", "mixtral_batched_dense"]


@pytest.mark.parametrize("name", EXACT)
def test_causal_lm_is_exact(name):
    assert_exact(run(CAUSAL[name]))


def test_sgd_momentum_at_an_untuned_learning_rate_is_exact():
    """GPT-J, SGD with momentum 0.9 at learning rate 1.0."""
    assert_exact(run(CAUSAL["gptj_sgd_untuned"]))


def test_persimmon_with_qk_layernorm_is_exact():
    """Persimmon (layer norms on queries and keys, partial rotary): train scores 2.1e-9 from the reference
    (tests/hf_zoo_round9_table.py)."""
    assert_exact(run(CAUSAL["persimmon"]), train_tol=1e-8)


@pytest.mark.parametrize("name", FLOAT32)
def test_causal_lm_with_float32_inside_is_exact_to_that_rounding(name):
    assert_float32_exact(run(CAUSAL[name]))


# ---------------------------------------------------------------- dropout drawn in forward itself
def _auto(name: str, **recorder):
    return dataclasses.replace(CAUSAL[name], recorder={"capture_random": "auto", **recorder})


def test_attention_dropout_drawn_in_forward_warns_under_auto_naming_capture_random():
    """Cohere passes ``attention_dropout`` to SDPA: no module shows it. Before: nothing captured, no word, and with
    the gradient check off the run recorded other gradients than the loop's."""
    with pytest.warns(ExplaindWarning, match=r"\(CohereForCausalLM\) drew random numbers from torch's generator.*"
                                             r"Fix: TrajectoryRecorder\(\.\.\., capture_random=True\)"):
        _, traj, _, _ = record(_auto("cohere"), check=False)
    assert not traj.manifest.random_capture


def test_the_gradient_check_names_the_draws_not_a_branch_on_self_training():
    """Before: "a branch on self.training, such as probabilities returned only in evaluation mode"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExplaindWarning)
        with pytest.raises(TrajectoryError, match=r"two training forwards under different seeds differ.*"
                                                  r"capture_random=True") as err:
            record(_auto("olmo"))
    assert "branch on self.training" not in str(err.value)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.3, self.training))


def _functional_run(capture, check: bool = False):
    torch.manual_seed(0)
    model = FunctionalDropout().double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), capture_random=capture,
                                      check_gradients=check)
    with rec:
        for s in range(2):
            idx = torch.arange(4 * s, 4 * s + 4)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory


def test_f_dropout_in_a_module_of_ones_own_warns_once_and_not_when_captured():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _functional_run("auto")
    drew = [w for w in caught if "drew random numbers" in str(w.message)]
    assert len(drew) == 1 and "(FunctionalDropout)" in str(drew[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        traj = _functional_run(True, check=True)
    assert traj.manifest.random_capture and max(traj.gradient_check()) <= 1e-12


# ---------------------------------------------------------------- refusals that name the cause and the fix
def test_bloom_refusal_names_the_old_style_function_and_its_module():
    """Before: the refusal named no Function and no module. The fix it names is ``bloom_torch_gelu`` (exact above)."""
    model, traj, X_test, _ = record(CAUSAL["bloom_alibi"])
    with pytest.raises(UnsupportedModelError, match=r"Found: GeLUFunction\.apply in transformer\.h\.0\.mlp\.gelu_impl "
                                                    r"\(BloomGelu\)\. In a model you did not write, replace"):
        explaind.KernelReplica(device="cpu").fit(traj).predict(X_test)


@pytest.mark.parametrize(("name", "block"), [("mixtral_top2", "MixtralSparseMoeBlock"),
                                             ("qwen2_moe_top2", "Qwen2MoeSparseMoeBlock")])
def test_eager_mixture_of_experts_refusal_names_the_blocks_and_the_fix(name, block):
    """Before: the refusal told to pass a 4-D attention mask."""
    _, traj, X_test, _ = record(CAUSAL[name])
    with pytest.raises(UnsupportedModelError, match=rf"model\.layers\.0\.mlp \({block}, top_k=2, "
                                                    rf"experts_implementation='eager'\).*"
                                                    rf"experts_implementation='batched_mm'.*num_experts_per_tok") as e:
        explaind.KernelReplica(device="cpu").fit(traj).predict(X_test)
    assert "four_d_attention_mask" not in str(e.value)
