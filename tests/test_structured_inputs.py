"""Models that take several tensors: a mapping (``model(**batch)``, Hugging Face style) or a tuple (``model(*x)``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from engine_testkit import rel
from torch import Tensor, nn

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning
from explaind.inputs import Inputs

DT = torch.float64


@dataclass
class Output:
    logits: Tensor


class MaskedBag(nn.Module):
    """Token embeddings averaged under an attention mask, a hidden layer, logits in an output object."""

    def __init__(self, vocab: int = 9, d: int = 8, n_out: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, n_out)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Output:
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1).to(self.mix.weight.dtype)
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True).clamp_min(1).to(h.dtype)
        return Output(self.head(torch.tanh(self.mix(pooled))))


def _data(n: int = 20, length: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 9, (n, length), generator=gen)
    lengths = torch.randint(2, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # padding id 0 after each sequence
    y = torch.randint(0, 4, (n,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask}, y


def _call(model: nn.Module, X, as_tuple: bool):
    return model(X["input_ids"], X["attention_mask"]) if as_tuple else model(**X)


def _record(as_tuple: bool, store=None):
    torch.manual_seed(0)
    X, y = _data()
    model = MaskedBag().to(DT)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    train_X = (X["input_ids"], X["attention_mask"]) if as_tuple else X
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(train_X, y), store=store)
    gen = torch.Generator().manual_seed(1)
    with rec:
        for _ in range(5):
            idx = torch.randperm(20, generator=gen)[:8]
            batch = {k: v[idx] for k, v in X.items()}
            opt.zero_grad()
            F.cross_entropy(_call(model, batch, as_tuple).logits, y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model, rec


@pytest.mark.parametrize("as_tuple", [False, True], ids=["mapping", "tuple"])
def test_structured_inputs_are_recorded_and_explained_exactly(tmp_path, as_tuple):
    model, rec = _record(as_tuple, store=tmp_path / "run")
    test, _ = _data(n=6, seed=3)
    X_test = (test["input_ids"], test["attention_mask"]) if as_tuple else test
    model.eval()
    with torch.no_grad():
        truth = _call(model, test, as_tuple).logits
    stored = explaind.Trajectory.load(tmp_path / "run", model=MaskedBag().to(DT))
    for traj in (rec.trajectory, stored):
        assert rel(torch.as_tensor(explaind.KernelReplica(device="cpu").fit(traj).predict(X_test)), truth) <= 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("error", ExplaindWarning)
            est = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj)
            att = est.transform(X_test)
        assert att.completeness_error() <= 1e-10 and att.meta["residual_share"] <= 1e-9
        assert est.sweep_["jacobian"] == "factored"  # embeddings and linear layers, masked inputs included
        generic = explaind.InfluenceEstimator(keep=("train",), factored="never", device="cpu").fit(traj)
        assert rel(generic.transform(X_test).values, att.values) <= 1e-12


def test_inputs_index_and_refuse_mismatched_batches():
    X, _ = _data(n=6)
    inputs = Inputs(X)
    assert inputs.shape == (6,) and len(inputs[torch.tensor([0, 2])]) == 2
    assert torch.equal(inputs[1:3].data["input_ids"], X["input_ids"][1:3])
    with pytest.raises(ConfigError, match="different first"):
        Inputs({"input_ids": X["input_ids"], "attention_mask": X["attention_mask"][:3]})
