"""Print the errors of the torch built-in layer cases of tests/test_stranger_torch_*.py as one table.

Run from the repository root::

    PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_torch_table.py

Each row trains the case as its test does (float64, the untuned SGD of tests/hard_models_kit.py) and prints what
the kit measures: the replica against the trained model in evaluation mode, the residual share, the
``keep=("train",)`` scores against the slow loop reference (largest relative errors), or the first line of the
error explaind raises. About a minute on a 2-core CPU.
"""

from __future__ import annotations

import warnings

import torch
from hard_models_kit import measure, seeded, train
from test_stranger_torch_attention import Attention, Decoder, Encoder, X, Y
from test_stranger_torch_layers import (
    XI,
    XS,
    XT,
    XV,
    YI,
    YS,
    YT,
    YV,
    Bags,
    Normed,
    Orthogonal,
    Pooled,
    Sequence1d,
    Upsampled,
    activations,
)
from test_stranger_torch_random import Attention as SDPA
from test_stranger_torch_random import DropPath
from test_stranger_torch_random import X as XR
from test_stranger_torch_random import Y as YR

from explaind.exceptions import ExplaindError


def cases() -> list[tuple[str, dict]]:
    """``(name, keyword arguments of run)`` for every row, as the tests build them."""
    image, seq, vec, tok = dict(X=XI, Y=YI), dict(X=XS, Y=YS), dict(X=XV, Y=YV), dict(X=XT, Y=YT)
    rows = [
        ("TransformerEncoder post-norm, padding mask, nested tensors", dict(build=lambda: Encoder(mask=True),
                                                                            panels=4)),
        ("TransformerEncoder pre-norm", dict(build=lambda: Encoder(norm_first=True, nested=False), panels=8)),
        ("TransformerEncoder mean over padding, enable_nested_tensor=False",
         dict(build=lambda: Encoder(mask=True, pool="mean", nested=False), panels=8)),
        ("TransformerDecoder, causal mask", dict(build=Decoder)),
        ("MultiheadAttention(dropout=0.2)", dict(build=Attention)),
        ("MultiheadAttention need_weights=True", dict(build=lambda: Attention(weights=True))),
        ("MultiheadAttention kdim/vdim, add_bias_kv", dict(build=lambda: Attention(kv=True, weights=True))),
        ("F.scaled_dot_product_attention(dropout_p=0.1)", dict(build=SDPA, X=XR, Y=YR)),
        ("F.scaled_dot_product_attention(dropout_p=0.1), capture_random=True",
         dict(build=SDPA, X=XR, Y=YR, recorder={"capture_random": True})),
    ]
    for how in ("torch.rand", "torch.bernoulli", "numpy.random", "random", "rng"):
        rows.append((f"stochastic depth drawn by {how}, capture_random=True",
                     dict(build=lambda h=how: DropPath(h), X=XR, Y=YR, recorder={"capture_random": True})))
    rows += [
        ("Conv2d, MaxPool2d(return_indices), ConvTranspose2d", dict(build=lambda: Pooled(False), **image)),
        ("MaxUnpool2d autoencoder", dict(build=lambda: Pooled(True), **image)),
        ("Conv1d grouped+dilated, depthwise, pointwise", dict(build=Sequence1d, **seq)),
        ("PixelShuffle, interpolate nearest, AdaptiveAvgPool2d", dict(build=lambda: Upsampled("nearest"), **image)),
        ("PixelShuffle, interpolate bilinear, AdaptiveAvgPool2d",
         dict(build=lambda: Upsampled("bilinear"), **image)),
        ("PReLU, Mish, Softplus(beta=2), GELU(tanh), LayerNorm(no affine)", dict(build=activations, panels=8, **vec)),
        ("InstanceNorm2d(affine, running stats), LocalResponseNorm", dict(build=Normed, buffers=True, **image)),
        ("EmbeddingBag sum (offsets, per_sample_weights) + Bilinear", dict(build=lambda: Bags("sum"), panels=16,
                                                                           **tok)),
        ("EmbeddingBag mean (padding_idx) + Bilinear", dict(build=lambda: Bags("mean"), **tok)),
        ("EmbeddingBag max (padding_idx) + Bilinear", dict(build=lambda: Bags("max"), panels=8, **tok)),
    ]
    for kind in ("matrix_exp", "cayley", "householder"):
        rows.append((f"parametrizations.orthogonal({kind})", dict(build=lambda k=kind: Orthogonal(k), **vec)))
    return rows


def run(build, X=X, Y=Y, buffers=False, panels=2, recorder=None) -> str:
    """One row: the measured errors, or the error explaind raised (or the warning it gave) in one line."""
    model = seeded(build)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # ExplaindWarning too: a warned run is reported as such
            warnings.filterwarnings("ignore", message=".*(nested tensors|performance drop).*")
            traj, copies = train(model, "sgd", X[:12], Y[:12], **(recorder or {}))
            got = measure(model, traj, copies, X[12:], buffers=buffers, panels=panels)
    except (ExplaindError, UserWarning) as exc:
        return f"{type(exc).__name__}: {str(exc)[:150]}"
    return (f"replica {got['replica']:.1e} | share {got['residual_share']:.1e} | train vs ref "
            f"{got['train_vs_reference']:.1e}")


def main() -> None:
    torch.set_num_threads(1)
    for name, case in cases():
        print(f"| {name} | {run(**case)} |", flush=True)


if __name__ == "__main__":
    main()
