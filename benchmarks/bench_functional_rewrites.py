"""Cost of finding and running the functional rewrites (explaind/kernel/functional_rewrites.py).

Two tables, CPU seconds (``time.process_time``, the median of ``--repeats`` calls, the variants alternated):

1. **Detection** on models without a rewritten operation (an MLP 784-256-256-10 and a small CNN, float64, batch
   ``--batch``): one ``torch.func.jvp`` of :class:`explaind.kernel.explained.FunctionalModel` in the parameters
   (the engine's evaluation) after its census (no mode: what every evaluation costs), the same call with the
   rewrite mode forced on (what a ``TorchFunctionMode`` on every evaluation would cost), and the census itself (the
   first call, once per model), each as a ratio to the model's plain forward under ``jvp`` without explaind.
2. **The scan** (explaind/kernel/rewrite_scan.py, when the tree has it): CPU milliseconds of
   ``reachable_rewrite`` on each model (once per ``FunctionalModel``, before its first forward), next to building
   the ``FunctionalModel`` (which includes it), for the two models above and GPT-2 / BERT built from a config.
3. **Rewrites** against torch's fused kernel: the forward of ``F.grid_sample`` (bilinear, zeros, ``(32, 3, 28, 28)``
   sampled at a ``(32, 28, 28)`` grid) and of ``torch.cdist`` (``(64, 64)`` against ``(10, 64)``: the direct form,
   and ``(512, 64)`` where torch takes its matrix-product form), and the rewrite's ``jvp`` (torch has none).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_functional_rewrites.py [--repeats 30] [--batch 64]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from explaind.kernel import functional_rewrites as fr
from explaind.kernel.explained import FunctionalModel

DT = torch.float64


def _cpu(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median CPU seconds per call of each function, the functions alternated."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 11 * 11, 10))
    return {"MLP 784-256-256-10": (mlp, torch.randn(1, 784)), "CNN 2 conv + pool": (cnn, torch.randn(1, 1, 28, 28))}


def detection(repeats: int, batch: int) -> None:
    print("| model | plain jvp (s) | after census, no mode | mode on every call | census (once) |")
    print("|---|---|---|---|---|")
    for name, (model, x1) in _models().items():
        model = model.to(DT)
        x = x1.to(DT).repeat(batch, *([1] * (x1.dim() - 1)))
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        tangents = {n: torch.randn_like(p) for n, p in params.items()}

        def plain(model=model, x=x, params=params, tangents=tangents):
            return jvp(lambda th: functional_call(model, th, (x,)), (params,), (tangents,))

        def fresh(model=model):
            return FunctionalModel(model, {}, None, torch.device("cpu"), DT)

        fm = fresh()
        fm(params, x)  # the census
        assert fm._rewrite is False

        def engine(fm=fm, x=x, params=params, tangents=tangents):
            return jvp(lambda th: fm(th, x), (params,), (tangents,))

        forced = fresh()
        forced._rewrite = True  # the mode on every call

        def moded(fm=forced, x=x, params=params, tangents=tangents):
            return jvp(lambda th: fm(th, x), (params,), (tangents,))

        census_models = [fresh() for _ in range(repeats + 1)]

        def census(models=census_models, x=x, params=params, tangents=tangents):
            fm = models.pop()
            return jvp(lambda th: fm(th, x), (params,), (tangents,))

        t = _cpu({"plain": plain, "engine": engine, "moded": moded, "census": census}, repeats)
        print(f"| {name}, batch {batch} | {t['plain']:.2e} | {t['engine'] / t['plain']:.3f}x | "
              f"{t['moded'] / t['plain']:.3f}x | {t['census'] / t['plain']:.3f}x |", flush=True)


def scan(repeats: int) -> None:
    try:
        from explaind.kernel.rewrite_scan import reachable_rewrite
    except ImportError:
        print("(no explaind/kernel/rewrite_scan.py in this tree)")
        return
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    models = {name: model for name, (model, _) in _models().items()}
    models["GPT-2 2 layers, width 64"] = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=64,
                                                                    n_layer=2, n_head=2))
    models["BERT 2 layers, width 32"] = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
    print("| model | scan (ms) | finds | building FunctionalModel (ms) |")
    print("|---|---|---|---|")
    for name, model in models.items():
        model = model.to(DT)
        t = _cpu({"scan": lambda m=model: reachable_rewrite(m),
                  "build": lambda m=model: FunctionalModel(m, {}, None, torch.device("cpu"), DT)}, repeats)
        print(f"| {name} | {t['scan'] * 1e3:.2f} | {reachable_rewrite(model)} | {t['build'] * 1e3:.2f} |", flush=True)


def rewrites(repeats: int) -> None:
    torch.manual_seed(1)
    img = torch.randn(32, 3, 28, 28, dtype=DT)
    theta = torch.eye(2, 3, dtype=DT).expand(32, 2, 3) + 0.1 * torch.randn(32, 2, 3, dtype=DT)
    grid = F.affine_grid(theta, [32, 3, 28, 28], align_corners=False)
    a, b, big = torch.randn(64, 64, dtype=DT), torch.randn(10, 64, dtype=DT), torch.randn(512, 64, dtype=DT)
    cases = {
        "F.grid_sample bilinear (32, 3, 28, 28)": (lambda: F.grid_sample(img, grid, align_corners=False),
                                                   lambda: fr.grid_sample(img, grid, align_corners=False),
                                                   lambda: jvp(lambda g: fr.grid_sample(img, g, align_corners=False),
                                                               (grid,), (grid,))),
        "torch.cdist p=2 (64, 64) vs (10, 64)": (lambda: torch.cdist(a, b), lambda: fr.cdist(a, b),
                                                 lambda: jvp(lambda u: fr.cdist(u, b), (a,), (a,))),
        "torch.cdist p=1 (64, 64) vs (10, 64)": (lambda: torch.cdist(a, b, p=1.0), lambda: fr.cdist(a, b, p=1.0),
                                                 lambda: jvp(lambda u: fr.cdist(u, b, p=1.0), (a,), (a,))),
        "torch.cdist p=2 (512, 64) vs (10, 64), mm form": (
            lambda: torch.cdist(big, b), lambda: fr.cdist(big, b), lambda: jvp(lambda u: fr.cdist(u, b), (big,),
                                                                              (big,))),
    }
    print("| operation | torch forward (s) | rewrite forward | rewrite jvp |")
    print("|---|---|---|---|")
    for name, (theirs, ours, ours_jvp) in cases.items():
        t = _cpu({"torch": theirs, "ours": ours, "jvp": ours_jvp}, repeats)
        print(f"| {name} | {t['torch']:.2e} | {t['ours'] / t['torch']:.2f}x | {t['jvp'] / t['torch']:.2f}x |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    detection(args.repeats, args.batch)
    print()
    scan(args.repeats)
    print()
    rewrites(args.repeats)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
