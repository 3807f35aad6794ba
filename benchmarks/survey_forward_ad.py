"""Which common functional operations ``torch.func`` can transform the way explaind evaluates models.

explaind evaluates a model's forward under ``torch.func.jvp`` (path derivatives), one input at a time under
``torch.func.vmap`` of ``jvp``, and takes Jacobians one input at a time with ``vmap`` of ``jacrev``
(docs/engine.md §2). This script runs each operation of a list of about 60 that models call, in float64, under
the three transforms, without and with explaind's rewrite mode (:class:`explaind.kernel.rewrites.FusedKernelRewrite`),
and prints one row per operation: ``ok``, or the first words of torch's error. A ``jvp`` that runs but disagrees
with a central finite difference by more than ``1e-6`` relative is printed as ``inexact``.

``F.hardsigmoid`` shows ``ok`` although torch's derivative of it is ``float32(1/6)`` (3e-8 off, below the
finite-difference threshold): explaind rewrites it all the same (docs/engine.md §2).

Run: ``OMP_NUM_THREADS=1 python -W ignore benchmarks/survey_forward_ad.py [--only NAME]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import jacrev, jvp, vmap

from explaind.kernel.rewrites import FusedKernelRewrite

DT = torch.float64


def _img(c: int = 2, h: int = 6, w: int = 6) -> torch.Tensor:
    return torch.randn(c, h, w, dtype=DT)


def _theta() -> torch.Tensor:
    return torch.eye(2, 3, dtype=DT) + 0.1 * torch.randn(2, 3, dtype=DT)


#: name -> (one sample's input, function of one sample)
OPS: dict[str, tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "grid_sample bilinear": (_img, lambda x: F.grid_sample(
        x[None], F.affine_grid(_FIXED_THETA[None], [1, 2, 6, 6], align_corners=False), align_corners=False)),
    "grid_sample (grid moves)": (lambda: torch.randn(2, 3, dtype=DT) * 0.1, lambda t: F.grid_sample(
        _FIXED_IMG[None], F.affine_grid((torch.eye(2, 3, dtype=DT) + t)[None], [1, 2, 6, 6], align_corners=False),
        align_corners=False)),
    "grid_sample nearest": (_img, lambda x: F.grid_sample(x[None], _FIXED_GRID, mode="nearest", align_corners=False)),
    "grid_sample bicubic": (_img, lambda x: F.grid_sample(x[None], _FIXED_GRID, mode="bicubic", align_corners=False)),
    "grid_sample 5-D": (lambda: torch.randn(1, 3, 4, 4, dtype=DT), lambda x: F.grid_sample(
        x[None], F.affine_grid(torch.eye(3, 4, dtype=DT)[None] * 0.9, [1, 1, 3, 4, 4], align_corners=True),
        align_corners=True)),
    "affine_grid": (lambda: torch.randn(2, 3, dtype=DT), lambda t: F.affine_grid(t[None], [1, 1, 4, 4],
                                                                                 align_corners=False)),
    "cdist p=2": (lambda: torch.randn(5, 3, dtype=DT), lambda a: torch.cdist(a, _FIXED_B)),
    "cdist p=1": (lambda: torch.randn(5, 3, dtype=DT), lambda a: torch.cdist(a, _FIXED_B, p=1.0)),
    "cdist p=3": (lambda: torch.randn(5, 3, dtype=DT), lambda a: torch.cdist(a, _FIXED_B, p=3.0)),
    "cdist p=inf": (lambda: torch.randn(5, 3, dtype=DT), lambda a: torch.cdist(a, _FIXED_B, p=float("inf"))),
    "cdist mm": (lambda: torch.randn(30, 3, dtype=DT), lambda a: torch.cdist(
        a, _FIXED_B, compute_mode="use_mm_for_euclid_dist")),
    "pdist": (lambda: torch.randn(5, 3, dtype=DT), lambda a: F.pdist(a)),
    "hardsigmoid": (lambda: torch.randn(7, dtype=DT) * 4, F.hardsigmoid),
    "hardswish": (lambda: torch.randn(7, dtype=DT) * 4, F.hardswish),
    "max_pool2d": (_img, lambda x: F.max_pool2d(x, 2)),
    "max_pool2d indices": (_img, lambda x: F.max_pool2d(x, 2, return_indices=True)[0]),
    "max_unpool2d": (_img, lambda x: F.max_unpool2d(*F.max_pool2d(x[None], 2, return_indices=True), 2)),
    "max_pool1d": (lambda: torch.randn(2, 8, dtype=DT), lambda x: F.max_pool1d(x, 2)),
    "max_pool3d": (lambda: torch.randn(1, 4, 4, 4, dtype=DT), lambda x: F.max_pool3d(x, 2)),
    "avg_pool2d": (_img, lambda x: F.avg_pool2d(x, 2)),
    "adaptive_avg_pool2d": (_img, lambda x: F.adaptive_avg_pool2d(x, 4)),
    "adaptive_max_pool2d": (_img, lambda x: F.adaptive_max_pool2d(x, 4)),
    "lp_pool2d": (_img, lambda x: F.lp_pool2d(x, 2.0, 2)),
    "fractional_max_pool2d": (_img, lambda x: F.fractional_max_pool2d(x[None], 2, output_size=3,
                                                                      _random_samples=_FIXED_SAMPLES)),
    "fold": (lambda: torch.randn(8, 9, dtype=DT), lambda x: F.fold(x, (4, 4), 2)),
    "unfold": (_img, lambda x: F.unfold(x[None], 2)),
    "interpolate bilinear": (_img, lambda x: F.interpolate(x[None], scale_factor=2, mode="bilinear")),
    "interpolate bicubic": (_img, lambda x: F.interpolate(x[None], scale_factor=2, mode="bicubic")),
    "interpolate antialias": (_img, lambda x: F.interpolate(x[None], size=3, mode="bilinear", antialias=True)),
    "interpolate nearest": (_img, lambda x: F.interpolate(x[None], scale_factor=2)),
    "interpolate trilinear": (lambda: torch.randn(1, 3, 3, 3, dtype=DT),
                              lambda x: F.interpolate(x[None], scale_factor=2, mode="trilinear")),
    "pixel_shuffle": (lambda: torch.randn(4, 3, 3, dtype=DT), lambda x: F.pixel_shuffle(x, 2)),
    "pixel_unshuffle": (_img, lambda x: F.pixel_unshuffle(x, 2)),
    "cummax": (lambda: torch.randn(7, dtype=DT), lambda x: torch.cummax(x, 0)[0]),
    "cummin": (lambda: torch.randn(7, dtype=DT), lambda x: torch.cummin(x, 0)[0]),
    "cumsum": (lambda: torch.randn(7, dtype=DT), lambda x: torch.cumsum(x, 0)),
    "cumprod": (lambda: torch.randn(7, dtype=DT), lambda x: torch.cumprod(x, 0)),
    "logcumsumexp": (lambda: torch.randn(7, dtype=DT), lambda x: torch.logcumsumexp(x, 0)),
    "local_response_norm": (_img, lambda x: F.local_response_norm(x[None], 2)),
    "normalize": (lambda: torch.randn(5, dtype=DT), lambda x: F.normalize(x, dim=0)),
    "embedding max_norm": (lambda: torch.randn(6, 3, dtype=DT), lambda w: F.embedding(
        torch.tensor([0, 2, 5]), w, max_norm=1.0)),
    "embedding": (lambda: torch.randn(6, 3, dtype=DT), lambda w: F.embedding(torch.tensor([0, 2, 5]), w)),
    "embedding_bag": (lambda: torch.randn(6, 3, dtype=DT), lambda w: F.embedding_bag(
        torch.tensor([[0, 2], [5, 1]]), w)),
    "one_hot @": (lambda: torch.randn(4, 3, dtype=DT), lambda w: F.one_hot(torch.tensor([1, 3]), 4).to(DT) @ w),
    "linalg.norm": (lambda: torch.randn(4, 3, dtype=DT), lambda x: torch.linalg.norm(x)),
    "linalg.vector_norm": (lambda: torch.randn(4, 3, dtype=DT), lambda x: torch.linalg.vector_norm(x, dim=1)),
    "linalg.matrix_norm nuc": (lambda: torch.randn(4, 3, dtype=DT), lambda x: torch.linalg.matrix_norm(x, "nuc")),
    "linalg.svdvals": (lambda: torch.randn(4, 3, dtype=DT), torch.linalg.svdvals),
    "linalg.qr": (lambda: torch.randn(4, 3, dtype=DT), lambda x: torch.linalg.qr(x)[0]),
    "linalg.eigh": (lambda: torch.randn(3, 3, dtype=DT), lambda x: torch.linalg.eigh(x + x.T)[0]),
    "linalg.solve": (lambda: torch.randn(3, 3, dtype=DT), lambda x: torch.linalg.solve(x + 3 * torch.eye(3, dtype=DT),
                                                                                     torch.ones(3, dtype=DT))),
    "linalg.inv": (lambda: torch.randn(3, 3, dtype=DT), lambda x: torch.linalg.inv(x + 3 * torch.eye(3, dtype=DT))),
    "linalg.det": (lambda: torch.randn(3, 3, dtype=DT), torch.linalg.det),
    "linalg.slogdet": (lambda: torch.randn(3, 3, dtype=DT), lambda x: torch.linalg.slogdet(x)[1]),
    "linalg.cholesky": (lambda: torch.randn(3, 3, dtype=DT), lambda x: torch.linalg.cholesky(
        x @ x.T + torch.eye(3, dtype=DT))),
    "matrix_exp": (lambda: torch.randn(3, 3, dtype=DT) * 0.3, torch.linalg.matrix_exp),
    "stft": (lambda: torch.randn(32, dtype=DT), lambda x: torch.stft(
        x, 8, window=torch.hann_window(8, dtype=DT), return_complex=True).abs()),
    "fft.rfft": (lambda: torch.randn(8, dtype=DT), lambda x: torch.fft.rfft(x).abs()),
    "topk": (lambda: torch.randn(7, dtype=DT), lambda x: torch.topk(x, 3)[0]),
    "sort": (lambda: torch.randn(7, dtype=DT), lambda x: torch.sort(x)[0]),
    "kthvalue": (lambda: torch.randn(7, dtype=DT), lambda x: torch.kthvalue(x, 3)[0]),
    "median": (lambda: torch.randn(7, dtype=DT), lambda x: torch.median(x)),
    "logsumexp": (lambda: torch.randn(7, dtype=DT), lambda x: torch.logsumexp(x, 0)),
    "gumbel-free softmax": (lambda: torch.randn(7, dtype=DT), lambda x: F.softmax(x, 0)),
    "glu": (lambda: torch.randn(8, dtype=DT), lambda x: F.glu(x, 0)),
    "ctc_loss": (lambda: torch.randn(6, 1, 4, dtype=DT).log_softmax(-1), lambda lp: F.ctc_loss(
        lp, torch.tensor([[1, 2]]), torch.tensor([6]), torch.tensor([2]))),
    "channel_shuffle": (lambda: torch.randn(4, 3, 3, dtype=DT), lambda x: F.channel_shuffle(x[None], 2)),
    "group_norm": (_img, lambda x: F.group_norm(x[None], 2)),
    "instance_norm": (_img, lambda x: F.instance_norm(x[None])),
    "rms_norm": (lambda: torch.randn(4, 3, dtype=DT), lambda x: F.rms_norm(x, (3,))),
    "trace": (lambda: torch.randn(3, 3, dtype=DT), torch.trace),
    "diag_embed": (lambda: torch.randn(3, dtype=DT), torch.diag_embed),
    "searchsorted-free bucketize@": (lambda: torch.randn(5, dtype=DT), lambda x: x * torch.bucketize(
        x.detach(), torch.tensor([0.0], dtype=DT))),
    "prelu": (lambda: torch.randn(5, 2, dtype=DT), lambda x: F.prelu(x, torch.tensor([0.2, 0.3], dtype=DT))),
    "rrelu eval": (lambda: torch.randn(7, dtype=DT), lambda x: F.rrelu(x, training=False)),
    "celu": (lambda: torch.randn(7, dtype=DT), F.celu),
    "softplus": (lambda: torch.randn(7, dtype=DT), F.softplus),
    "mish": (lambda: torch.randn(7, dtype=DT), F.mish),
    "gelu tanh": (lambda: torch.randn(7, dtype=DT), lambda x: F.gelu(x, approximate="tanh")),
    "scaled_dot_product_attention": (lambda: torch.randn(1, 4, 3, dtype=DT), lambda q: F.scaled_dot_product_attention(
        q, q, q)),
    "cosine_similarity": (lambda: torch.randn(5, dtype=DT), lambda x: F.cosine_similarity(x, _FIXED_B[0].repeat(2)[:5],
                                                                                         dim=0)),
    "pairwise_distance": (lambda: torch.randn(3, dtype=DT), lambda x: F.pairwise_distance(x[None], _FIXED_B[:1])),
}

torch.manual_seed(0)
_FIXED_THETA = torch.eye(2, 3, dtype=DT) + 0.1 * torch.randn(2, 3, dtype=DT)
_FIXED_IMG = torch.randn(2, 6, 6, dtype=DT)
_FIXED_GRID = F.affine_grid(_FIXED_THETA[None], [1, 2, 6, 6], align_corners=False)
_FIXED_B = torch.randn(4, 3, dtype=DT)
_FIXED_SAMPLES = torch.rand(1, 2, 2, dtype=DT)


def _flat(out: torch.Tensor) -> torch.Tensor:
    return out.reshape(-1)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:70]}"


def check(make: Callable[[], torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, str]:
    """``ok`` / ``inexact`` / the error, for ``jvp``, ``vmap(jvp)`` and ``vmap(jacrev)``."""
    torch.manual_seed(1)
    x, v = make(), make()
    xs, vs = torch.stack([x, make()]), torch.stack([v, make()])
    out: dict[str, str] = {}

    def run_jvp() -> str:
        _, t = jvp(fn, (x,), (v,))
        h = 1e-6
        fd = (fn(x + h * v) - fn(x - h * v)) / (2 * h)
        err = float((t - fd).abs().max()) / max(float(fd.abs().max()), 1e-12)
        return "ok" if err < 1e-6 else f"inexact {err:.1e}"

    for name, call in [("jvp", run_jvp),
                       ("vmap(jvp)", lambda: (vmap(lambda a, b: jvp(fn, (a,), (b,))[1])(xs, vs), "ok")[1]),
                       ("vmap(jacrev)", lambda: (vmap(jacrev(lambda a: _flat(fn(a))))(xs), "ok")[1])]:
        try:
            out[name] = call()
        except Exception as exc:  # noqa: BLE001 - the survey reports every failure
            out[name] = _short(exc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, float64")
    print("| operation | jvp | vmap(jvp) | vmap(jacrev) | rewritten: jvp | vmap(jvp) | vmap(jacrev) |")
    print("|---|---|---|---|---|---|---|")
    for name, (make, fn) in OPS.items():
        if args.only and args.only not in name:
            continue
        plain = check(make, fn)
        with FusedKernelRewrite():
            rw = check(make, fn)
        print(f"| {name} | {plain['jvp']} | {plain['vmap(jvp)']} | {plain['vmap(jacrev)']} | {rw['jvp']} | "
              f"{rw['vmap(jvp)']} | {rw['vmap(jacrev)']} |", flush=True)


if __name__ == "__main__":
    main()
