"""Set-up of tests/test_batch_coupled_losses.py and tests/batch_coupled_losses_table.py: losses whose per-sample
terms read the whole batch (CLIP's symmetric InfoNCE, SimCLR's NT-Xent, SupCon, batch-hard triplets), declared with
``explaind.batch_coupled_loss`` and split by loss term.

Every case is a float64 plain loop of 3 steps over 12 training rows, explained on 3 held-out inputs. The loss terms
are written here (the reference takes them from here too, never from explaind), and :class:`TermReference` is the
slow loop: per step and micro-batch one batched forward of the plain module (training mode under the recorded random
state when one was captured, else evaluation mode), then each term's gradient by ``torch.autograd.grad`` one ``k``
at a time. :func:`figures` measures the replica against the trained model in evaluation mode, the residual share and
the ``keep=("train",)`` scores against that reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from reference import rel_err
from replay_reference import BufferReference, ReplayReference
from torch import Tensor, nn

import explaind
from explaind.exceptions import ExplaindWarning

DT = torch.float64
N, STEPS, TAU = 12, 3, 0.5
QUAD = {"quadrature": "adaptive", "tol": 1e-11, "device": "cpu"}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------- loss terms (the user's, reduction "none")
def clip_terms(out: Tensor, _: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE: row ``k``'s image-to-text and text-to-image cross entropies, halved."""
    a, b = F.normalize(out[:, :4], dim=1), F.normalize(out[:, 4:], dim=1)
    logits, labels = a @ b.T / TAU, torch.arange(len(out))
    return (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")) / 2


def clip_batch_loss(out: Tensor, y: Tensor) -> Tensor:
    """The loss as the loop computes it (a mean, no terms)."""
    a, b = F.normalize(out[:, :4], dim=1), F.normalize(out[:, 4:], dim=1)
    logits, labels = a @ b.T / TAU, torch.arange(len(out))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_scale_terms(out: Tensor, _: Tensor) -> Tensor:
    """CLIP with its learned temperature: the last output column holds ``log(1/tau)`` (the model's parameter, as a
    column, so that the loss reads it through the outputs)."""
    a, b = F.normalize(out[:, :4], dim=1), F.normalize(out[:, 4:8], dim=1)
    logits, labels = out[0, 8].exp() * a @ b.T, torch.arange(len(out))
    return (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")) / 2


def nt_xent_terms(out: Tensor, ids: Tensor) -> Tensor:
    """SimCLR's NT-Xent over the rows of the batch: the positive of row ``k`` is the other view of its source
    (``ids`` equal), every other row a negative."""
    z = F.normalize(out, dim=1)
    sim = (z @ z.T / TAU).masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
    positive = (ids[:, None] == ids[None, :]) & ~torch.eye(len(z), dtype=torch.bool)
    return -(sim.log_softmax(1) * positive).sum(1)


def supcon_terms(out: Tensor, y: Tensor) -> Tensor:
    """SupCon: the mean log-probability of the same-label rows for each anchor (0 for an anchor without one)."""
    z = F.normalize(out, dim=1)
    eye = torch.eye(len(z), dtype=torch.bool)
    logp = (z @ z.T / TAU).masked_fill(eye, float("-inf")).log_softmax(1).masked_fill(eye, 0.0)
    positive = ((y[:, None] == y[None, :]) & ~eye).to(out.dtype)
    return -(logp * positive).sum(1) / positive.sum(1).clamp_min(1.0)


def triplet_terms(out: Tensor, y: Tensor, margin: float = 1.0) -> Tensor:
    """Batch-hard triplet: the farthest same-label row against the nearest other-label row (squared distances)."""
    d = (out[:, None, :] - out[None, :, :]).pow(2).sum(-1)
    same = y[:, None] == y[None, :]
    hardest_positive = d.masked_fill(~same, float("-inf")).max(1).values
    hardest_negative = d.masked_fill(same, float("inf")).min(1).values
    return F.relu(hardest_positive - hardest_negative + margin)


def reinforce_terms(out: Tensor, y: Tensor) -> Tensor:
    """REINFORCE with the batch's mean reward as baseline: ``-(r_k - mean r) log pi(a_k)``; ``y = [action, reward]``."""
    advantage = y[:, 1] - y[:, 1].mean()
    return -advantage * out.log_softmax(1).gather(1, y[:, :1].long()).squeeze(1)


def listnet_terms(out: Tensor, y: Tensor) -> Tensor:
    """ListNet's listwise ranking loss over the batch as one list: ``-softmax(y)_k log softmax(scores)_k``, times
    the list's length (so that the mean of the terms is the list's cross entropy)."""
    return -len(out) * y.softmax(0) * out[:, 0].log_softmax(0)


# ----------------------------------------------------------------- models
def tower(inputs: int, norm: str | None, head_bias: bool = True) -> nn.Sequential:
    """``Linear -> [BatchNorm] -> tanh -> [Dropout] -> Linear``. A bias the loss cannot see has a zero gradient up
    to rounding, which Adam rescales to a real update the recomputed gradient rounds otherwise: none before batch
    norm, and ``head_bias=False`` under a loss of distances only (docs/guide_own_model.md, "Batch-coupled losses")."""
    layers: list[nn.Module] = [nn.Linear(inputs, 6, bias=norm != "batchnorm")]
    if norm == "batchnorm":
        layers.append(nn.BatchNorm1d(6))
    layers.append(nn.Tanh())
    if norm == "dropout":
        layers.append(nn.Dropout(0.3))
    layers.append(nn.Linear(6, 4, bias=head_bias))
    return nn.Sequential(*layers).to(DT)


class TwoTowers(nn.Module):
    """CLIP's two towers: ``[image (5), text (5)] -> [a (4), b (4)]``."""

    def __init__(self, norm: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.image, self.text = tower(5, norm), tower(5, norm)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.image(x[:, :5]), self.text(x[:, 5:])], 1)


class ScaledTowers(TwoTowers):
    """:class:`TwoTowers` and CLIP's learned ``logit_scale = log(1/tau)`` as a ninth output column."""

    def __init__(self, norm: str | None = None) -> None:
        super().__init__(norm)
        self.logit_scale = nn.Parameter(torch.tensor(0.7, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([super().forward(x), self.logit_scale.expand(x.shape[0], 1)], 1)


def encoder(norm: str | None = None, head_bias: bool = True) -> nn.Module:
    torch.manual_seed(4)
    return tower(5, norm, head_bias)


# ----------------------------------------------------------------- runs
class Run(NamedTuple):
    model: nn.Module
    traj: Any
    X_test: Tensor
    terms: Callable[[Tensor, Tensor], Tensor]


def optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.05)
    return torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)


def record(model: nn.Module, opt_name: str, X: Tensor, y: Tensor, terms: Callable[[Tensor, Tensor], Tensor],
           batches: list[list[Tensor]], **kw: Any) -> Any:
    """A plain loop: each step's micro-batches (a list of index tensors), each micro-batch's mean of ``terms``
    scaled by its share of the step's rows, one ``log_batch`` per micro-batch."""
    opt = optimizer(model, opt_name)
    loss = kw.pop("loss", None) or explaind.batch_coupled_loss(terms)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), **kw)
    model.train()
    torch.manual_seed(7)
    with rec:
        for micro in batches:
            opt.zero_grad()
            rows = sum(len(m) for m in micro)
            for idx in micro:
                (terms(model(X[idx]), y[idx]).mean() * (len(idx) / rows)).backward()
                rec.log_batch(idx, torch.full((len(idx),), 1.0 / rows, dtype=DT))
            opt.step()
    return rec.trajectory


def random_batches(size: int, seed: int, parts: int = 1) -> list[list[Tensor]]:
    g = gen(seed)
    out = []
    for _ in range(STEPS):
        idx = torch.randperm(N, generator=g)[:size]
        out.append(list(idx.chunk(parts)))
    return out


def clip(opt: str = "sgd", norm: str | None = None, parts: int = 1, scale: bool = False, **kw: Any) -> Run:
    """CLIP's two towers on 12 (image, text) pairs, batches of 6 (``parts`` micro-batches each); with ``scale`` its
    learned temperature too."""
    g = gen(11)
    X = torch.randn(N + 3, 10, generator=g, dtype=DT)
    model, terms = (ScaledTowers(norm), clip_scale_terms) if scale else (TwoTowers(norm), clip_terms)
    traj = record(model, opt, X[:N], torch.zeros(N, dtype=DT), terms, random_batches(6, 1, parts), **kw)
    return Run(model, traj, X[N:], terms)


def simclr(opt: str = "sgd", norm: str | None = None) -> Run:
    """SimCLR: 6 sources with two augmented views each, the 12 views as rows; a batch is both views of 3 sources."""
    g = gen(12)
    source = torch.randn(6, 5, generator=g, dtype=DT)
    X = torch.cat([source + 0.3 * torch.randn(6, 5, generator=g, dtype=DT),
                   source + 0.3 * torch.randn(6, 5, generator=g, dtype=DT)])
    ids = torch.cat([torch.arange(6), torch.arange(6)]).to(DT)
    gb = gen(2)
    batches = []
    for _ in range(STEPS):
        pick = torch.randperm(6, generator=gb)[:3]
        batches.append([torch.cat([pick, pick + 6])])
    model = encoder(norm)
    traj = record(model, opt, X, ids, nt_xent_terms, batches)
    return Run(model, traj, torch.randn(3, 5, generator=g, dtype=DT), nt_xent_terms)


def labelled(terms: Callable[[Tensor, Tensor], Tensor], opt: str = "sgd", norm: str | None = None,
             head_bias: bool | None = None) -> Run:
    """SupCon or batch-hard triplets on 12 rows of 3 classes, batches of 6 holding every class twice."""
    g = gen(13)
    y = torch.arange(N) % 3
    X = torch.randn(N + 3, 5, generator=g, dtype=DT) + y.repeat(2)[:N + 3, None].to(DT)
    gb = gen(3)
    batches = []
    for _ in range(STEPS):
        batches.append([torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(4, generator=gb)[:2]]
                                   for c in range(3)])])
    # distances do not see a shift of the outputs: no bias on the head (see :func:`tower`) unless asked for
    model = encoder(norm, head_bias=terms is not triplet_terms if head_bias is None else head_bias)
    traj = record(model, opt, X[:N], y.to(DT), terms, batches)
    return Run(model, traj, X[N:], terms)


def policy(terms: Callable[[Tensor, Tensor], Tensor], opt: str, outputs: int) -> Run:
    """REINFORCE (``outputs=3`` actions, drawn rewards) or ListNet (``outputs=1`` score, graded relevance)."""
    g = gen(14)
    X = torch.randn(N + 3, 5, generator=g, dtype=DT)
    if outputs == 1:
        y = X[:N, 0] + 0.5 * torch.randn(N, generator=g, dtype=DT)
    else:
        y = torch.stack([torch.randint(0, 3, (N,), generator=g).to(DT), torch.randn(N, generator=g, dtype=DT)], 1)
    torch.manual_seed(5)
    # a list's softmax does not see a common shift of the scores: no bias on the score (see :func:`tower`)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, outputs, bias=outputs > 1)).to(DT)
    traj = record(model, opt, X[:N], y, terms, random_batches(6, 4))
    return Run(model, traj, X[N:], terms)


CASES: dict[str, Callable[[], Run]] = {
    "clip_infonce_two_towers_sgd_momentum": lambda: clip("sgd"),
    "clip_infonce_two_towers_adam": lambda: clip("adam"),
    "clip_infonce_two_micro_batches_per_step": lambda: clip("sgd", parts=2),
    "clip_infonce_dropout_captured": lambda: clip("adam", "dropout", capture_random=True),
    "clip_infonce_batchnorm_towers": lambda: clip("sgd", "batchnorm"),
    "clip_infonce_learned_temperature_adam": lambda: clip("adam", scale=True),
    "simclr_nt_xent_two_views_sgd_momentum": lambda: simclr("sgd"),
    "simclr_nt_xent_adam": lambda: simclr("adam"),
    "simclr_nt_xent_dropout_captured": lambda: simclr("sgd", "dropout"),
    "simclr_nt_xent_batchnorm": lambda: simclr("adam", "batchnorm"),
    "supcon_labels_sgd_momentum": lambda: labelled(supcon_terms),
    "supcon_labels_adam_batchnorm": lambda: labelled(supcon_terms, "adam", "batchnorm"),
    "batch_hard_triplet_sgd_momentum": lambda: labelled(triplet_terms),
    "batch_hard_triplet_adam_dropout": lambda: labelled(triplet_terms, "adam", "dropout"),
    "reinforce_batch_mean_baseline_sgd_momentum": lambda: policy(reinforce_terms, "sgd", 3),
    "listnet_listwise_ranking_adam": lambda: policy(listnet_terms, "adam", 1),
}


#: Shown by tests/batch_coupled_losses_table.py, not held to rounding level: Adam rescales the rounding of a gradient
#: that is zero in exact arithmetic (the head's bias under distances) to an update the recomputation does not repeat.
SHOWN: dict[str, Callable[[], Run]] = {
    "batch_hard_triplet_adam_dropout_head_bias": lambda: labelled(triplet_terms, "adam", "dropout", head_bias=True),
}


# ----------------------------------------------------------------- the reference and the figures
def reference(run: Run) -> ReplayReference:
    """The slow loop reference with ``run.terms`` (with recorded buffers when the run changed any)."""
    base = BufferReference if run.traj.buffer_names else ReplayReference

    class TermReference(base):  # type: ignore[misc, valid-type]
        def _compute_gradients(self) -> None:
            self.loss_fn = run.terms  # the terms as written above, not explaind's record
            super()._compute_gradients()

    return TermReference(run.traj, run.X_test, panels=2)


def figures(run: Run) -> dict[str, Any]:
    """``replica`` (relative to the trained model in evaluation mode), ``share`` (residual share), ``scores``
    (train scores relative to :func:`reference`), ``reference_residual`` (its largest per-step residual relative to
    its largest update) and ``warnings``."""
    with torch.no_grad():
        truth = run.model.eval()(run.X_test)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        replica = rel_err(np.asarray(explaind.KernelReplica(**QUAD).fit(run.traj).predict(run.X_test)), truth.numpy())
        att = explaind.InfluenceEstimator(keep=("train",), **QUAD).fit(run.traj).transform(run.X_test)
    ref = reference(run)
    expected = ref.kept(("train",))
    return {"replica": replica, "share": float(att.meta["residual_share"]),
            "scores": rel_err(np.asarray(att.values.detach()).reshape(expected.shape), expected),
            "reference_residual": float(ref.E.abs().max()) / max(float(torch.stack(ref.delta).abs().max()), 1e-300),
            "warnings": [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]}
