"""Engine time per step with and without the layer rules on GPT-2, a ResNet, a Transformer encoder, a MobileNet block.

Run ``python benchmarks/bench_layer_rules_models.py [--steps N] [--inputs T] [--width W] [--gpt-width D]
[--models gpt2,resnet,encoder,depthwise,seqfirst,padded]``. Records runs nobody tuned the rules for, in float64
on the CPU:

* a GPT-2 (``transformers.GPT2LMHeadModel`` from a ``GPT2Config``, no download; dropout 0; the
  read-out tied to the token embeddings as in GPT-2) trained with AdamW on next-token prediction of short sequences,
  explained at the last position's logits: Conv1D, LayerNorm and Embedding rules;
* a ResNet-18-shaped CNN at reduced width (BatchNorm after every convolution, four stages of two
  basic blocks, 1x1 projection shortcuts) trained with SGD momentum on scikit-learn's digits, in
  training mode (batch statistics: per-sample gradients through the replayed batched forward),
  explained in evaluation mode: Conv2d, BatchNorm and Linear rules;
* a Transformer encoder (``nn.TransformerEncoderLayer`` x2, causal mask, width ``--gpt-width``) on the
  same sequences with AdamW: the MultiheadAttention rule (in/out projections as sites), Linear,
  LayerNorm and Embedding rules;
* a MobileNet-style CNN (depthwise-separable blocks: depthwise 3x3 Conv2d with ``groups`` = channels,
  pointwise 1x1, GroupNorm) on digits with SGD momentum: grouped Conv2d, GroupNorm and Linear rules;
* the same Transformer encoder built sequence first (``batch_first=False``, ``(length, batch, width)``
  activations): Linear and LayerNorm rules with the batch axis second (``seqfirst``);
* a CNN whose convolutions pad by ``"same"`` with reflection, by numbers with replication and by
  ``"same"`` circularly with an even kernel, with GroupNorm, on digits (``padded``).

For each it times ``InfluenceEstimator(keep=("train",))`` (Gauss-Legendre 4 nodes, and the adaptive
rule) and the adaptive ``KernelReplica`` with the layer rules (``factored="always"``; ``"auto"`` keeps
convolutional models on the generic path on the CPU) and without them (``factored="never"``) in the same
process, the two modes alternating over ``--repeat`` rounds (the
fastest of each is printed, so neither pays the first call's warm-up), and prints seconds per
recorded step (fit and transform/predict, start-up checks included), the speed-up
``never / always``, the path the rules took (``factored``: Jacobians and per-sample gradients from
layer factors; ``rows``: the adaptive rule's refinement rows), and the largest relative difference
of the results. Fixed-node replicas evaluate grids by ``torch.func`` in both modes, so they are not timed.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.datasets import digits
from explaind.exceptions import ExplaindWarning


class TinyGPT2(nn.Module):
    """``GPT2LMHeadModel`` from a config; returns the last position's logits."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, length: int):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab, n_positions=length, n_embd=width, n_layer=layers, n_head=heads,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        self.gpt = GPT2LMHeadModel(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids=tokens).logits[:, -1]


class Encoder(nn.Module):
    """Token and position embeddings, ``nn.TransformerEncoderLayer`` blocks with a causal mask; the last position.

    ``batch_first=False`` builds the blocks sequence first and runs them on ``(length, batch, width)``.
    """

    def __init__(self, vocab: int, width: int, layers: int, heads: int, length: int, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(length, width)
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                                                batch_first=batch_first) for _ in range(layers)])
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device)[None])
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], dtype=h.dtype, device=h.device)
        h = h if self.batch_first else h.transpose(0, 1)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(h[:, -1] if self.batch_first else h[-1])


class PaddedCNN(nn.Module):
    """Convolutions padded every other way than numeric zeros, GroupNorm, for 8x8 single-channel images."""

    def __init__(self, width: int, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding="same", padding_mode="reflect")
        self.norm1 = nn.GroupNorm(1, width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, padding_mode="replicate")
        self.norm2 = nn.GroupNorm(1, 2 * width)
        self.mix = nn.Conv2d(2 * width, 2 * width, 2, padding="same", padding_mode="circular")
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.stem(x)))
        h = torch.relu(self.norm2(self.down(h)))
        return self.head(torch.relu(h + self.mix(h)).mean(dim=(2, 3)))


class SeparableBlock(nn.Module):
    """MobileNet's depthwise-separable block: depthwise 3x3 (one group per channel), GroupNorm, pointwise 1x1."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
        self.norm = nn.GroupNorm(1, c_in)
        self.pointwise = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pointwise(torch.relu(self.norm(self.depthwise(x)))))


class MobileNet(nn.Module):
    """A 3x3 stem and four depthwise-separable blocks at widths w, 2w, 2w, 4w for 8x8 single-channel images."""

    def __init__(self, width: int, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 1, 1)
        widths = (width, 2 * width, 2 * width, 4 * width)
        self.blocks = nn.Sequential(*[SeparableBlock(c_in, c_out, 2 if i % 2 else 1) for i, (c_in, c_out)
                                      in enumerate(zip((width, *widths[:-1]), widths))])
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.stem(x))).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 Conv-BatchNorm, a 1x1 Conv-BatchNorm projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.short is None else self.short(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (stem, stages of 2 blocks at widths w, 2w, 4w, 8w) for 8x8 single-channel images."""

    def __init__(self, width: int, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, c = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            blocks += [BasicBlock(c, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def train(model: nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, steps: int,
          batch: int) -> explaind.Trajectory:
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    gen = torch.Generator().manual_seed(0)
    with rec:
        for _ in range(steps):
            idx = torch.randint(len(X), (batch,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory


def sequences(n_test: int, vocab: int = 32, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic sequences modulo ``vocab``: ``X (256 + n_test, length)``, the next term ``y``."""
    gen = torch.Generator().manual_seed(1)
    start = torch.randint(vocab, (256 + n_test, 1), generator=gen)
    step = torch.randint(1, 4, (256 + n_test, 1), generator=gen)
    seq = (start + step * torch.arange(length + 1)) % vocab
    return seq[:, :-1], seq[:, -1]


def sequence_run(model: nn.Module, label: str, steps: int, n_test: int) -> tuple[str, explaind.Trajectory,
                                                                                torch.Tensor]:
    X, y = sequences(n_test)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    traj = train(model, opt, X[:256], y[:256], steps, batch=16)
    n = sum(p.numel() for p in model.parameters())
    return f"{label}, {n} parameters, AdamW)", traj, X[256:]


def gpt2_run(steps: int, n_test: int, width: int) -> tuple[str, explaind.Trajectory, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyGPT2(32, width=width, layers=2, heads=4, length=8).double()
    return sequence_run(model, f"tiny GPT-2 (2 layers, width {width}", steps, n_test)


def encoder_run(steps: int, n_test: int, width: int) -> tuple[str, explaind.Trajectory, torch.Tensor]:
    torch.manual_seed(0)
    model = Encoder(32, width=width, layers=2, heads=4, length=8).double()
    return sequence_run(model, f"TransformerEncoderLayer x2 (width {width}", steps, n_test)


def seqfirst_run(steps: int, n_test: int, width: int) -> tuple[str, explaind.Trajectory, torch.Tensor]:
    torch.manual_seed(0)
    model = Encoder(32, width=width, layers=2, heads=4, length=8, batch_first=False).double()
    return sequence_run(model, f"TransformerEncoderLayer x2, sequence first (width {width}", steps, n_test)


def digits_run(model: nn.Module, label: str, steps: int, n_test: int) -> tuple[str, explaind.Trajectory,
                                                                              torch.Tensor]:
    data = digits(flatten=False, dtype=torch.float64)
    X, y = data.train
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    traj = train(model, opt, X.reshape(-1, 1, 8, 8), y, steps, batch=16)
    n = sum(p.numel() for p in model.parameters())
    return f"{label} ({n} parameters, SGD momentum)", traj, data.X_val.reshape(-1, 1, 8, 8)[:n_test]


def resnet_run(steps: int, n_test: int, width: int) -> tuple[str, explaind.Trajectory, torch.Tensor]:
    torch.manual_seed(0)
    return digits_run(ResNet18(width).double(), f"ResNet-18 layout, BatchNorm, width {width}", steps, n_test)


def depthwise_run(steps: int, n_test: int, width: int) -> tuple[str, explaind.Trajectory, torch.Tensor]:
    torch.manual_seed(0)
    return digits_run(MobileNet(width).double(), f"MobileNet-style, depthwise, width {width}", steps, n_test)


def padded_run(steps: int, n_test: int, width: int) -> tuple[str, explaind.Trajectory, torch.Tensor]:
    torch.manual_seed(0)
    return digits_run(PaddedCNN(width).double(), f"CNN, reflect/replicate/circular padding, width {width}", steps,
                      n_test)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def jobs():
    def influence(traj, X, factored, quadrature):
        est = explaind.InfluenceEstimator(keep=("train",), quadrature=quadrature, factored=factored,
                                          residual_tol=1.0, device="cpu").fit(traj)
        return est.transform(X).values, est.sweep_["jacobian"]

    def replica(traj, X, factored, quadrature):
        rep = explaind.KernelReplica(quadrature=quadrature, factored=factored, device="cpu").fit(traj)
        out = torch.as_tensor(rep.predict(X))
        return out, "+".join(sorted(rep.engine_.factored_used)) or "autograd"

    return {"influence keep=(train,), gauss-legendre 4": lambda t, X, f: influence(t, X, f, "gauss-legendre"),
            "influence keep=(train,), adaptive": lambda t, X, f: influence(t, X, f, "adaptive"),
            "replica, adaptive": lambda t, X, f: replica(t, X, f, "adaptive")}


def best_of(repeat: int, job, traj, X) -> tuple[dict, dict]:
    """Results and the fastest of ``repeat`` timings per mode, the modes alternating (auto first, then never first)."""
    out, best = {}, {"always": float("inf"), "never": float("inf")}
    for r in range(repeat):
        for mode in (("always", "never") if r % 2 == 0 else ("never", "always")):
            out[mode], took = timed(lambda mode=mode: job(traj, X, mode))
            best[mode] = min(best[mode], took)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--inputs", type=int, default=8, help="test inputs")
    ap.add_argument("--width", type=int, default=4, help="channels of the ResNet's first stage (64 in ResNet-18)")
    ap.add_argument("--gpt-width", type=int, default=32, help="GPT-2's embedding width (768 in GPT-2 small)")
    ap.add_argument("--repeat", type=int, default=2, help="timings per mode (the fastest is printed)")
    ap.add_argument("--models", default="gpt2,resnet,encoder,depthwise",
                    help="comma-separated subset of gpt2, resnet, encoder, depthwise, seqfirst, padded")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", category=ExplaindWarning)  # quadrature notes, the same for both paths
    print(f"float64, CPU, torch threads {torch.get_num_threads()}, {args.steps} recorded steps, {args.inputs} test "
          f"inputs; seconds per recorded step (fit + transform/predict)\n")
    print("| model | measurement | layer rules (s/step) | path | torch.func (s/step) | ratio | max rel. difference |")
    print("|---|---|---|---|---|---|---|")
    makers = {"gpt2": (gpt2_run, args.gpt_width), "resnet": (resnet_run, args.width),
              "encoder": (encoder_run, args.gpt_width), "depthwise": (depthwise_run, args.width),
              "seqfirst": (seqfirst_run, args.gpt_width), "padded": (padded_run, args.width)}
    chosen = args.models.split(",")
    unknown = sorted(set(chosen) - set(makers))
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(makers)}")
    for key in chosen:
        make, width = makers[key]
        name, traj, X = make(args.steps, args.inputs, width)
        for label, job in jobs().items():
            out, best = best_of(args.repeat, job, traj, X)
            (fast, path), (slow, _), t_fast, t_slow = out["always"], out["never"], best["always"], best["never"]
            diff = float((fast - slow).abs().max() / slow.abs().max())
            n = traj.n_steps
            print(f"| {name} | {label} | {t_fast / n:.3f} | {path} | {t_slow / n:.3f} | {t_slow / t_fast:.2f}x | "
                  f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
