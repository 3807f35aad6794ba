"""Cases of the thirteenth round whose loops choose samples by the model's own losses (online hard-example mining,
small-loss selection under label noise, co-teaching) or train two networks or two passes against each other (deep
mutual learning, R-drop); collected with the others in tests/_paradigms13_kit.py's ``CASES``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _paradigms12_draws import Case, Run, record, sgd
from _paradigms13_models import DT, RDrop, Students, small
from _stranger_loops_kit import batches, data
from replay_reference import ReplayReference
from torch import nn

import explaind


def noisy_labels() -> torch.Tensor:
    """:func:`data`'s labels with 6 of 24 flipped to another class (fixed rows)."""
    _, y, _ = data()
    y = y.clone()
    y[::4] = (y[::4] + 1) % 3
    return y


def selecting(rule: str, log: str = "kept", lr: float = 0.1) -> Run:
    """Per step the batch's per-sample losses under ``no_grad``; ``rule="hardest"`` keeps the 3 largest (online
    hard-example mining), ``"smallest"`` the 4 smallest (small-loss selection, loss truncation) on noisy labels;
    the mean loss of the kept rows backwarded. ``log="kept"`` logs the kept indices, ``"all"`` the whole batch,
    ``"weights"`` the whole batch with weight ``1/k`` on the kept rows and 0 elsewhere."""
    X, _, X_test = data()
    y = noisy_labels()
    model = small(8)
    opt = sgd(model, lr)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for idx in batches():
            with torch.no_grad():
                losses = F.cross_entropy(model(X[idx]), y[idx], reduction="none")
            k = 3 if rule == "hardest" else 4
            keep = losses.topk(k, largest=rule == "hardest").indices
            opt.zero_grad()
            F.cross_entropy(model(X[idx[keep]]), y[idx[keep]]).backward()
            if log == "kept":
                rec.log_batch(idx[keep])
            elif log == "weights":
                rec.log_batch(idx, weights=torch.zeros(len(idx), dtype=DT).index_fill_(0, keep, 1.0 / k))
            else:
                rec.log_batch(idx)
            opt.step()
    return Run(model, rec.trajectory, X_test)


def coteaching(how: str = "two_recorders", which: int = 0) -> Run:
    """Co-teaching: two networks, each ranks the batch by its own loss and hands its 4 smallest-loss rows to the
    other, which trains on them. ``how="two_recorders"``: each network with its own optimizer and recorder, both
    active, each logging the rows it trained on (``which`` picks the network returned); ``"one_model"``: both
    networks in one :class:`Students` model and one optimizer, the whole batch logged with a loss callable that sums
    both cross entropies."""
    X, _, X_test = data()
    y = noisy_labels()
    if how == "one_model":
        model = Students()
        opt = sgd(model)

        def both(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out[:, :3], t) + F.cross_entropy(out[:, 3:], t)

        rec = explaind.TrajectoryRecorder(model, opt, loss=both, train_data=(X, y))
        with rec:
            for idx in batches():
                out = model(X[idx])
                l1, l2 = (F.cross_entropy(o, y[idx], reduction="none") for o in (out[:, :3], out[:, 3:]))
                pick1, pick2 = l1.detach().topk(4, largest=False).indices, l2.detach().topk(4, largest=False).indices
                opt.zero_grad()
                (l1[pick2].mean() + l2[pick1].mean()).backward()
                rec.log_batch(idx)
                opt.step()
        return Run(model, rec.trajectory, X_test)
    nets = [small(10), small(11)]
    opts = [sgd(n) for n in nets]
    recs = [explaind.TrajectoryRecorder(n, o, loss="cross_entropy", train_data=(X, y)) for n, o in zip(nets, opts)]
    with recs[0], recs[1]:
        for idx in batches():
            with torch.no_grad():
                picks = [F.cross_entropy(n(X[idx]), y[idx], reduction="none").topk(4, largest=False).indices
                         for n in nets]
            for me, (net, opt, rec) in enumerate(zip(nets, opts, recs)):
                rows = idx[picks[1 - me]]
                opt.zero_grad()
                F.cross_entropy(net(X[rows]), y[rows]).backward()
                rec.log_batch(rows)
                opt.step()
    return Run(nets[which], recs[which].trajectory, X_test)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(q || p)`` from log-probabilities."""
    return (q_log.exp() * (q_log - p_log)).sum(1)


def mutual_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Deep mutual learning: each student's cross entropy plus its KL to the other's detached prediction."""
    a, b = F.log_softmax(out[:, :3], 1), F.log_softmax(out[:, 3:], 1)
    return (F.nll_loss(a, y) + F.nll_loss(b, y) + kl(a, b.detach()).mean() + kl(b, a.detach()).mean())


def mutual(lr: float = 0.1, optim: str = "sgd") -> Run:
    """Two students (:class:`Students`) trained together by :func:`mutual_loss`, one optimizer."""
    X, y, X_test = data()
    model = Students()
    opt = sgd(model, lr) if optim == "sgd" else torch.optim.Adam(model.parameters(), lr=lr)
    return Run(model, record(model, opt, X, y, mutual_loss, batches()), X_test)


def rdrop_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """R-drop: both passes' cross entropy plus the symmetric KL between them (weight 1), per-sample terms."""
    a, b = F.log_softmax(out[:, :3], 1), F.log_softmax(out[:, 3:], 1)
    return F.nll_loss(a, y) + F.nll_loss(b, y) + ((kl(a, b) + kl(b, a)) / 2).mean()


def rdrop(in_loop: bool = False, lr: float = 0.1, optim: str = "sgd") -> Run:
    """R-drop with both dropout passes inside the training forward (:class:`RDrop`, ``capture_random=True``); or
    (``in_loop``) as usually written, the dropout network called twice in the loop, ``loss="cross_entropy"``."""
    X, y, X_test = data()
    model = RDrop()
    opt = sgd(model, lr) if optim == "sgd" else torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(12)
    if not in_loop:
        traj = record(model, opt, X, y, rdrop_loss, batches(), capture_random=True)
        return Run(model, traj, X_test, ReplayReference)
    net = nn.Sequential(model.hidden, nn.Tanh(), model.drop, model.head)
    opt = sgd(net, lr)
    rec = explaind.TrajectoryRecorder(net, opt, loss="cross_entropy", train_data=(X, y), capture_random=True)
    with rec:
        for idx in batches():
            opt.zero_grad()
            rdrop_loss(torch.cat([net(X[idx]), net(X[idx])], 1), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return Run(net, rec.trajectory, X_test, ReplayReference)


SELECT_CASES: dict[str, Case] = {
    "ohem_topk_hardest_kept_indices_logged": lambda: selecting("hardest"),
    "ohem_topk_hardest_as_zero_one_weights": lambda: selecting("hardest", "weights"),
    "ohem_topk_hardest_whole_batch_logged": lambda: selecting("hardest", "all"),
    "ohem_sgd_lr3_untuned": lambda: selecting("hardest", lr=3.0),
    "small_loss_selection_noisy_labels": lambda: selecting("smallest"),
    "coteaching_two_recorders_network_one": coteaching,
    "coteaching_two_recorders_network_two": lambda: coteaching(which=1),
    "coteaching_both_networks_one_model": lambda: coteaching("one_model"),
    "mutual_learning_two_students_detached_kl": mutual,
    "mutual_learning_adam_lr1_untuned": lambda: mutual(lr=1.0, optim="adam"),
    "rdrop_two_dropout_passes_in_forward": rdrop,
    "rdrop_two_dropout_passes_in_loop": lambda: rdrop(in_loop=True),
    "rdrop_adam_lr1_untuned": lambda: rdrop(lr=1.0, optim="adam"),
}


