"""Layer rules for the layouts real models use, through the estimators, and the layers refused outright.

Rule-level exactness (Jacobians, rows, per-sample gradients, products against per-entry jacrev/jvp/grad loops in
float64) runs in tests/test_engine_factored.py, cases ``conv_padding``, ``sequence_first`` and ``wide_axes``. Here:
the same models recorded and explained with the rules (``factored="always"``) against the generic path, and
``nn.Embedding(max_norm=...)``, which rewrites its table in place, refused by the recorder and by the engine.
"""

from __future__ import annotations

import pytest
import torch
from engine_testkit import rel
from test_engine_factored import CASES
from test_engine_layer_rules import _record
from torch import Tensor, nn

import explaind
from explaind.exceptions import UnsupportedModelError
from explaind.kernel.explained import FunctionalModel
from explaind.kernel.layer_hooks import batch_axes
from explaind.losses import resolve_loss

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


@pytest.mark.parametrize("case", ["conv_padding", "sequence_first", "wide_axes"])
def test_layouts_factored_equal_generic_through_the_estimators(case):
    make, inputs = CASES[case]
    X = inputs(15)
    y = torch.randint(0, 5, (15,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    model = make().to(DT)
    traj = _record(model, X[:12], y[:12], steps=3, batch=4, opt="sgd")
    att, replica = {}, {}
    for mode in ("always", "never"):
        est = explaind.InfluenceEstimator(keep=("train",), quadrature="gauss-legendre", factored=mode,
                                          residual_tol=1.0, device="cpu").fit(traj)
        att[mode] = est.transform(X[12:])
        assert est.sweep_["jacobian"] == {"always": "factored", "never": "autograd"}[mode]
        assert att[mode].completeness_error() <= 1e-10
        rep = explaind.KernelReplica(quadrature="adaptive", factored=mode, device="cpu").fit(traj)
        replica[mode] = torch.as_tensor(rep.predict(X[12:]))
        assert mode == "always" or not rep.engine_.factored_used  # rows: tests/test_engine_factored.py
    assert float(att["never"].values.abs().max()) > 1e-6
    assert rel(att["always"].values, att["never"].values) <= 1e-10
    assert rel(replica["always"], replica["never"]) <= 1e-10
    with torch.no_grad():
        assert rel(replica["always"], model.eval()(X[12:])) <= 1e-6


def test_batch_axis_is_second_only_inside_sequence_first_blocks():
    model = CASES["sequence_first"][0]()
    axes = batch_axes(model, ["tok", "enc1.linear1", "enc1.norm2", "enc2.linear2", "dec.norm3", "dec.linear1",
                              "enc1.self_attn", "head"])
    assert axes == {"tok": 0, "enc1.linear1": 1, "enc1.norm2": 1, "enc2.linear2": 1, "dec.norm3": 1,
                    "dec.linear1": 1, "enc1.self_attn": 1, "head": 0}
    batch_first = nn.TransformerEncoderLayer(4, 2, 6, batch_first=True)
    assert batch_axes(nn.Sequential(batch_first), ["0.linear1", "0.norm1"]) == {"0.linear1": 0, "0.norm1": 0}


class CappedTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(7, 4, max_norm=0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.tok(tokens).mean(1))


def test_an_embedding_with_max_norm_is_refused_by_the_recorder():
    model = CappedTokens().to(DT)
    before = model.tok.weight.detach().clone()
    with pytest.raises(UnsupportedModelError, match=r"TrajectoryRecorder: the embeddings \['tok \(max_norm=0.5\)'\] "
                                                    r"renormalise.*Allowed: nn.Embedding and nn.EmbeddingBag with "
                                                    r"max_norm=None. Fix"):
        explaind.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), loss="cross_entropy")
    assert torch.equal(model.tok.weight, before)


def test_an_embedding_with_max_norm_is_refused_by_the_engine():
    """A run not recorded here (e.g. checkpoints) reaches the engine: it refuses before any forward."""
    model = CappedTokens().to(DT)
    with pytest.raises(UnsupportedModelError, match=r"explaind cannot evaluate this model: the embeddings "
                                                    r"\['tok \(max_norm=0.5\)'\]"):
        FunctionalModel(model, {}, resolve_loss("cross_entropy").implementation, torch.device("cpu"), DT)
