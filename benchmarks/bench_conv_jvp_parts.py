"""Where one grid evaluation of the GroupNorm ResNet goes: its JVP against the convolutions' own products.

The kink-dense replica of ``benchmarks/bench_kink_dense.py`` spends nearly all of its time in one call per
(step, node): a forward-mode JVP of the ResNet on the step's 64 test inputs, each convolution fused
(``explaind.kernel.fused_jvp``: ``[W; W dot] * a`` and ``W * a dot``). This script times, on that model and
batch in float64 with one torch thread, the whole fused JVP, a bare forward pass, and the parts the JVP cannot
do without: per 16-channel layer the stacked convolution (32 output channels) and the one on the input's
tangent (16), the products alone (``matmul`` of the kernel with patches made beforehand) and the unfolding
alone, plus a GroupNorm by forward mode and in closed form (``explaind.kernel.norm_jvp``) against its bare forward,
and the whole JVP with its group norms by forward mode. Each the median of ``--repeats`` runs, the
ways taking turns, by **CPU time of this process** (``time.process_time``): on a machine shared with other
jobs wall time mostly measures the others.

Run: ``python benchmarks/bench_conv_jvp_parts.py [--repeats 60]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from bench_kink_dense import ResNet
from torch.func import functional_call

from explaind.kernel import fused_jvp as fused_module
from explaind.kernel.fused_jvp import fused_jvp
from explaind.kernel.norm_jvp import group_norm_dual


def patches(x: torch.Tensor) -> torch.Tensor:
    """3x3 patches of ``x (B, C, H, W)`` with padding 1, ``(B, 9 C, H W)`` (the layout of ``F.unfold``)."""
    B, C, H, W = x.shape
    xp = F.pad(x, (1, 1, 1, 1))
    s = xp.stride()
    return xp.as_strided((B, C, 3, 3, H, W), (s[0], s[1], s[2], s[3], s[2], s[3])).reshape(B, 9 * C, H * W)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dt = torch.float64
    model = ResNet().double().eval()
    X = torch.rand(64, 1, 8, 8, dtype=dt)
    point = {k: v.detach() for k, v in model.named_parameters()}
    tangent = {k: 1e-2 * torch.randn_like(v) for k, v in point.items()}
    a, a_dot = torch.randn(64, 16, 8, 8, dtype=dt), torch.randn(64, 16, 8, 8, dtype=dt)
    w = point["b1.c1.weight"]
    stacked = torch.cat([w, tangent["b1.c1.weight"]])
    cols = patches(a)
    gamma, beta = point["b1.n1.weight"], point["b1.n1.bias"]

    def norm_dual():
        with fwad.dual_level():
            return fwad.unpack_dual(F.group_norm(fwad.make_dual(a, a_dot), 4, fwad.make_dual(gamma, gamma),
                                                 fwad.make_dual(beta, beta)))

    def norm_closed():
        with fwad.dual_level():
            return fwad.unpack_dual(group_norm_dual(fwad.make_dual(a, a_dot), 4, fwad.make_dual(gamma, gamma),
                                                    fwad.make_dual(beta, beta)))

    def norms_by_forward_mode():
        rules = dict(fused_module._RULES)
        for f in (F.group_norm, torch.group_norm):
            del fused_module._RULES[f]
        try:
            return fused_jvp(lambda p: functional_call(model, p, (X,)), point, tangent)
        finally:
            fused_module._RULES.update(rules)

    ways = {
        "fused JVP of the ResNet (5 convolutions, 5 group norms in closed form)":
            lambda: fused_jvp(lambda p: functional_call(model, p, (X,)), point, tangent),
        "fused JVP of the ResNet, group norms by forward mode": norms_by_forward_mode,
        "bare forward of the ResNet": lambda: functional_call(model, point, (X,)),
        "stacked convolution [W; W dot] * a (32 out)": lambda: F.conv2d(a, stacked, None, 1, 1),
        "convolution W * a dot (16 out)": lambda: F.conv2d(a_dot, w, None, 1, 1),
        "products alone, 32 out (patches made beforehand)": lambda: torch.matmul(stacked.reshape(32, -1), cols),
        "products alone, 16 out": lambda: torch.matmul(w.reshape(16, -1), cols),
        "unfolding alone (3x3 patches)": lambda: patches(a),
        "group norm by forward mode": norm_dual,
        "group norm in closed form (explaind.kernel.norm_jvp)": norm_closed,
        "group norm, bare forward": lambda: F.group_norm(a, 4, gamma, beta),
    }
    spent: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            t0 = time.process_time()
            fn()
            spent[name].append(time.process_time() - t0)
    print(f"GroupNorm ResNet, 64 inputs, float64, 1 thread; CPU ms per call, median of {args.repeats}; "
          f"load {os.getloadavg()[0]:.1f}\n| part | ms |\n|---|---|")
    for name, times in spent.items():
        print(f"| {name} | {1e3 * statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
