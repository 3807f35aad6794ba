"""Hugging Face models passed directly (built from configs, no downloads): no wrapper in the user's script.

A GPT-2 language model with its default dropout and SDPA attention, trained with AdamW on a next-token loss
callable, decomposes exactly against the slow replaying loop reference (tests/replay_reference.py); a GPT-2
sequence classifier with an attention mask is exact with eager attention, and with the default SDPA attention
when the mask is given in 4-D; a 2-D mask under SDPA (whose preparation branches on the mask's values) is refused
with an error naming that fix.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_compare import as_numpy, reference_terms
from reference import rel_err
from replay_reference import ReplayReference

import explaind
from explaind.exceptions import ExplaindWarning, UnsupportedModelError
from explaind.integrations import four_d_attention_mask

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]

DT = torch.float64
VOCAB, LENGTH, N_TRAIN = 11, 6, 12
QUAD = {"quadrature": "adaptive", "tol": 1e-11}


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; every sequence has the same length, so it is the mean of per-sequence means."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _config(**kw):
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
                                   eos_token_id=0, **kw)


def _train(model, X, y, loss, forward, batch: int = 4, steps: int = 3):
    model = model.to(DT)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y))
    gen = torch.Generator().manual_seed(0)
    model.train()
    with rec:
        for _ in range(steps):
            idx = torch.randperm(N_TRAIN, generator=gen)[:batch]
            opt.zero_grad()
            out = forward(model, {k: v[idx] for k, v in X.items()} if isinstance(X, dict) else X[idx])
            (loss(out, y[idx]) if callable(loss) else F.cross_entropy(out, y[idx])).backward()
            rec.log_batch(idx)
            opt.step()
    return model.eval(), rec.trajectory


def record_gpt2_lm():
    """GPT-2 LM with its default dropout (0.1) and SDPA attention, AdamW on the next-token loss, passed directly."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_config())
    assert model.config._attn_implementation == "sdpa" and model.config.attn_pdrop > 0
    ids = torch.randint(0, VOCAB, (N_TRAIN + 2, LENGTH), generator=torch.Generator().manual_seed(1))
    model, traj = _train(model, ids[:N_TRAIN], ids[:N_TRAIN], next_token_loss, lambda m, x: m(input_ids=x).logits)
    return model, traj, ids[N_TRAIN:]


def gpt2_lm_figures(model, traj, X_test) -> dict[str, float]:
    """One (position, token) logit per test sequence: residual share (no warning), ``keep=("train",)`` against
    ``ReplayReference`` (the masks replayed), the reference's own path error, and the replica against ``model``."""
    target = [5 * VOCAB + 3, 2 * VOCAB + 7]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        est = explaind.InfluenceEstimator(keep=("train",), target=target, device="cpu", **QUAD)
        att = est.fit(traj).transform(X_test)
    ref = ReplayReference(traj, X_test, target=target, panels=4)
    with torch.no_grad():
        trained = model(input_ids=X_test).logits.reshape(len(X_test), -1)
    replica = explaind.KernelReplica(device="cpu").fit(traj).predict(X_test)
    return {"replica": rel_err(replica, as_numpy(trained)), "residual_share": att.meta["residual_share"],
            "train": rel_err(as_numpy(att.values), reference_terms(ref, att)["values"]),
            "ref_quad": float(ref.quad_error.abs().max())}


def test_gpt2_lm_with_dropout_and_sdpa_attention_is_exact():
    model, traj, X_test = record_gpt2_lm()
    assert traj.manifest.random_capture and float(np.nanmax(traj.gradient_check())) <= 1e-12
    got = gpt2_lm_figures(model, traj, X_test)
    assert got["residual_share"] <= 1e-9 and got["ref_quad"] <= 1e-12
    assert got["train"] <= 1e-9 and got["replica"] <= 1e-6


def _classifier_run(attention: str, four_d: bool = False):
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(_config(num_labels=3, pad_token_id=0))
    model.config._attn_implementation = attention
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (N_TRAIN + 3, LENGTH), generator=gen)
    mask = torch.ones_like(ids)
    X = {"input_ids": ids, "attention_mask": four_d_attention_mask(mask, causal=True) if four_d else mask}
    y = torch.randint(0, 3, (N_TRAIN + 3,), generator=gen)
    train = {k: v[:N_TRAIN] for k, v in X.items()}
    model, traj = _train(model, train, y[:N_TRAIN], "cross_entropy", lambda m, x: m(**x).logits)
    return model, traj, {k: v[N_TRAIN:] for k, v in X.items()}


@pytest.mark.parametrize(("attention", "four_d"), [("eager", False), ("sdpa", True)])
def test_gpt2_classifier_with_an_attention_mask_is_exact(attention, four_d):
    """Eager attention takes the 2-D mask; SDPA takes it as the 4-D boolean mask (no value-dependent shortcut)."""
    model, traj, X_test = _classifier_run(attention, four_d)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X_test)
    assert att.meta["residual_share"] <= 1e-9 and att.completeness_error() <= 1e-10
    with torch.no_grad():
        trained = model(**X_test).logits
    assert rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X_test), as_numpy(trained)) <= 1e-6


def test_sdpa_with_a_2d_mask_is_refused_with_the_fix():
    _, traj, X_test = _classifier_run("sdpa")  # recording works; the mask shortcut branches on the mask's values
    fix = r"branches on the values of its inputs.*four_d_attention_mask"
    with pytest.raises(UnsupportedModelError, match=fix):
        explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X_test)
    with pytest.raises(UnsupportedModelError, match=fix):
        explaind.KernelReplica(device="cpu").fit(traj).predict(X_test)
