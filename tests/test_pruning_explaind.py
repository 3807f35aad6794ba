r"""The ExPLAIND pruning strategy: S_p = sum_x sum_o |sum_s sum_k psi(s, p, k, x, o)|.

Checked against a closed form on a linear model, the telescoping identity, the two Jacobian
methods against each other, and the engine backend against the path backend (float64).
"""

from __future__ import annotations

import pytest
import torch
from explaind_pruning.explaind_scores import path_contributions
from torch import nn

import explaind
from explaind.exceptions import ConfigError, TrajectoryError
from explaind.pruning import get_strategy


def _record(model, X, y, steps=5, lr=0.1, momentum=0.9, weight_decay=0.0, batch=4):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s in range(steps):
            idx = torch.arange(s * batch, (s + 1) * batch) % X.shape[0]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory


def _data(n=20, d=3, classes=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen))


@pytest.mark.parametrize("backend", ["path", "engine"])
def test_linear_model_matches_the_closed_form(backend):
    # f(x) = W x + b: df_o/dW_ij = [o == i] x_j exactly, so
    # S_W[i, j] = sum_x |x_j| |W_N - W_0|[i, j] and S_b[i] = T |b_N - b_0|[i]
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    W0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    X, y = _data()
    traj = _record(model, X, y)
    X_eval = torch.randn(7, 3, dtype=torch.float64)
    options = {"engine_options": {"quadrature": "gauss-legendre", "nodes": 2}} if backend == "engine" else {}
    est = get_strategy("explaind", backend=backend, quadrature_nodes=2, **options).fit(model, X_eval, traj)
    assert est.backend_ == backend
    expected_W = X_eval.abs().sum(0).unsqueeze(0) * (model.weight.detach() - W0).abs()
    expected_b = 7 * (model.bias.detach() - b0).abs()
    assert torch.allclose(est.scores_["weight"], expected_W, rtol=1e-10, atol=1e-14)
    assert torch.allclose(est.scores_["bias"], expected_b, rtol=1e-10, atol=1e-14)


def _tanh_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_path_contributions_telescope_to_the_change_of_the_outputs():
    model = _tanh_mlp()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    X, y = _data()
    traj = _record(model, X, y, steps=6)
    X_eval = torch.randn(5, 3, dtype=torch.float64)
    A = path_contributions(traj, X_eval, quadrature_nodes=6, batch_size=2)
    total = sum(a.reshape(5, 2, -1).sum(-1) for a in A.values())
    with torch.no_grad():
        before = torch.func.functional_call(model, theta0, (X_eval,))
        after = model(X_eval)
    assert torch.allclose(total, after - before, rtol=0, atol=1e-11)


def test_factored_and_vmap_jacobians_agree_on_a_mixed_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.norm = nn.LayerNorm(32)
            self.fc1 = nn.Linear(32, 5)
            self.fc2 = nn.Linear(5, 3)

        def forward(self, x):
            h = self.norm(torch.tanh(self.conv(x)).flatten(1))
            return self.fc2(torch.relu(self.fc1(h)))

    torch.manual_seed(1)
    model = Net().double()
    X = torch.randn(12, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    traj = _record(model, X, y, steps=3)
    X_eval = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    fast = path_contributions(traj, X_eval, quadrature_nodes=2, batch_size=3, jacobian="factored")
    slow = path_contributions(traj, X_eval, quadrature_nodes=2, batch_size=5, jacobian="vmap")
    for name in fast:
        assert torch.allclose(fast[name], slow[name], rtol=1e-10, atol=1e-15), name


def test_shared_linear_falls_back_to_vmap():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    torch.manual_seed(2)
    model = Tied().double()
    X, y = _data(n=8, d=3, classes=3)
    traj = _record(model, X, y, steps=2)
    X_eval = torch.randn(4, 3, dtype=torch.float64)
    fast = path_contributions(traj, X_eval, quadrature_nodes=3, jacobian="factored")
    slow = path_contributions(traj, X_eval, quadrature_nodes=3, jacobian="vmap")
    assert torch.allclose(fast["fc.weight"], slow["fc.weight"], rtol=1e-12, atol=1e-15)


def test_engine_and_path_backends_agree():
    model = _tanh_mlp(seed=3)
    X, y = _data(seed=3)
    traj = _record(model, X, y, steps=4)
    X_eval = torch.randn(6, 3, dtype=torch.float64)
    path = get_strategy("explaind", backend="path", quadrature_nodes=4).fit(model, X_eval, traj)
    engine = get_strategy("explaind", backend="engine",
                          engine_options={"quadrature": "gauss-legendre", "nodes": 4}).fit(model, X_eval, traj)
    for name in path.scores_:
        assert torch.allclose(engine.scores_[name], path.scores_[name], rtol=1e-10, atol=1e-14), name


def test_auto_backend_uses_the_engine_when_the_update_has_regularization():
    model = _tanh_mlp()
    X, y = _data()
    plain = _record(model, X, y, steps=2)
    assert get_strategy("explaind").fit(model, X[:3], plain).backend_ == "path"
    model = _tanh_mlp()
    decayed = _record(model, X, y, steps=2, weight_decay=0.1)
    est = get_strategy("explaind", engine_options={"quadrature": "gauss-legendre", "nodes": 2}).fit(
        model, X[:3], decayed)
    assert est.backend_ == "engine"


def test_attribution_values_are_reduced_with_abs_after_the_sum_over_steps():
    # values[x, p, o] over D = 3 coordinates: tensor "a" of shape (2,) then "b" of shape (1, 1); the strategy
    # reduces the engine's Attribution with explaind.scores.parameter_influence
    from explaind.kernel.attribution import Attribution
    from explaind.kernel.layout import ParamLayout
    from explaind.scores import parameter_influence

    values = torch.tensor([
        [[1.0, -2.0], [0.5, 0.5], [-3.0, 0.0]],
        [[-1.0, 1.0], [2.0, -0.5], [1.0, 1.0]],
    ])

    def attribution(axes, layout):
        zeros, side = torch.zeros(2, 2), torch.zeros_like(values)
        return Attribution(axes=axes, values=values, initial=zeros, final=zeros, regularization=side, residual=side,
                           quadrature_error=zeros, coords={}, layout=layout)

    out = parameter_influence(attribution(("test", "param", "output"), ParamLayout(("a", "b"), ((2,), (1, 1)))))
    assert out["a"].tolist() == [1 + 2 + 1 + 1, 0.5 + 0.5 + 2 + 0.5]
    assert out["b"].tolist() == [[3 + 0 + 1 + 1]]
    with pytest.raises(ConfigError, match=r"needs an Attribution keeping \['param'\]"):
        parameter_influence(attribution(("test", "train", "output"), ParamLayout(("a",), ((3,),))))


def test_errors_name_the_problem_and_the_fix():
    model = _tanh_mlp()
    untrained = _tanh_mlp()
    X, y = _data()
    traj = _record(model, X, y, steps=2)
    with pytest.raises(TrajectoryError, match="differs from the trajectory's final state"):
        get_strategy("explaind").fit(untrained, X, traj)
    with pytest.raises(ConfigError, match="needs the recorded trajectory"):
        get_strategy("explaind").fit(model, X)
    with pytest.raises(ConfigError, match="needs data"):
        get_strategy("explaind").fit(model, None, traj)
    other = nn.Sequential(nn.Linear(3, 2)).double()
    with pytest.raises(TrajectoryError, match="pass the model the trajectory was recorded from"):
        get_strategy("explaind").fit(other, X, traj)
    with pytest.raises(ConfigError, match="invalid value for 'backend'"):
        get_strategy("explaind", backend="fast").fit(model, X, traj)


def test_a_torch_prune_round_trip_that_reorders_the_parameters_is_matched_by_name():
    # docs/pruning.md: prune_global_by_scores then remove_torch_prune re-registers the weight after its bias
    from explaind.pruning import apply_masks, prune_global_by_scores, remove_torch_prune

    model = _tanh_mlp()
    X, y = _data()
    traj = _record(model, X, y, steps=2)
    first = get_strategy("explaind", backend="path", quadrature_nodes=2).fit(model, X, traj)
    prune_global_by_scores(model, {"0.weight": torch.ones(5, 3)}, 0.0, names=["0.weight"])  # prunes nothing
    remove_torch_prune(model)
    assert [n for n, _ in model.named_parameters()][:2] == ["0.bias", "0.weight"]  # the order torch leaves
    again = get_strategy("explaind", backend="path", quadrature_nodes=2).fit(model, X, traj)
    assert all(torch.equal(first.scores_[n], again.scores_[n]) for n in traj.param_names)
    masks = get_strategy("explaind", backend="path", quadrature_nodes=2, sparsity=0.5).fit(model, X, traj).masks()
    apply_masks(model, masks, inplace=True)  # pruned in place: no longer the trained model
    with pytest.raises(TrajectoryError, match=r"parameter '\d.weight' of the model differs from the trajectory's "
                                              r"final state theta_N; pass the trained model"):
        get_strategy("explaind", backend="path").fit(model, X, traj)
    with pytest.raises(TrajectoryError, match=r"missing \['4.bias'\], not recorded \[\]"):
        get_strategy("explaind", backend="path").fit(nn.Sequential(*model[:4], nn.Linear(4, 2, bias=False)), X, traj)


def _relu_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double()


def _loop_scores(model, traj, X_eval, nodes=24):
    """S_p = sum_x sum_o |sum_s int grad f_o(x; theta_s + t dtheta_s)[p] dt * dtheta_s[p]| by a plain loop over
    steps, Gauss-Legendre nodes, inputs and outputs (torch.autograd, no explaind code)."""
    import numpy as np

    t_nodes, weights = np.polynomial.legendre.leggauss(nodes)
    names = [n for n, _ in model.named_parameters()]
    contrib = {n: torch.zeros(X_eval.shape[0], 2, *p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    for s in range(traj.n_steps):
        a, b = traj.params(s), traj.params(s + 1)
        for t, w in zip((t_nodes + 1) / 2, weights / 2):
            theta = {n: (a[n] + float(t) * (b[n] - a[n])).double().requires_grad_(True) for n in names}
            for i in range(X_eval.shape[0]):
                out = torch.func.functional_call(model, theta, (X_eval[i:i + 1],))[0]
                for o in range(out.shape[0]):
                    grads = torch.autograd.grad(out[o], list(theta.values()), retain_graph=True)
                    for n, g in zip(names, grads):
                        contrib[n][i, o] += float(w) * g * (b[n] - a[n]).double()
    return {n: c.abs().sum(dim=(0, 1)) for n, c in contrib.items()}


def test_adaptive_path_scores_match_a_loop_reference_on_a_smooth_model():
    # tanh: 24 Gauss-Legendre nodes per step integrate to rounding, so the adaptive rule at a tight tol must agree
    model = _tanh_mlp(seed=5)
    X, y = _data(seed=5)
    traj = _record(model, X, y, steps=3, lr=0.5)
    X_eval = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    est = get_strategy("explaind", backend="path", quadrature="adaptive", quadrature_nodes=2, tol=1e-11).fit(
        model, X_eval, traj)
    reference = _loop_scores(model, traj, X_eval)
    for name, ref in reference.items():
        assert torch.allclose(est.scores_[name], ref, rtol=1e-8, atol=1e-12), name


def test_adaptive_path_contributions_telescope_on_a_relu_model():
    # ReLU kinks: a fixed rule leaves error in the sum; the adaptive rule brings every step within tol of its change
    model = _relu_mlp()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    X, y = _data(seed=4)
    traj = _record(model, X, y, steps=6, lr=0.5)
    X_eval = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        change = model(X_eval) - torch.func.functional_call(model, theta0, (X_eval,))

    def left(**rule):
        A = path_contributions(traj, X_eval, **rule)
        return float((sum(a.reshape(8, 2, -1).sum(-1) for a in A.values()) - change).abs().max())

    coarse = left(quadrature="gauss-legendre", quadrature_nodes=1)
    assert coarse > 1e-6  # the kinks are there: the midpoint rule misses part of the change
    assert left(quadrature="adaptive", quadrature_nodes=2, tol=1e-10) < 1e-9 * float(change.abs().max())


def test_tol_belongs_to_the_adaptive_rule():
    model = _tanh_mlp()
    X, y = _data()
    traj = _record(model, X, y, steps=2)
    with pytest.raises(ConfigError, match="tol=0.001 is the adaptive rule's tolerance, but quadrature='gauss-leg"):
        get_strategy("explaind", quadrature="gauss-legendre", tol=1e-3).fit(model, X[:3], traj)
    with pytest.raises(ConfigError, match="simpson"):
        get_strategy("explaind", quadrature="simpson").fit(model, X[:3], traj)
