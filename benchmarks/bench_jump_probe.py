"""Cost of the probe forward that finds jumps, stops and gradient switches (explaind/kernel/jumps.py).

Every estimator runs the model once on its first test input under the probe's ``TorchFunctionMode``
(:func:`explaind.kernel.jumps.find_jumps`, with the parameters as leaves that require grad). Since the probe also
names calls that read a parameter-dependent tensor with the gradient off (``torch.no_grad()`` inside ``forward``),
it asks ``torch.is_grad_enabled()`` at every call and walks the stack at each such call. This prints, per model,
the CPU milliseconds of the probe (the median of ``--repeats`` calls, alternated with the plain forward), of the
plain forward with the same leaves, their ratio, and the gradient-switch sites the probe found (there should be none
on models without a switch: a rotary embedding under ``@torch.no_grad()`` reads no parameter-dependent value).

Run ``OMP_NUM_THREADS=1 python benchmarks/bench_jump_probe.py [--repeats 30]``; run it on two checkouts to compare
(the script uses only ``find_jumps``, which both have).
"""

from __future__ import annotations

import argparse

import torch
from bench_functional_rewrites import _cpu  # median CPU seconds, the functions alternated
from torch import nn
from torch.func import functional_call

from explaind.kernel.jumps import find_jumps

DT = torch.float64


class NoGradNorm(nn.Module):
    """An MLP whose last weight is divided by its row norms taken under ``torch.no_grad()``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh())
        self.w = nn.Parameter(torch.randn(10, 256))

    def forward(self, x):
        with torch.no_grad():
            n = self.w.norm(dim=1, keepdim=True)
        return self.body(x) @ (self.w / n).T


def _models() -> dict[str, tuple[nn.Module, object]]:
    torch.manual_seed(0)
    models: dict[str, tuple[nn.Module, object]] = {
        "MLP 784-256-256-10": (nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                             nn.Linear(256, 10)), torch.randn(1, 784)),
        "MLP with a no_grad norm": (NoGradNorm(), torch.randn(1, 784)),
        "CNN 3x32x32": (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(32, 10)), torch.randn(1, 3, 32, 32)),
    }
    try:
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    except ImportError:
        return models
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    models["GPT-2 2 layers, width 64"] = (GPT2LMHeadModel(GPT2Config(
        vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=2)), ids)
    models["Llama 2 layers, width 64 (rotary under @torch.no_grad)"] = (LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)), ids)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | probe (ms) | forward (ms) | ratio | gradient-switch sites |")
    print("|---|---|---|---|---|")
    for name, (model, x) in _models().items():
        model = model.to(DT).eval()
        x = x.to(DT) if x.is_floating_point() else x
        params = dict(model.named_parameters())
        names = tuple(params)
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}

        def call(p, model=model, x=x):
            return functional_call(model, p, (x,))

        def probe(model=model, call=call, params=params, names=names):
            return find_jumps(model, call, params, names)

        def forward(call=call, leaves=leaves):
            with torch.enable_grad():
                return call(leaves)

        got = _cpu({"probe": probe, "forward": forward}, args.repeats)
        sites = [s for s in probe() if " under no_grad (" in s or " under inference_mode (" in s]
        print(f"| {name} | {1e3 * got['probe']:.2f} | {1e3 * got['forward']:.2f} | "
              f"{got['probe'] / got['forward']:.2f} | {len(sites)}{': ' + sites[0] if sites else ''} |")


if __name__ == "__main__":
    main()
