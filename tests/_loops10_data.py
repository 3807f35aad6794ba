"""Data cases of the tenth loops round (tests/_loops10_kit.py): samplers and loaders, random augmentation in a
``Dataset``, a ``collate_fn`` that pads each batch, curricula that swap the dataset.

Float64 runs of tests/_stranger_loops_kit.py's data and SGD momentum (6 steps of 6 of 24 samples); a case returns
``(model, trajectory)`` or raises where the library refuses it.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from _stranger_loops_kit import DT, STEPS, N, batches, data, mlp, sgd
from torch import nn

import explaind

# ---------------------------------------------------------------------------------------------- samplers, loaders


class Indexed(torch.utils.data.Dataset):
    """``(x, y, index)`` items; ``noise``: each ``x`` plus Gaussian noise of that scale drawn in ``__getitem__``
    (random augmentation)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, noise: float = 0.0) -> None:
        self.X, self.y, self.noise = X, y, noise

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = self.X[i]
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        return x, self.y[i], i


def loader_run(loader_kwargs: dict[str, Any], noise: float = 0.0, drawn_once: bool = False,
               **rec_kwargs: Any) -> tuple[nn.Module, Any]:
    """SGD momentum over ``STEPS`` batches of 6 from a ``DataLoader(Indexed(X, y, noise), **loader_kwargs)``; the
    loop trains on the loader's ``x`` and logs its indices. ``drawn_once``: the augmentation (Gaussian noise of
    scale 0.1) drawn once for every sample before recording, and those inputs given as ``train_data`` (the fix the
    refusal of an augmentation drawn in ``__getitem__`` names)."""
    X, y, _ = data()
    if drawn_once:
        X = X + 0.1 * torch.randn(X.shape, generator=torch.Generator().manual_seed(8), dtype=DT)
    model = mlp()
    opt = sgd(model)
    torch.manual_seed(3)
    loader = torch.utils.data.DataLoader(Indexed(X, y, noise), batch_size=6, **loader_kwargs)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), **rec_kwargs)
    with rec:
        for xb, yb, ib in itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), STEPS):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            rec.log_batch(ib)
            opt.step()
    return model, rec.trajectory


def weighted_sampler() -> dict[str, Any]:
    """``WeightedRandomSampler`` drawing the last 8 samples 4 times as often, with replacement."""
    weights = torch.ones(N, dtype=DT)
    weights[-8:] = 4.0
    return {"sampler": torch.utils.data.WeightedRandomSampler(weights, num_samples=N, replacement=True)}


# ---------------------------------------------------------------------------------------------- padding, curricula


class Pooled(nn.Module):
    """Sequences of up to 2 positions of 2 features, flattened to ``(B, 2 L)`` (a padded position is all zeros):
    a tanh layer per position, pooled over the positions, and a linear head. ``masked``: the mean over the
    non-padded positions, else over all positions."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.head, self.masked = nn.Linear(2, 6), nn.Linear(6, 3), masked
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(len(x), -1, 2)
        h = torch.tanh(self.inner(seq))
        if not self.masked:
            return self.head(h.mean(1))
        mask = (seq != 0).any(-1, keepdim=True).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1))


def padded_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The training inputs with samples 0..11 one position long (their second position zeroed: padding)."""
    X, y, _ = data()
    X = X.clone()
    X[:12, 2:] = 0.0
    return X, y


def pad_collate(items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, ...]:
    """Pads each batch to its longest sequence (``pad_sequence``) and flattens it to ``(B, 2 L)``."""
    seqs = [x.reshape(-1, 2)[: (1 if (x[2:] == 0).all() else 2)] for x, _, _ in items]
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    return (padded.flatten(1), torch.stack([t for _, t, _ in items]), torch.tensor([i for _, _, i in items]))


def bucketed_padding(masked: bool) -> tuple[nn.Module, Any]:
    """Batches bucketed by length (short and long sequences alternate), padded per batch by :func:`pad_collate`;
    ``train_data`` holds every sample padded to the longest length."""
    X, y = padded_data()
    model = Pooled(masked)
    opt = sgd(model)
    gen = torch.Generator().manual_seed(5)
    short, long = torch.randperm(12, generator=gen), 12 + torch.randperm(12, generator=gen)
    order = [short[:6], long[:6], short[6:], long[6:], short[:6], long[6:]]
    items = Indexed(X, y)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for idx in order:
            xb, yb, ib = pad_collate([items[int(i)] for i in idx])
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            rec.log_batch(ib)
            opt.step()
    return model, rec.trajectory


def curriculum_swap(concatenated: bool) -> tuple[nn.Module, Any]:
    """An easy dataset (the inputs halved) for 3 steps, then the real one. ``concatenated``: both stacked in
    ``train_data`` and the second stage's indices offset by ``N``; else ``train_data`` is the real one and the first
    stage logs its indices into the easy one."""
    X, y, _ = data()
    easy = X * 0.5
    model = mlp()
    opt = sgd(model)
    train_data = (torch.cat([easy, X]), torch.cat([y, y])) if concatenated else (X, y)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=train_data)
    with rec:
        for s, idx in enumerate(batches()):
            inputs = easy if s < 3 else X
            opt.zero_grad()
            F.cross_entropy(model(inputs[idx]), y[idx]).backward()
            rec.log_batch(idx + N if concatenated and s >= 3 else idx)
            opt.step()
    return model, rec.trajectory
