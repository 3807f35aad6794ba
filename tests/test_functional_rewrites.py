"""Functional operations without a forward-mode derivative, rewritten (explaind/kernel/functional_rewrites.py).

Each rewrite against torch's op in float64: the value (<= 1e-12 relative), and its ``torch.func.jvp`` against the
directional derivative of torch's own backward (the reverse-mode Jacobian of torch's kernel, which torch has), and
against central finite differences. Then the census of explaind.kernel.explained.FunctionalModel (a model that needs
no rewrite runs with no mode after its first forward; one that calls F.hardsigmoid as a function is found), the
retry when a branch the census did not take meets such an operation, and end to end: a spatial transformer
(F.affine_grid + F.grid_sample) and a prototype model (torch.cdist), recorded and explained exactly.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from _round5_kit import XI, XV, YI, YV, KinkMarks, KinkReference, assert_exact, figures, fit
from torch import nn
from torch.func import jvp, vmap

from explaind.exceptions import ConfigError
from explaind.kernel import functional_rewrites as fr
from explaind.kernel.explained import FunctionalModel
from explaind.kernel.rewrites import FusedKernelRewrite

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


def _torch_directional(fn, args: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``J v`` of torch's own op from its reverse-mode Jacobian."""
    jac = torch.autograd.functional.jacobian(fn, args)
    out_shape = fn(*args).shape
    total = torch.zeros(out_shape, dtype=DT)
    for j, t in zip(jac, tangents):
        total = total + (j.reshape(out_shape.numel(), -1) @ t.reshape(-1)).reshape(out_shape)
    return total


def _check(torch_fn, ours, args, tangents, fd: bool = True) -> None:
    """Value and jvp of ``ours`` against ``torch_fn`` (value, backward) and finite differences."""
    value, tangent = jvp(ours, args, tangents)
    assert _rel(value, torch_fn(*args)) <= 1e-12
    assert _rel(tangent, _torch_directional(torch_fn, args, tangents)) <= 1e-12
    if fd:
        h = 1e-6
        plus = torch_fn(*[a + h * t for a, t in zip(args, tangents)])
        minus = torch_fn(*[a - h * t for a, t in zip(args, tangents)])
        assert _rel(tangent, (plus - minus) / (2 * h)) <= 1e-7  # O(h^2) truncation, O(eps / h) rounding


def _grid(shape: tuple[int, ...], k: int, seed: int) -> torch.Tensor:
    """Random grid coordinates in [-1.3, 1.3] (outside the image too), away from the pixel lattice."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, k, generator=gen, dtype=DT) * 2 - 1) * 1.3


@pytest.mark.parametrize(("mode", "padding", "align", "k"), [
    *itertools.product(["bilinear", "nearest"], ["zeros", "border", "reflection"], [False, True], [2, 3]),
    *itertools.product(["bicubic"], ["zeros", "border", "reflection"], [False, True], [2])])
def test_grid_sample_value_and_jvp_in_the_image_and_the_grid(mode, padding, align, k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(2, 3, *([5] * k), generator=gen, dtype=DT)
    grid = _grid((2, *([4] * k)), k, seed=1)
    dx, dg = torch.randn(x.shape, generator=gen, dtype=DT), torch.randn(grid.shape, generator=gen, dtype=DT)

    def theirs(a, g):
        return F.grid_sample(a, g, mode=mode, padding_mode=padding, align_corners=align)

    def ours(a, g):
        return fr.grid_sample(a, g, mode=mode, padding_mode=padding, align_corners=align)

    _check(theirs, ours, (x, grid), (dx, dg), fd=mode != "nearest")
    if mode == "nearest":  # piecewise constant in the grid: torch's gradient and ours are 0
        _, t = jvp(lambda g: ours(x, g), (grid,), (dg,))
        assert torch.count_nonzero(t) == 0


def test_grid_sample_reflection_folds_far_outside_the_image():
    """Coordinates up to 7 image widths away: several reflections, even and odd."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 4, 6, generator=gen, dtype=DT)
    grid = (torch.rand(1, 5, 5, 2, generator=gen, dtype=DT) * 2 - 1) * 7
    for align in (False, True):
        def theirs(a, g, align=align):
            return F.grid_sample(a, g, padding_mode="reflection", align_corners=align)

        def ours(a, g, align=align):
            return fr.grid_sample(a, g, padding_mode="reflection", align_corners=align)

        _check(theirs, ours, (x, grid), (torch.randn_like(x), torch.randn_like(grid)))


def test_grid_sample_under_vmap_of_jvp_and_in_the_mode():
    """One input at a time (the engine's vmap) and through the rewrite mode, as models call it."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 5, 5, generator=gen, dtype=DT)
    grid = _grid((3, 4, 4), 2, seed=5)
    dg = torch.randn(grid.shape, generator=gen, dtype=DT)

    def one(a, g):
        return F.grid_sample(a[None], g[None], align_corners=False)[0]

    with FusedKernelRewrite() as mode:
        values, tangents = vmap(lambda a, g, t: jvp(lambda gg: one(a, gg), (g,), (t,)))(x, grid, dg)
    assert mode.rewrote
    assert _rel(values, F.grid_sample(x, grid, align_corners=False)) <= 1e-12
    expected = _torch_directional(lambda g: F.grid_sample(x, g, align_corners=False), (grid,), (dg,))
    assert _rel(tangents, expected) <= 1e-12


def test_grid_sample_refuses_bad_arguments():
    x, grid = torch.randn(1, 1, 4, 4, dtype=DT), torch.zeros(1, 2, 2, 2, dtype=DT)
    with pytest.raises(ConfigError, match=r"mode='bicubic' with an input of shape \(1, 1, 2, 4, 4\).*Fix"):
        fr.grid_sample(x[:, :, None].expand(1, 1, 2, 4, 4), torch.zeros(1, 2, 2, 2, 3, dtype=DT), mode="bicubic")
    with pytest.raises(ConfigError, match=r"mode='cubic'.*'bilinear', 'nearest', 'bicubic'"):
        fr.grid_sample(x, grid, mode="cubic")
    with pytest.raises(ConfigError, match=r"padding_mode='edge'.*'zeros', 'border', 'reflection'"):
        fr.grid_sample(x, grid, padding_mode="edge")
    with pytest.raises(ConfigError, match=r"shape \(1, 1, 4, 4\) and a grid of shape \(1, 2, 2, 3\)"):
        fr.grid_sample(x, torch.zeros(1, 2, 2, 3, dtype=DT))


@pytest.mark.parametrize(("p", "mode", "rows"), [
    *[(p, "use_mm_for_euclid_dist_if_necessary", 5) for p in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, float("inf"))],
    (2.0, "use_mm_for_euclid_dist_if_necessary", 30), (2.0, "use_mm_for_euclid_dist", 5),
    (2.0, "donot_use_mm_for_euclid_dist", 30)])
def test_cdist_value_and_jvp(p, mode, rows):
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(2, rows, 4, generator=gen, dtype=DT), torch.randn(2, 3, 4, generator=gen, dtype=DT)
    da, db = torch.randn(a.shape, generator=gen, dtype=DT), torch.randn(b.shape, generator=gen, dtype=DT)
    _check(lambda u, v: torch.cdist(u, v, p=p, compute_mode=mode),
           lambda u, v: fr.cdist(u, v, p=p, compute_mode=mode), (a, b), (da, db), fd=p != 0)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
def test_cdist_at_zero_distance_has_torchs_derivative_zero_not_nan(p):
    """``cdist(a, a)``: the diagonal is 0 along any move of ``a``; torch's backward gives 0 there, and so must the
    rewrite's jvp (a square root of a zero sum would give 0/0)."""
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(4, 3, generator=gen, dtype=DT)
    da = torch.randn(a.shape, generator=gen, dtype=DT)
    value, tangent = jvp(lambda u: fr.cdist(u, u, p=p), (a,), (da,))
    assert torch.isfinite(tangent).all() and torch.count_nonzero(torch.diagonal(tangent)) == 0
    assert _rel(tangent, _torch_directional(lambda u: torch.cdist(u, u, p=p), (a,), (da,))) <= 1e-12
    assert _rel(value, torch.cdist(a, a, p=p)) <= 1e-12


def test_cdist_and_pdist_refuse_bad_arguments():
    a = torch.randn(3, 2, dtype=DT)
    with pytest.raises(ConfigError, match=r"p=-1\.0.*p >= 0"):
        fr.cdist(a, a, p=-1)
    with pytest.raises(ConfigError, match=r"compute_mode='fast'.*'use_mm_for_euclid_dist_if_necessary'"):
        fr.cdist(a, a, compute_mode="fast")
    with pytest.raises(ConfigError, match=r"shapes \(3, 2\) and \(3, 4\)"):
        fr.cdist(a, torch.randn(3, 4, dtype=DT))
    with pytest.raises(ConfigError, match=r"shape \(3,\).*\(N, M\)"):
        fr.pdist(a[0].repeat(3)[:3])


@pytest.mark.parametrize("p", [1.0, 2.0, 2.5, float("inf")])
def test_pdist_value_and_jvp(p):
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(6, 3, generator=gen, dtype=DT)
    _check(lambda u: F.pdist(u, p=p), lambda u: fr.pdist(u, p=p), (a,), (torch.randn(a.shape, generator=gen,
                                                                                           dtype=DT),))


def test_rrelu_in_evaluation_mode_is_torchs_and_runs_under_vmap():
    x = torch.linspace(-3, 3, 101, dtype=DT)
    with FusedKernelRewrite() as mode:
        got = vmap(lambda u: F.rrelu(u, 0.1, 0.3, training=False))(x.reshape(1, -1))[0]
        _, slope = jvp(lambda u: F.rrelu(u, training=False), (x,), (torch.ones_like(x),))
    assert mode.rewrote and torch.equal(got, F.rrelu(x, 0.1, 0.3, training=False))
    assert torch.equal(slope, torch.where(x > 0, torch.ones_like(x), torch.full_like(x, (1 / 8 + 1 / 3) / 2)))


def test_functional_hardsigmoid_has_the_exact_slope_in_the_mode():
    x = torch.linspace(-8, 8, 1001, dtype=DT)
    with FusedKernelRewrite() as mode:
        value, slope = jvp(F.hardsigmoid, (x,), (torch.ones_like(x),))
    assert mode.rewrote and torch.equal(value, F.hardsigmoid(x))
    inside = (x + 3 > 0) & (x + 3 < 6)
    assert torch.all(slope[inside] == 1 / 6) and torch.all(slope[~inside] == 0)


def test_an_operation_not_rewritten_is_refused_naming_it_and_the_fix():
    """``F.ctc_loss`` inside a forward: torch's forward-AD error becomes a refusal naming the loss-callable fix."""
    from explaind.unsupported import evaluation_refusal

    lp = torch.randn(6, 1, 4, dtype=DT).log_softmax(-1)

    def ctc(u):
        return F.ctc_loss(u, torch.tensor([[1, 2]]), torch.tensor([6]), torch.tensor([2]))

    with pytest.raises(RuntimeError) as info:
        jvp(ctc, (lp,), (torch.ones_like(lp),))
    refusal = evaluation_refusal(info.value)
    assert refusal is not None
    assert "_ctc_loss, which has no forward-mode derivative" in str(refusal) and "loss callable" in str(refusal)


class Switch(nn.Module):
    """A linear map, then ``F.hardsigmoid`` (``act=True``) or ``F.grid_sample`` of a fixed image at the output's
    first two coordinates (``sample=True``). The two functions are held in a dict, out of the sight of the scan of
    explaind/kernel/rewrite_scan.py (tests/test_rewrite_scan.py), so that the census and the retry find them here."""

    def __init__(self, act: bool = False, sample: bool = False):
        super().__init__()
        self.lin, self.act, self.sample = nn.Linear(4, 2), act, sample
        self.ops = {"act": F.hardsigmoid, "sample": F.grid_sample}
        self.register_buffer("image", torch.randn(1, 1, 5, 5))

    def forward(self, x):
        h = self.lin(x)
        if self.act:
            h = self.ops["act"](h)
        if self.sample:
            h = h + self.ops["sample"](self.image.expand(len(x), 1, 5, 5), torch.tanh(h)[:, None, None, :],
                                       align_corners=False).reshape(len(x), 1)
        return h


def _functional(model: nn.Module) -> FunctionalModel:
    return FunctionalModel(model, {}, None, torch.device("cpu"), DT)


def _params(fm: FunctionalModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in fm.module.named_parameters()}


def test_census_runs_a_model_without_rewritten_ops_with_no_mode_after_its_first_forward():
    fm = _functional(Switch())
    assert fm._rewrite is None and isinstance(fm.rewritten(), contextlib.AbstractContextManager)
    fm(_params(fm), torch.randn(3, 4, dtype=DT))
    assert fm._rewrite is False and isinstance(fm.rewritten(), contextlib.nullcontext)


def test_census_finds_a_functional_hardsigmoid_and_keeps_the_mode():
    fm = _functional(Switch(act=True))
    params, x = _params(fm), torch.randn(3, 4, dtype=DT)
    fm(params, x)
    assert fm._rewrite is True and isinstance(fm.rewritten(), FusedKernelRewrite)
    _, slope = jvp(lambda b: fm({**params, "lin.bias": b}, x), (params["lin.bias"],),
                   (torch.ones_like(params["lin.bias"]),))
    inside = (fm.module.lin(x).abs() < 3)
    assert torch.all(slope[inside] == 1 / 6)


def test_a_branch_the_census_did_not_take_is_retried_in_the_mode():
    """The first forward has no grid_sample; a later one does (an attribute turned on): torch's forward-AD error
    makes the model run in the mode from then on, with torch's value."""
    fm = _functional(Switch())
    params, x = _params(fm), torch.randn(3, 4, dtype=DT)
    fm(params, x)
    assert fm._rewrite is False
    fm.module.sample = True
    value, _ = jvp(lambda b: fm({**params, "lin.bias": b}, x), (params["lin.bias"],),
                   (torch.ones_like(params["lin.bias"]),))
    assert fm._rewrite is True
    with torch.no_grad():
        assert _rel(value, fm.module(x)) <= 1e-12


class SpatialTransformerBorder(nn.Module):
    """A localisation net's affine map near the identity, ``F.affine_grid`` and ``F.grid_sample`` with border
    padding and aligned corners, then a linear head. ``marks``: sin(pi u) of the sampling positions u in pixels
    (the bilinear weights and the border clamp have their kinks at integer u), for the slow reference."""

    def __init__(self):
        super().__init__()
        self.loc, self.head, self.marks = nn.Linear(36, 6), nn.Linear(36, 3), KinkMarks()

    def forward(self, x):
        theta = torch.eye(2, 3, dtype=x.dtype) + 0.3 * torch.tanh(self.loc(x.flatten(1))).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        self.marks(torch.sin(math.pi * (grid + 1) / 2 * 5))  # align_corners=True: u = (g + 1) / 2 (n - 1)
        return self.head(F.grid_sample(x, grid, padding_mode="border", align_corners=True).flatten(1))


class MetricModel(nn.Module):
    """Prototypes compared by ``torch.cdist`` (p = 1 and p = 2 without the matrix-product form) and a
    ``F.hardsigmoid`` gate: a metric classifier. ``marks``: the coordinate differences (kinks of p = 1 at 0) and
    the gate's input minus and plus 3 (its kinks), for the slow reference."""

    def __init__(self):
        super().__init__()
        self.a, self.protos, self.marks = nn.Linear(4, 8), nn.Parameter(torch.randn(3, 8)), KinkMarks()

    def forward(self, x):
        h = torch.tanh(self.a(x))
        d2 = torch.cdist(h, self.protos, compute_mode="donot_use_mm_for_euclid_dist")
        d1 = torch.cdist(h, self.protos, p=1.0)
        self.marks(torch.cat([(h[:, None, :] - self.protos).flatten(1), (d1 - 3).flatten(1), (d1 + 3).flatten(1)], 1))
        return -(d2 ** 2) - F.hardsigmoid(d1)


@pytest.mark.parametrize(("build", "X", "y"), [(SpatialTransformerBorder, XI, YI), (MetricModel, XV, YV)],
                         ids=["spatial_transformer_border", "metric_cdist_hardsigmoid"])
def test_models_with_rewritten_functional_calls_are_explained_exactly(build, X, y):
    """Replica <= 1e-6 against the trained model, residual share <= 1e-9 with no warning at tol 1e-11 (no cap),
    ``keep=("train",)`` <= 1e-9 against the slow float64 reference (tests/_round5_kit.py)."""
    model, traj = fit(build, X, y)
    assert_exact(figures(model, traj, X[12:], reference=KinkReference))
