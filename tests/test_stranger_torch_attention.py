"""torch's own attention modules, trained as a new user would: exact, or a warning that names the cause.

``nn.TransformerEncoder`` (post- and pre-norm, a key padding mask, nested tensors on and off),
``nn.TransformerDecoder`` with a causal mask and ``nn.MultiheadAttention`` (``need_weights``, ``kdim``/``vdim``,
``add_bias_kv``), all with dropout, in float64 plain loops (tests/hard_models_kit.py: the replica against the
trained model in evaluation mode, the residual share, ``keep=("train",)`` scores against the slow loop reference
that replays the recorded masks). torch's inference fast path (``torch._transformer_encoder_layer_fwd``, nested
tensors) runs only under ``torch.no_grad()`` in evaluation mode: explaind's passes never take it (counted here),
and where the model's ``no_grad`` outputs differ from its differentiable ones, ``fidelity_report`` says so.
"""

from __future__ import annotations

import pytest
import torch
from hard_models_kit import data, run_exact, seeded, train
from reference import rel_err
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings(
    "ignore:The PyTorch API of nested tensors:UserWarning")]

X, Y = data(14, (4, 3), 1)


class Encoder(nn.Module):
    """``Linear(3, 8)``, a one-layer ``nn.TransformerEncoder`` (2 heads, GELU, dropout 0.1), a head on one position.

    ``mask``: the last position of every sequence is padding (``src_key_padding_mask``); ``pool``: ``"first"``
    reads position 0, ``"mean"`` averages over all positions, padding included.
    """

    def __init__(self, *, norm_first: bool = False, nested: bool = True, mask: bool = False, pool: str = "first"):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True, norm_first=norm_first,
                                           activation="gelu")
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=nested)
        self.head = nn.Linear(8, 3)
        self.mask, self.pool = mask, pool

    def forward(self, x):
        pad = None
        if self.mask:
            pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            pad[:, -1] = True
        h = self.enc(self.emb(x), src_key_padding_mask=pad)
        return self.head(h[:, 0] if self.pool == "first" else h.mean(1))


class Decoder(nn.Module):
    """A one-layer ``nn.TransformerDecoder`` attending causally to itself and to its input; the last position."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.1, batch_first=True,
                                                                    activation="gelu"), 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=h.dtype)
        return self.head(self.dec(h, h, tgt_mask=causal, tgt_is_causal=True)[:, -1])


class Attention(nn.Module):
    """``nn.MultiheadAttention`` with dropout 0.2 on the attention weights, no ``nn.Dropout`` module anywhere.

    ``kv``: keys and values of their own widths (``kdim=5``, ``vdim=6``) with ``add_bias_kv``; ``weights``: the
    averaged attention weights (``need_weights=True``) feed the head too.
    """

    def __init__(self, *, kv: bool = False, weights: bool = False):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.att = nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=True, add_bias_kv=kv,
                                         kdim=5 if kv else None, vdim=6 if kv else None)
        self.k, self.v = (nn.Linear(3, 5), nn.Linear(3, 6)) if kv else (None, None)
        self.head = nn.Linear(8, 3)
        self.weights = weights

    def forward(self, x):
        q = self.emb(x)
        k, v = (self.k(x), self.v(x)) if self.k is not None else (q, q)
        out, w = self.att(q, k, v, need_weights=self.weights)
        h = out.mean(1)
        if self.weights:
            h = h + w.sum(1)[:, :1]
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("kw, panels", [(dict(mask=True), 4), (dict(norm_first=True, nested=False), 8)],
                         ids=["post-norm-padding-mask-nested", "pre-norm"])
def test_transformer_encoder_with_dropout_is_exact(kw, panels):
    """``panels``: the reference's Gauss-Legendre panels, enough for its own endpoint check (<= 1e-12)."""
    run_exact(lambda: Encoder(**kw), "sgd", X, Y, panels=panels)


def test_transformer_decoder_with_a_causal_mask_is_exact():
    run_exact(Decoder, "sgd", X, Y)


@pytest.mark.parametrize("kw", [{}, dict(weights=True), dict(kv=True, weights=True)],
                         ids=["plain", "need_weights", "kdim-vdim-bias_kv"])
def test_multihead_attention_dropout_is_captured_by_default_and_exact(kw):
    """Its dropout is drawn inside ``F.multi_head_attention_forward``: ``capture_random="auto"`` now sees it
    (before: the gradient check refused step 0, naming capture_random=True)."""
    traj, _ = train(seeded(lambda: Attention(**kw)), "sgd", X[:12], Y[:12], steps=1)
    assert traj.manifest.coupled == ["att"]
    run_exact(lambda: Attention(**kw), "sgd", X, Y)


def test_explaind_never_takes_the_encoders_inference_fast_path(monkeypatch):
    """Recording, the replica and the scores run the differentiable path; the user's no_grad evaluation does not."""
    calls = {"layer": 0, "nested": 0}
    layer_fwd, nested = torch._transformer_encoder_layer_fwd, torch._nested_tensor_from_mask

    def count(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", count("layer", layer_fwd))
    monkeypatch.setattr(torch, "_nested_tensor_from_mask", count("nested", nested))
    model = seeded(lambda: Encoder(mask=True))
    traj, _ = train(model, "sgd", X[:12], Y[:12], steps=2)
    explaind.KernelReplica(device="cpu").fit(traj).predict(X[12:])
    explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X[12:])
    assert calls == {"layer": 0, "nested": 0}
    model.eval()
    with torch.no_grad():
        model(X[12:])
    assert calls["layer"] > 0 and calls["nested"] > 0  # the counters do see the fast path


def test_nested_tensor_outputs_read_at_padding_are_named_by_fidelity_report_and_exact_without_nested_tensors():
    """Mean-pooling over padded positions: under ``no_grad`` the nested-tensor path returns 0 there.

    The replica explains the differentiable outputs (the model with gradients enabled, in evaluation mode), so
    against the user's ``no_grad`` outputs it is off by about 0.25; ``fidelity_report(model=...)`` names the fast
    path and the fix, which is exact.
    """
    model = seeded(lambda: Encoder(mask=True, pool="mean"))
    traj, _ = train(model, "sgd", X[:12], Y[:12], steps=2)
    replica = explaind.KernelReplica(device="cpu").fit(traj)
    with pytest.warns(ExplaindWarning, match=r"torch.no_grad\(\) differ.*enable_nested_tensor=False"):
        report = replica.fidelity_report(X[12:], model=model)
    assert report["model_max_rel_error"] > 1e-2
    model.eval()
    with torch.enable_grad():
        differentiable = model(X[12:]).detach()
    assert rel_err(replica.predict(X[12:]), differentiable.numpy()) <= 1e-6
    run_exact(lambda: Encoder(mask=True, pool="mean", nested=False), "sgd", X, Y, panels=8)
