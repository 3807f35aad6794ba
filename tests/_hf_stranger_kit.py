"""The plain loop and the exactness checks of the tests/test_stranger_hf_*.py files (tiny Hugging Face models).

``train`` is the loop of docs/guide_own_model.md: AdamW in float64, 3 steps of 4 random samples, the model called
as ``model(**inputs)`` and the loop's own loss on what it returns, ``rec.log_batch(idx)`` after ``backward()``.
``assert_exact`` checks the recorded run against the trained model in evaluation mode and against an independent
slow float64 loop reference (tests/reference.py, tests/_hf_testkit.py).
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
import torch.nn.functional as F
from _hf_testkit import MappingReference
from reference import rel_err

import explaind
from explaind.exceptions import ExplaindWarning

DT = torch.float64
VOCAB, LENGTH, N = 30, 8, 12


def ids(n: int, seed: int, length: int = LENGTH) -> torch.Tensor:
    """Token ids in ``1..VOCAB-1``, ``(n, length)``."""
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def padded(n: int, seed: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A padding mask ``(n, LENGTH)`` of lengths 3..LENGTH (right- or left-aligned) and a generator for more draws."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=gen)
    pos = torch.arange(LENGTH)[None, :]
    mask = pos >= (LENGTH - lengths)[:, None] if left else pos < lengths[:, None]
    return mask.long(), gen


def per_sample_ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample cross entropy, the reference's loss for classifiers."""
    return F.cross_entropy(out, t, reduction="none")


def rows(X: dict, idx) -> dict:
    """The rows ``idx`` of every tensor of the mapping ``X``; other entries (flags) as they are."""
    return {k: v[idx] if torch.is_tensor(v) else v for k, v in X.items()}


def train(model, X, y, loss, batch_loss, *, steps: int = 3, lr: float = 0.02, check: bool = True, **recorder):
    """Record ``steps`` AdamW steps of 4 random samples; ``batch_loss(model_output, targets)`` is the loop's loss.

    Returns the model in evaluation mode and the trajectory; with ``check`` every step's gradient check must pass
    at 1e-12.
    """
    model = model.to(DT).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), check_gradients=check,
                                      **recorder)
    gen = torch.Generator().manual_seed(0)
    n = next(v for v in X.values() if torch.is_tensor(v)).shape[0] if isinstance(X, dict) else X.shape[0]
    with rec:
        for _ in range(steps):
            idx = torch.randperm(n, generator=gen)[:4]
            opt.zero_grad()
            out = model(**rows(X, idx)) if isinstance(X, dict) else model(X[idx])
            batch_loss(out, y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    traj = rec.trajectory
    assert not check or max(traj.gradient_check()) <= 1e-12
    return model.eval(), traj


#: Figures measured by the exactness checks, one dict per check (printed by tests/hf_strangers_table.py).
MEASURED: list[dict] = []


def note(**figures: float) -> None:
    """Keep the figures of the running test's check in :data:`MEASURED`, named after the test."""
    MEASURED.append({"test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], **figures})


def assert_exact(traj, X_test, truth, ref, target, *, max_share: float = 1e-9, ref_error=None,
                 train_tol: float = 1e-9):
    """Replica <= 1e-6 relative to ``truth`` (the trained model in evaluation mode), no warning, residual share
    <= ``max_share``, ``keep=("train",)`` <= ``train_tol`` relative to ``ref``, whose own quadrature error
    (``ref_error``, default ``ref.quad_error``) must vanish.

    Returns the attribution.
    """
    assert float((ref.quad_error if ref_error is None else ref_error).abs().max()) <= 1e-11
    n = truth.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        replica = explaind.KernelReplica(device="cpu").fit(traj).predict(X_test)
        assert rel_err(replica, truth.reshape(n, -1)) <= 1e-6
        att = explaind.InfluenceEstimator(keep=("train",), target=target, tol=1e-11, device="cpu").fit(traj)
        att = att.transform(X_test)
    train_err = rel_err(att.values, ref.kept(("train",)))
    note(replica=rel_err(replica, truth.reshape(n, -1)), share=att.meta["residual_share"], train=train_err)
    assert att.meta["residual_share"] <= max_share
    assert train_err <= train_tol
    return att


class TwinReference(MappingReference):
    """The loop reference whose explained function runs ``twin(copy of the model)`` (the same function, written
    otherwise), while the training gradients run the recorded model as the loop did."""

    def __init__(self, traj, X, twin, **kwargs):
        self.twin = twin(copy.deepcopy(traj.model)).to(DT).eval()
        super().__init__(traj, X, **kwargs)

    def _compute_gradients(self) -> None:
        super()._compute_gradients()
        self.model = self.twin  # what the explained function and its kinks run from here on


def float64_rms_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Every ``*RMSNorm`` module that computes in float32 replaced by ``torch.nn.RMSNorm`` (same weight and eps)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__.endswith("RMSNorm") and hasattr(child, "variance_epsilon"):
                norm = torch.nn.RMSNorm(child.weight.shape[0], eps=child.variance_epsilon, dtype=child.weight.dtype)
                with torch.no_grad():
                    norm.weight.copy_(child.weight)
                setattr(module, name, norm)
    return model


def tiny_bart():
    """BART, one encoder and one decoder layer, 16-wide, padding id 1, decoder start id 2, every dropout 0, float64."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=LENGTH, dropout=0.0,
                                  attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return transformers.BartForConditionalGeneration(cfg).to(DT)
