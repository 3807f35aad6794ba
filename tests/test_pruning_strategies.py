"""The baseline strategies on tiny models: random, magnitude, SNIP, GraSP, SynFlow, and the base class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import explaind
from explaind.exceptions import ConfigError, NotFittedError, UnknownEntryError
from explaind.pruning import get_strategy


def _mlp(sizes=(3, 4, 5, 2), seed=0, act=nn.ReLU):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def test_registry_lists_the_six_strategies():
    assert {"random", "magnitude", "snip", "grasp", "synflow", "explaind"} <= set(
        explaind.list_entries("pruning_strategy"))
    record = explaind.get_entry("pruning_strategy", "explaind")
    assert record.needs_trajectory and record.needs_data
    with pytest.raises(UnknownEntryError, match="Did you mean 'snip'"):
        get_strategy("snipp")


def test_random_is_seeded_and_spreads_over_layers():
    model = nn.Sequential(nn.Linear(40, 25), nn.ReLU(), nn.Linear(25, 4)).double()
    a = get_strategy("random", random_state=7).fit(model)
    b = get_strategy("random", random_state=7).fit(model)
    c = get_strategy("random", random_state=8).fit(model)
    assert all(torch.equal(a.scores_[n], b.scores_[n]) for n in a.scores_)
    assert not torch.equal(a.scores_["0.weight"], c.scores_["0.weight"])
    masks = a.masks(0.5)
    # 1000 + 100 weights, 550 removed uniformly at random: each layer keeps ~half (binomial, 6 sigma)
    for name, n in (("0.weight", 1000), ("2.weight", 100)):
        kept = int(masks[name].sum())
        assert abs(kept - n / 2) < 6 * (n * 0.25) ** 0.5


def test_magnitude_scores_are_absolute_values():
    model = _mlp()
    est = get_strategy("magnitude").fit(model)
    for name, p in model.named_parameters():
        assert torch.equal(est.scores_[name], p.detach().abs())
    masks = est.masks(0.5)
    kept = torch.cat([model.get_parameter(n).detach().abs()[masks[n]] for n in est.prunable_])
    removed = torch.cat([model.get_parameter(n).detach().abs()[~masks[n]] for n in est.prunable_])
    assert removed.max() <= kept.min()


def _half_squared_error(outputs, targets):
    return 0.5 * ((outputs - targets) ** 2).sum() / outputs.shape[0]


def test_snip_matches_a_hand_computed_example():
    model = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
    X = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    # f = W x = (-1, 4.5); r = f - y = (-1, 3.5); dL/dW = r x^T = [[-1, -2], [3.5, 7]]
    est = get_strategy("snip", loss=_half_squared_error).fit(model, (X, y))
    expected = torch.tensor([[1.0, 2.0], [1.75, 14.0]], dtype=torch.float64)
    assert torch.allclose(est.scores_["weight"], expected, rtol=0, atol=1e-15)


def test_snip_equals_the_mask_derivative_and_ignores_batch_size():
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (10,), generator=gen)
    est = get_strategy("snip").fit(model, (X, y))
    chunked = get_strategy("snip", batch_size=3).fit(model, (X, y))
    # reference: |dL/dc| at c = 1 for multiplicative masks c, one tensor at a time, plain autograd
    for name, p in model.named_parameters():
        c = torch.ones_like(p, requires_grad=True)
        params = {n: (q.detach() * c if n == name else q.detach()) for n, q in model.named_parameters()}
        out = torch.func.functional_call(model, params, (X,))
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(out, y), [c])
        assert torch.allclose(est.scores_[name], grad.abs(), rtol=1e-12, atol=1e-14)
        assert torch.allclose(chunked.scores_[name], est.scores_[name], rtol=1e-12, atol=1e-14)


def test_grasp_matches_an_explicit_hessian():
    model = _mlp(sizes=(3, 4, 3), act=nn.Tanh)
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    T = 3.0
    est = get_strategy("grasp", temperature=T, batch_size=4).fit(model, (X, y))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss(flat):
        params, offset = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            params[n] = flat[offset:offset + k].reshape(s)
            offset += k
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (X,)) / T, y)

    g = torch.autograd.functional.jacobian(loss, theta)
    H = torch.autograd.functional.hessian(loss, theta)
    expected = theta * (H @ g)
    got = torch.cat([est.scores_[n].reshape(-1) for n in names])
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-14)


def _synflow_full(model):
    return get_strategy("synflow", n_iterations=1, sparsity=0.0).fit(model)


def test_synflow_conserves_flow_through_every_hidden_neuron():
    model = _mlp(sizes=(3, 4, 5, 2))
    s = _synflow_full(model).scores_
    for layer_in, layer_out in (("0", "2"), ("2", "4")):
        incoming = s[f"{layer_in}.weight"].sum(dim=1) + s[f"{layer_in}.bias"]
        outgoing = s[f"{layer_out}.weight"].sum(dim=0)
        assert torch.allclose(incoming, outgoing, rtol=1e-12)


def test_synflow_layer_totals_equal_the_synaptic_flow_without_biases():
    model = _mlp(sizes=(3, 4, 5, 2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    s = _synflow_full(model).scores_
    # R = 1^T |W3| |W2| |W1| 1, computed with plain matrix products
    W = [model.get_parameter(f"{i}.weight").detach().abs() for i in (0, 2, 4)]
    R = (W[2] @ W[1] @ W[0] @ torch.ones(3, dtype=torch.float64)).sum()
    for i in (0, 2, 4):
        assert torch.allclose(s[f"{i}.weight"].sum(), R, rtol=1e-12)


def test_synflow_iterative_pruning_avoids_layer_collapse_where_magnitude_does_not():
    model = _mlp(sizes=(10, 10, 10, 2), seed=3)
    with torch.no_grad():
        model[2].weight.mul_(0.01)  # the middle layer is tiny: magnitude removes it whole
    magnitude = get_strategy("magnitude").fit(model).masks(0.9)
    assert not magnitude["2.weight"].any()
    synflow = get_strategy("synflow", sparsity=0.9).fit(model)
    masks = synflow.masks_
    assert all(masks[n].any() for n in ("0.weight", "2.weight", "4.weight"))
    removed = sum(int((~masks[n]).sum()) for n in synflow.prunable_)
    assert removed == round(0.9 * 220)
    # another sparsity re-runs the schedule; the same sparsity reproduces masks_
    again = synflow.masks(0.9)
    assert all(torch.equal(again[n], masks[n]) for n in masks)
    lighter = synflow.masks(0.5)
    assert sum(int((~lighter[n]).sum()) for n in synflow.prunable_) == 110


def test_synflow_needs_an_input_shape_for_convolutions():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)).double()
    with pytest.raises(ConfigError, match=r"input_shape=\(C, H, W\)"):
        get_strategy("synflow").fit(model)
    est = get_strategy("synflow", input_shape=(1, 4, 4), n_iterations=5).fit(model)
    assert est.scores_["0.weight"].shape == (2, 1, 3, 3)
    with_data = get_strategy("synflow", n_iterations=5).fit(model, torch.zeros(3, 1, 4, 4, dtype=torch.float64))
    assert torch.allclose(with_data.scores_["0.weight"], est.scores_["0.weight"])


def test_strategies_do_not_modify_the_model():
    model = _mlp()
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    before = [p.detach().clone() for p in model.parameters()]
    for name in ("random", "magnitude", "snip", "grasp", "synflow"):
        get_strategy(name, random_state=0).fit(model, (X, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_transform_returns_a_pruned_copy():
    model = _mlp()
    est = get_strategy("magnitude", sparsity=0.5).fit(model)
    pruned = est.transform(model)
    for name, p in pruned.named_parameters():
        assert torch.equal(p == 0, ~est.masks_[name] | (model.get_parameter(name) == 0))


def test_base_class_errors_are_explained():
    model = _mlp()
    with pytest.raises(NotFittedError, match="Call 'fit"):
        get_strategy("magnitude").masks()
    with pytest.raises(ConfigError, match="must be a torch.nn.Module"):
        get_strategy("magnitude").fit("model")
    with pytest.raises(ConfigError, match=r"needs data: pass \(X, y\) with targets"):
        get_strategy("snip").fit(model)
    with pytest.raises(ConfigError, match="this strategy needs targets"):
        get_strategy("snip").fit(model, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ConfigError, match="invalid value for 'sparsity': 1.2"):
        get_strategy("magnitude", sparsity=1.2).fit(model)
    with pytest.raises(ConfigError, match="invalid value for 'scope'"):
        get_strategy("magnitude", scope="model").fit(model)
    with pytest.raises(ConfigError, match="invalid value for 'exclude'"):
        get_strategy("magnitude", exclude="4").fit(model)
    with pytest.raises(ConfigError, match="exclude entry 'fc' matches no parameter"):
        get_strategy("magnitude", exclude=("fc",)).fit(model)
    est = get_strategy("magnitude").fit(model)
    with pytest.raises(ConfigError, match="invalid sparsity 1"):
        est.masks(1)
    with pytest.raises(ConfigError, match="X has 3 samples but y has 2"):
        get_strategy("snip").fit(model, (torch.zeros(3, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long)))
