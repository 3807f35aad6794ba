"""torch's built-in layers the repository's models do not use, trained as a new user would.

Convolutions of every shape (transposed, grouped and dilated 1-D, depthwise), upsampling (``PixelShuffle``,
``F.interpolate`` nearest and bilinear), pooling (``AdaptiveAvgPool2d``, ``MaxPool2d``), activations (``PReLU``,
``Mish``, ``Softplus(beta)``, ``GELU(approximate="tanh")``), norms (``InstanceNorm2d`` with running statistics,
``LocalResponseNorm``, ``LayerNorm`` without affine), ``EmbeddingBag`` with ``Bilinear``, and the ``orthogonal``
parametrization: exact in float64 (tests/hard_models_kit.py). Two needed a fix: ``PReLU`` crashed the engine's
Jacobians (torch's backward of ``prelu`` under ``vmap(jacrev)``) and ``EmbeddingBag`` has no forward-mode
derivative; both now run as plain operations (explaind/kernel/rewrites.py). ``MaxUnpool2d`` makes the model jump
where a window's maximum moves, which no path integral crosses: the error stays in ``quadrature_error`` and the
warning names the module and the fix.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hard_models_kit import data, run_exact, seeded, train
from reference import rel_err
from torch import nn
from torch.nn.utils import parametrizations

import explaind
from explaind.exceptions import ExplaindWarning, UnsupportedModelError
from explaind.kernel.rewrites import _embedding_bag

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]

XI, YI = data(14, (1, 4, 4), 1)
XS, YS = data(14, (4, 7), 2)
XV, YV = data(14, (4,), 3)
XT, YT = data(14, (5,), 4, vocab=10)


class Pooled(nn.Module):
    """Conv2d, ``MaxPool2d(return_indices=True)``, then ``MaxUnpool2d`` (``unpool``) or not, two ConvTranspose2d."""

    def __init__(self, unpool: bool):
        super().__init__()
        self.c, self.pool = nn.Conv2d(1, 3, 3, padding=1), nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2) if unpool else None
        self.d, self.up = nn.ConvTranspose2d(3, 2, 3, padding=1), nn.ConvTranspose2d(2, 2, 2, stride=2)
        self.head = nn.Linear(2 * (8 if unpool else 4) ** 2, 3)

    def forward(self, x):
        h, idx = self.pool(torch.tanh(self.c(x)))
        if self.unpool is not None:
            h = self.unpool(h, idx, output_size=x.shape[-2:])
        return self.head(self.up(torch.tanh(self.d(h))).flatten(1))


class Sequence1d(nn.Module):
    """Grouped and dilated Conv1d, a depthwise Conv1d, a pointwise one, a mean over time."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(4, 8, 3, groups=2, dilation=2, padding=2)
        self.dw, self.pw, self.head = nn.Conv1d(8, 8, 3, groups=8, padding=1), nn.Conv1d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.pw(F.silu(self.dw(F.gelu(self.a(x))))).mean(-1))


class Upsampled(nn.Module):
    """Conv2d, depthwise Conv2d, ``PixelShuffle(2)``, ``F.interpolate(mode)``, Conv2d, ``AdaptiveAvgPool2d``."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.c, self.dw = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.shuffle, self.c2 = nn.PixelShuffle(2), nn.Conv2d(2, 4, 3)
        self.pool, self.head = nn.AdaptiveAvgPool2d((2, 3)), nn.Linear(24, 3)

    def forward(self, x):
        h = self.shuffle(torch.tanh(self.dw(torch.tanh(self.c(x)))))  # (n, 2, 8, 8)
        if self.mode == "bilinear":
            h = F.interpolate(h, scale_factor=0.75, mode="bilinear", align_corners=False)
        else:
            h = F.interpolate(h, scale_factor=0.5, mode="nearest")
        return self.head(self.pool(torch.tanh(self.c2(h))).flatten(1))


def activations() -> nn.Sequential:
    """``PReLU(6)``, ``Mish``, ``Softplus(beta=2)``, ``GELU(tanh)`` and a ``LayerNorm`` without affine."""
    return nn.Sequential(nn.Linear(4, 6), nn.PReLU(6, init=0.2), nn.Linear(6, 6), nn.Mish(), nn.Linear(6, 6),
                         nn.Softplus(beta=2.0), nn.GELU(approximate="tanh"), nn.LayerNorm(6, elementwise_affine=False),
                         nn.Linear(6, 3))


class Normed(nn.Module):
    """Conv2d, ``InstanceNorm2d(affine, track_running_stats)``, Mish, ``LocalResponseNorm(3)``."""

    def __init__(self):
        super().__init__()
        self.c, self.norm = nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.lrn, self.head = nn.LocalResponseNorm(3), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.lrn(F.mish(self.norm(self.c(x)))).flatten(1))


class Bags(nn.Module):
    """``EmbeddingBag`` of token rows, combined by ``Bilinear``.

    ``"sum"``: a 1-D input with offsets and per-sample weights, and the 2-D input (one bag per row);
    ``"mean"``/``"max"``: the 2-D input with a padding index, and again without it (``max``: the 2-D form only).
    """

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.bag = nn.EmbeddingBag(10, 6, mode=mode, padding_idx=None if mode == "sum" else 0)
        self.bil, self.head = nn.Bilinear(6, 6, 4), nn.Linear(4, 3)

    def forward(self, x):
        if self.mode == "sum":
            weights = ((x % 3).to(self.bag.weight.dtype) + 0.5).reshape(-1)
            offsets = torch.arange(0, x.numel(), x.shape[1])
            e, e2 = self.bag(x.reshape(-1), offsets, per_sample_weights=weights), self.bag(x)
        else:
            e, e2 = self.bag(x), self.bag(x[:, 1:])
        return self.head(torch.tanh(self.bil(e, e2)))


class Orthogonal(nn.Module):
    """A hidden ``Linear(6, 6)`` kept orthogonal by ``parametrizations.orthogonal`` (``map``)."""

    def __init__(self, map: str):
        super().__init__()
        self.a, self.b, self.h = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        parametrizations.orthogonal(self.b, orthogonal_map=map)

    def forward(self, x):
        return self.h(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("build, X, Y", [
    (lambda: Pooled(unpool=False), XI, YI),
    (Sequence1d, XS, YS),
    (lambda: Upsampled("nearest"), XI, YI),
    (lambda: Upsampled("bilinear"), XI, YI),
], ids=["maxpool-convtranspose", "conv1d-grouped-dilated-depthwise", "pixelshuffle-nearest-adaptivepool",
        "pixelshuffle-bilinear-adaptivepool"])
def test_convolutions_upsampling_and_pooling_are_exact(build, X, Y):
    run_exact(build, "sgd", X, Y)


def test_activations_prelu_mish_softplus_gelu_tanh_are_exact():
    """PReLU before the fix: RuntimeError 'The size of tensor a (2) must match ...' from the Jacobians."""
    run_exact(activations, "sgd", XV, YV, panels=8)


def test_instance_norm_with_running_statistics_and_local_response_norm_are_exact():
    run_exact(Normed, "sgd", XI, YI, buffers=True)


@pytest.mark.parametrize("mode, panels", [("sum", 16), ("mean", 2), ("max", 8)])
def test_embedding_bag_with_bilinear_is_exact(mode, panels):
    """Before the fix: NotImplementedError, forward AD of _embedding_bag."""
    run_exact(lambda: Bags(mode), "sgd", XT, YT, panels=panels)


def test_embedding_bags_plain_form_equals_torchs_kernel():
    """Every mode, 1-D with offsets (an empty bag, include_last_offset) and 2-D, padding, per-sample weights."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    flat, rows = torch.randint(0, 10, (9,), generator=gen), torch.randint(0, 10, (3, 5), generator=gen)
    offsets = torch.tensor([0, 2, 2, 6])
    for mode in ("sum", "mean", "max"):
        for pad in (None, 3, -1):
            for last in (False, True):
                kw = dict(mode=mode, padding_idx=pad, include_last_offset=last)
                got = _embedding_bag(flat, weight, offsets, **kw)
                assert torch.allclose(got, F.embedding_bag(flat, weight, offsets, **kw), rtol=0, atol=1e-13)
            got = _embedding_bag(rows, weight, mode=mode, padding_idx=pad)
            assert torch.allclose(got, F.embedding_bag(rows, weight, mode=mode, padding_idx=pad), rtol=0, atol=1e-13)
    psw = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    got = _embedding_bag(rows, weight, mode="sum", per_sample_weights=psw)
    assert torch.allclose(got, F.embedding_bag(rows, weight, mode="sum", per_sample_weights=psw), rtol=0, atol=1e-13)


def test_embedding_bag_with_max_norm_is_refused_by_the_recorder_before_its_table_changes():
    """``max_norm`` renormalises the looked-up rows of the table in place at every forward."""
    model = seeded(lambda: Bags("mean"))
    model.bag.max_norm = 1.0
    with pytest.raises(UnsupportedModelError, match=r"the embeddings \['bag \(max_norm=1.0\)'\].*nn.EmbeddingBag with "
                                                    r"max_norm=None"):
        explaind.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), loss="cross_entropy")


@pytest.mark.parametrize("map", ["matrix_exp", "cayley", "householder"])
def test_orthogonal_parametrization_is_exact(map):
    run_exact(lambda: Orthogonal(map), "sgd", XV, YV)


def test_max_unpooling_jumps_are_warned_about_naming_the_module_and_kept_in_quadrature_error():
    """The replica still equals the trained model (the jump is an explicit term), and the warning says why."""
    model = seeded(lambda: Pooled(unpool=True))
    traj, _ = train(model, "sgd", XI[:12], YI[:12])
    with pytest.warns(ExplaindWarning, match=r"\['unpool \(MaxUnpool2d\)'\], whose output jumps.*Fix: upsample"):
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(XI[12:])
    model.eval()
    with torch.no_grad():
        trained = model(XI[12:])
    assert rel_err(att.total().numpy(), trained.numpy()) <= 1e-9
    jump = float(torch.as_tensor(att.quadrature_error).abs().max())
    assert jump > 1e-3 * float(trained.abs().max())  # the jump is there, and reported, not hidden


def test_prelu_as_a_function_in_forward_is_rewritten_when_the_model_holds_a_prelu_module():
    """The rewrite is switched on by the module and applies to every ``F.prelu`` of the forward."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.p, self.b = nn.Linear(4, 6), nn.PReLU(), nn.Linear(6, 3)
            self.slope = nn.Parameter(torch.full((6,), 0.1))

        def forward(self, x):
            return self.b(F.prelu(self.p(self.a(x)), self.slope))  # its kinks are the module's

    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        run_exact(Twice, "sgd", XV, YV)
