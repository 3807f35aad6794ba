"""Hugging Face text models no other test contains, built from tiny configs, recorded through the plain loop.

* OPT (a ReLU feed-forward, learned positions offset by 2): one layer exact, the reference locating the ReLU
  kinks itself. On ReLU paths the adaptive rule spends evaluations per kink; where it stops at its cap the warning
  names the model's ReLU modules as the cause (before, it pointed at float32 casts the model does not have):
  ``python benchmarks/bench_opt_relu.py`` measures the rules on two layers (docs/guide_own_model.md).
* XLNet (relative positional attention, two-stream machinery, a sequence summary head): exact. Built with
  ``AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float64)`` its raw ``nn.Parameter`` tensors
  (``rel_attn.q``, ``mask_emb``, ...) stay float32 and its own forward fails (``einsum``: Float and Double) before
  explaind sees it; ``model.to(torch.float64)`` converts them.
* BigBird with ``attention_type="block_sparse"``: its training forwards draw the random blocks with
  ``np.random`` (captured with ``capture_random=True``), and its forward assembles the attention probabilities
  by writing into a ``torch.zeros`` tensor in place, which ``vmap`` cannot run: explaining is refused naming the
  cause and ``attention_type='original_full'`` (before, torch's ``vmap`` error came through).

"Exact": replica <= 1e-6 relative to the trained model in evaluation mode, residual share <= 1e-9,
``keep=("train",)`` <= 1e-9 relative to the slow float64 loop reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _hf_stranger_kit import DT, VOCAB, N, assert_exact, ids, per_sample_ce, train
from _hf_testkit import MappingReference, loop_token_loss

import explaind
import explaind.kernel.adaptive as adaptive
from explaind.exceptions import ExplaindWarning, UnsupportedModelError

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]


def _next_token(out, t):
    return F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), t[:, 1:].reshape(-1))


def _trained_opt(ffn_dim: int = 32, steps: int = 3):
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=ffn_dim,
                                 num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16,
                                 dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                                 pad_token_id=1)
    tokens = ids(N + 2, 1)
    model, traj = train(transformers.OPTForCausalLM(cfg), {"input_ids": tokens[:N]}, tokens[:N], "causal_lm",
                        _next_token, steps=steps)
    return model, traj, {"input_ids": tokens[N:]}


def test_opt_with_a_relu_feed_forward_is_exact():
    """8 ReLUs per position, 2 steps: the reference's kinks cost it 16 s of CPU (32 ReLUs, 3 steps: minutes)."""
    model, traj, X_test = _trained_opt(ffn_dim=8, steps=2)
    assert isinstance(model.model.decoder.layers[0].activation_fn, torch.nn.ReLU)
    with torch.no_grad():
        truth = model(**X_test).logits
    target = [5 * VOCAB + 3, 6 * VOCAB + 7]
    ref = MappingReference(traj, X_test, loss_fn=lambda out, t: loop_token_loss(out, t, shift=True), target=target,
                           panels=2)
    assert int(ref.n_nodes.max()) > 2 * 8  # the path crosses kinks: more pieces than one (2 panels of 8 nodes)
    assert_exact(traj, X_test, truth, ref, target)


def test_opt_at_the_evaluation_cap_warns_naming_its_relu_modules_not_float32_casts(monkeypatch):
    _, traj, X_test = _trained_opt()
    monkeypatch.setattr(adaptive, "MAX_EVALS", 300)  # the cap two layers reach at 4096, reached by one here
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = explaind.KernelReplica(device="cpu").fit(traj).fidelity_report(X_test)
    capped = [str(w.message) for w in seen if issubclass(w.category, ExplaindWarning)]
    assert len(capped) == 1 and "stopped at the cap of about 300 evaluations" in capped[0]
    assert "kinks of 1 module(s) (ReLU at model.decoder.layers.0.activation_fn)" in capped[0]
    assert "float32" not in capped[0]
    assert float(report["relative_quadrature_error"].max()) > 1e-7  # what is left is reported, not hidden


def test_xlnet_with_relative_positional_attention_is_exact():
    torch.manual_seed(0)
    cfg = transformers.XLNetConfig(vocab_size=VOCAB, d_model=16, n_layer=1, n_head=2, d_inner=32, dropout=0.0,
                                   summary_last_dropout=0.0, num_labels=3)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float32, DT}  # what from_config leaves
    tokens = ids(N + 2, 2)
    y = torch.randint(0, 3, (N + 2,), generator=torch.Generator().manual_seed(4))
    model, traj = train(model, {"input_ids": tokens[:N]}, y[:N], "cross_entropy",
                        lambda out, t: F.cross_entropy(out.logits, t))
    X_test = {"input_ids": tokens[N:]}
    with torch.no_grad():
        truth = model(**X_test).logits
    target = [0, 2]
    assert_exact(traj, X_test, truth, MappingReference(traj, X_test, loss_fn=per_sample_ce, target=target, panels=4),
                 target)


def test_bigbird_block_sparse_attention_is_refused_when_explaining_naming_original_full():
    torch.manual_seed(0)
    cfg = transformers.BigBirdConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64, attention_type="block_sparse",
                                     block_size=2, num_random_blocks=2, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=3)
    tokens = ids(N + 2, 2, length=32)  # long enough for the sparse pattern (shorter falls back to full attention)
    y = torch.randint(0, 3, (N + 2,), generator=torch.Generator().manual_seed(4))
    _, traj = train(transformers.BigBirdForSequenceClassification(cfg), {"input_ids": tokens[:N]}, y[:N],
                    "cross_entropy", lambda out, t: F.cross_entropy(out.logits, t), capture_random=True)
    assert traj.micro_batches(0)[0].state.numpy is not None  # the random blocks drawn with np.random
    with pytest.raises(UnsupportedModelError, match=r"in place.*vmap.*attention_type='original_full'"):
        explaind.KernelReplica(device="cpu").fit(traj).predict({"input_ids": tokens[N:]})
