"""Explain a run that was not recorded: a tiny causal language model checkpointed every few steps.

The loop below is an ordinary training loop with no explaind in it; it only saves the model with
``safetensors`` every ``every`` steps. ``explaind.Trajectory.from_checkpoints`` turns the
checkpoints into macro-steps, and the replica and the ``split=False`` decompositions explain the
next-token logit at the last position exactly along the straight segments between checkpoints.

Run ``python examples/checkpoints_causal_lm.py`` (seconds) or with ``--tiny`` (used by the tests).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import explaind

VOCAB, LENGTH = 11, 6


class TinyLM(nn.Module):
    """Token and position embeddings, one causal attention head (SDPA), a LayerNorm and a read-out."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(LENGTH, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)
        h = h + F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, 0]
        return self.head(self.norm(h))  # (batch, length, vocab): next-token logits at every position


def sequences(n: int, seed: int) -> torch.Tensor:
    """Counting modulo VOCAB in steps of 3 from a random start: the next token is predictable."""
    start = torch.randint(VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + 3 * torch.arange(LENGTH + 1)) % VOCAB


def main(tiny: bool = False, out: str | None = None) -> dict:
    steps, every = (6, 2) if tiny else (40, 5)
    folder = Path(out or tempfile.mkdtemp(prefix="explaind-ckpt-"))
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = TinyLM().double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
    data = sequences(256, seed=1)
    paths = []

    def checkpoint(s: int) -> None:
        path = folder / f"step-{s:04d}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
        paths.append(path)

    checkpoint(0)
    for s in range(steps):  # the user's own loop: no recorder
        batch = data[torch.randint(len(data), (32,), generator=torch.Generator().manual_seed(100 + s))]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (s + 1) % every == 0:
            checkpoint(s + 1)

    traj = explaind.Trajectory.from_checkpoints(paths, model=TinyLM().double())
    test = sequences(8, seed=2)
    X, next_token = test[:, :-1], test[:, -1]
    # explain the logit of the correct next token at the last position: output index (LENGTH-1)*VOCAB + token
    target = ((LENGTH - 1) * VOCAB + next_token).tolist()
    fidelity = explaind.KernelReplica().fit(traj).fidelity_report(X, model=model)
    att = explaind.InfluenceEstimator(keep=("step", "group"), split=False, target=target).fit(traj).transform(X)
    per_step = att.sum("group").values[..., 0].mean(0)
    per_group = att.sum("step").values[..., 0].mean(0)
    print(f"{traj.n_steps} macro-steps of {every} optimizer steps; replica vs the trained model: max rel. error "
          f"{fidelity['model_max_rel_error']:.1e}; completeness gap {att.completeness_error():.1e}")
    print("mean contribution to the correct next-token logit, by macro-step:",
          " ".join(f"{v:+.3f}" for v in per_step.tolist()))
    top = sorted(zip(att.coords["group"], per_group.tolist()), key=lambda kv: -abs(kv[1]))[:3]
    print("largest parameter tensors:", ", ".join(f"{name} {v:+.3f}" for name, v in top))
    return {"fidelity": fidelity, "completeness_gap": att.completeness_error(), "n_steps": traj.n_steps,
            "per_step": per_step.tolist()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args()
    main(tiny=args.tiny, out=args.out)
