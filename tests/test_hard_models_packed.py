"""Variable-length token sequences fed to nn.LSTM / nn.GRU / nn.RNN as packed sequences, exact end to end.

The models pack inside their forward (lengths read off the padding, as a text classifier does), so explaind
evaluates them batched (packed with torch's per-step batch sizes) and one input at a time under ``vmap`` (each
input with its own length: the masked form, explaind/kernel/rewrites.py). Every run is checked against the trained
model and the slow loop reference of tests/hard_models_kit.py (plain torch, fused kernels, one input at a time);
the packing operations themselves against torch's, batched and under ``vmap``.
"""

from __future__ import annotations

import pytest
import torch
from hard_models_kit import DT, assert_exact, measure, seeded, train
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from explaind.exceptions import ConfigError, UnsupportedModelError
from explaind.kernel.rewrites import FusedKernelRewrite

pytestmark = pytest.mark.usefixtures("one_thread")

T, VOCAB = 5, 7


def tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` id sequences of lengths 1..T (ids 1..VOCAB-1, then 0 as padding) and labels below 3."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (n,), generator=gen)
    ids = torch.randint(1, VOCAB, (n, T), generator=gen)
    ids[torch.arange(T)[None, :] >= lengths[:, None]] = 0
    return ids, torch.randint(0, 3, (n,), generator=gen)


class PackedClassifier(nn.Module):
    """``Embedding(7, 3, padding_idx=0)``, packed ``rnn``, then ReLU and a ``Linear(., 3)`` head on one summary.

    ``read``: ``"final"`` (the last layer's ``h_n``, both directions), ``"mean"`` (unpacked with
    ``total_length``, mean over each sequence's own steps) or ``"last"`` (unpacked without ``total_length``,
    the output at each sequence's last step). ``sort``: sort the batch in the forward and pack with
    ``enforce_sorted=True``, else ``enforce_sorted=False``.
    """

    def __init__(self, rnn: nn.RNNBase, read: str, sort: bool):
        super().__init__()
        self.emb, self.rnn, self.read, self.sort = nn.Embedding(VOCAB, 3, padding_idx=0), rnn, read, sort
        dirs = 2 if rnn.bidirectional else 1
        self.act, self.head = nn.ReLU(), nn.Linear(dirs * (rnn.proj_size or rnn.hidden_size), 3)

    def forward(self, ids):
        lengths = (ids != 0).sum(1)
        order = None
        if self.sort:
            lengths, order = lengths.sort(descending=True)
            ids = ids[order]
        x = self.emb(ids).transpose(0, 1) if not self.rnn.batch_first else self.emb(ids)
        packed = pack_padded_sequence(x, lengths, batch_first=self.rnn.batch_first, enforce_sorted=self.sort)
        out, hidden = self.rnn(packed)
        h = hidden[0] if isinstance(hidden, tuple) else hidden
        dirs = 2 if self.rnn.bidirectional else 1
        if self.read == "final":
            z = torch.cat(list(h[-dirs:]), dim=-1)
        else:
            total = ids.shape[1] if self.read == "mean" else None
            seq, lens = pad_packed_sequence(out, batch_first=True, total_length=total)
            if self.read == "mean":
                z = seq.sum(1) / lens.to(seq.dtype)[:, None]
            else:
                z = seq[torch.arange(seq.shape[0]), lens - 1]
        if order is not None:
            z = z[order.argsort()]
        return self.head(self.act(z))


CASES = {
    "lstm-sorted-final": (lambda: nn.LSTM(3, 4), "final", True, "sgd"),
    "gru-unsorted-mean": (lambda: nn.GRU(3, 4, batch_first=True), "mean", False, "adam"),
    "rnn-tanh-2layer-bidir-last": (lambda: nn.RNN(3, 4, num_layers=2, bidirectional=True), "last", False, "sgd"),
    "gru-2layer-dropout-final": (lambda: nn.GRU(3, 4, num_layers=2, dropout=0.3), "final", False, "sgd"),
    "lstm-proj-bidir-mean": (lambda: nn.LSTM(3, 4, proj_size=2, bidirectional=True, batch_first=True), "mean",
                             True, "adam"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_sequence_classifier_is_exact(case):
    rnn, read, sort, opt = CASES[case]
    X, y = tokens(14, 3)
    assert len(set((X != 0).sum(1).tolist())) > 2  # lengths differ within the batches
    model = seeded(lambda: PackedClassifier(rnn(), read, sort))
    traj, copies = train(model, opt, X[:12], y[:12])
    assert_exact(measure(model, traj, copies, X[12:]))


MODULES = [nn.LSTM(3, 4, num_layers=2, bidirectional=True), nn.GRU(3, 4, batch_first=True),
           nn.RNN(3, 4, nonlinearity="relu", bidirectional=True), nn.LSTM(3, 5, proj_size=2, batch_first=True)]


@pytest.mark.parametrize("module", MODULES, ids=["lstm-2layer-bidir", "gru-batch-first", "rnn-relu-bidir", "lstm-proj"])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_kernels_equal_torchs_batched_and_one_input_at_a_time(module, enforce_sorted):
    torch.manual_seed(0)
    module, bf = module.to(DT), module.batch_first
    lengths = torch.tensor([6, 4, 3, 1]) if enforce_sorted else torch.tensor([3, 6, 1, 4])
    x = torch.randn(4, 6, 3, dtype=DT)
    if not bf:
        x = x.transpose(0, 1)
    module.requires_grad_(False)
    want = module(pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=enforce_sorted))
    want_padded = pad_packed_sequence(want[0], batch_first=bf, padding_value=-1.0, total_length=7)
    with FusedKernelRewrite():
        packed = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=enforce_sorted)
        got = module(packed)
        got_padded = pad_packed_sequence(got[0], batch_first=bf, padding_value=-1.0, total_length=7)
    want_h = want[1] if isinstance(want[1], tuple) else (want[1],)
    got_h = got[1] if isinstance(got[1], tuple) else (got[1],)
    assert torch.equal(got[0].batch_sizes, want[0].batch_sizes)
    for a, b in zip([want[0].data, *want_h, want_padded[0]], [got[0].data, *got_h, got_padded[0]]):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-14
    assert torch.equal(want_padded[1], got_padded[1])
    # one input at a time, each with its own length: the masked form, against the batched torch results
    params = {n: p.detach() for n, p in module.named_parameters()}
    axis = 0 if bf else 1

    def one(xi, li):
        pk = pack_padded_sequence(xi.unsqueeze(axis), li.unsqueeze(0), batch_first=bf, enforce_sorted=enforce_sorted)
        out, hidden = functional_call(module, params, (pk,))
        padded, lens = pad_packed_sequence(out, batch_first=bf, padding_value=-1.0, total_length=7)
        return padded.squeeze(axis), (hidden[0] if isinstance(hidden, tuple) else hidden).squeeze(1), lens

    with FusedKernelRewrite():
        padded, h, lens = vmap(one, in_dims=(axis, 0), out_dims=(axis, 1, 0))(x, lengths)
    assert float((padded - want_padded[0]).abs().max()) <= 1e-14
    assert float((h - want_h[0]).abs().max()) <= 1e-14
    assert torch.equal(lens.reshape(-1), lengths)


def test_bad_lengths_and_rebuilt_packed_data_are_refused():
    x = torch.randn(4, 2, 3, dtype=DT)
    lstm = nn.LSTM(3, 4).to(DT)
    with FusedKernelRewrite(), pytest.raises(ConfigError, match=r"lengths \[2, 3\].*decreasing order.*Fix"):
        pack_padded_sequence(x, torch.tensor([2, 3]))
    with FusedKernelRewrite(), pytest.raises(ConfigError, match=r"lengths \[5, 3\].*in 1\.\.4"):
        pack_padded_sequence(x, torch.tensor([5, 3]))

    def rebuilt(xi, li):  # rows dropped from a masked packed sequence's data: refused, not silently misread
        pk = pack_padded_sequence(xi.unsqueeze(1), li.unsqueeze(0))
        return lstm(nn.utils.rnn.PackedSequence(pk.data[1:], pk.batch_sizes))[1][0]

    with FusedKernelRewrite(), pytest.raises(UnsupportedModelError, match=r"holds 3 rows where 4.*Fix"):
        vmap(rebuilt, in_dims=(1, 0))(x, torch.tensor([3, 2]))


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_packed_with_an_initial_state_equals_torchs(cell):
    """A given ``h_0`` (and ``c_0``) is reordered with the unsorted batch, batched and one input at a time."""
    torch.manual_seed(0)
    module = cell(3, 4, num_layers=2, bidirectional=True).to(DT).requires_grad_(False)
    x, lengths = torch.randn(6, 4, 3, dtype=DT), torch.tensor([3, 6, 1, 4])
    h0, c0 = torch.randn(4, 4, 4, dtype=DT), torch.randn(4, 4, 4, dtype=DT)

    def run(xs, ls, h, c):
        state = (h, c) if cell is nn.LSTM else h
        out, hidden = module(pack_padded_sequence(xs, ls, enforce_sorted=False), state)
        return out, (hidden[0] if cell is nn.LSTM else hidden)

    want_out, want_h = run(x, lengths, h0, c0)
    with FusedKernelRewrite():
        got_out, got_h = run(x, lengths, h0, c0)
        one_h = vmap(lambda xi, li, hi, ci: run(xi.unsqueeze(1), li.unsqueeze(0), hi.unsqueeze(1),
                                                ci.unsqueeze(1))[1].squeeze(1),
                     in_dims=(1, 0, 1, 1), out_dims=1)(x, lengths, h0, c0)
    assert float((got_out.data - want_out.data).abs().max()) <= 1e-14
    for h in (got_h, one_h):
        assert float((h - want_h).abs().max()) <= 1e-14
