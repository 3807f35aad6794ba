"""Runs a new user resumes or unpacks by hand: refused or flagged, naming the cause and the fix (float64).

An optimizer state loaded with ``opt.load_state_dict`` instead of ``rec.restore()``, ``maximize`` switched on it
(refused at the first step);
a GRU classifier whose head averages ``pad_packed_sequence``'s output (unpacked without ``total_length``) over all
time steps, padding included. The loops that end exact are in tests/test_stranger_loops_more.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_stranger_loops import BATCH, _data, _mlp

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning


def test_a_hand_loaded_optimizer_state_with_maximize_switched_is_refused_at_the_first_step(tmp_path):
    """Resuming by ``opt.load_state_dict`` instead of ``rec.restore()``, then switching ``maximize``: the loaded state
    is the one the store saved, so the recorder continues from it, and learns the ``maximize`` its buffers were built
    under; the switch is refused at the first resumed step (as after ``restore()``, tests/test_recording_edges.py)."""
    X, y, _ = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "run")
    with rec:
        for idx in torch.arange(2 * BATCH).reshape(2, BATCH):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    resumed = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    resumed.load_state_dict(opt.state_dict())
    for group in resumed.param_groups:
        group["maximize"] = True
    rec = explaind.TrajectoryRecorder(model, resumed, loss="cross_entropy", train_data=(X, y), store=tmp_path / "run",
                                      resume=True)
    idx = torch.arange(2 * BATCH, 3 * BATCH)
    with pytest.raises(ConfigError, match=r"'maximize'\] was switched from False to True while its parameters hold "
                                          r"'momentum_buffer'"), rec:
        resumed.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        resumed.step()
    assert all(g["maximize"] for g in resumed.param_groups)  # the live settings are left as they were


def test_a_mean_over_padding_unpacked_without_total_length_is_flagged_naming_total_length():
    """A GRU text classifier whose head averages ``pad_packed_sequence``'s output over all time steps: trained on
    batches padded to their longest sequence, explained on inputs padded to the full length, it computes another
    function there. Before, the residual-share warning named dropout, the audit and the gradient check only."""
    from hard_models_kit import seeded, train
    from test_hard_models_packed import PackedClassifier, tokens

    class MeanOverPadding(PackedClassifier):
        def forward(self, ids):
            packed = torch.nn.utils.rnn.pack_padded_sequence(self.emb(ids), (ids != 0).sum(1), batch_first=True,
                                                             enforce_sorted=False)
            seq, _ = torch.nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
            return self.head(self.act(seq.mean(1)))

    X, y = tokens(14, 3)
    model = seeded(lambda: MeanOverPadding(torch.nn.GRU(3, 4, batch_first=True), "mean", False))
    traj, _ = train(model, "sgd", X[:12], y[:12])
    with pytest.warns(ExplaindWarning, match=r"residual share .*recurrent layers \(rnn\).*pad_packed_sequence without "
                                             r"total_length.*pass total_length=x.shape\[1\]"):
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X[12:])
    assert att.meta["residual_share"] > 1e-3
