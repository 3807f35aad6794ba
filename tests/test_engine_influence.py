"""InfluenceEstimator: completeness, agreement between the engine's independent algorithms, chunking, errors."""

from __future__ import annotations

import pytest
import torch
from engine_testkit import engine_run, keep_combinations, rel
from torch.func import functional_call

import explaind
from explaind.exceptions import ConfigError
from explaind.recurrence import LinearUpdate
from explaind.trajectory.memory import InMemoryTrajectory

TARGETS = {"all": None, "index": [0, 2, 1, 1], "loss": "loss"}


def _est(**kw):
    kw.setdefault("device", "cpu")
    return explaind.InfluenceEstimator(**kw)


def _run_query(run, **kw):
    y = run.y_test if kw.get("target") == "loss" else None
    return _est(**kw).fit(run.trajectory).transform(run.X_test, y)


def _final(run, target, stop):
    traj = run.trajectory
    with torch.no_grad():
        out = functional_call(traj.model, {**traj.constants(), **traj.params(stop)}, (run.X_test,))
    if target is None:
        return out
    if target == "loss":
        return traj.loss.implementation(out, run.y_test).reshape(-1, 1)
    return out[torch.arange(4), torch.tensor(target)].reshape(-1, 1)


@pytest.mark.parametrize("keep", keep_combinations(), ids=lambda k: "+".join(k) or "none")
def test_completeness_every_keep_target_and_window(keep):
    run = engine_run("relu", "adamw")
    user_order = tuple(reversed(keep))
    for name, target in TARGETS.items():
        for steps, (start, stop) in ((None, (0, 6)), ((2, 5), (2, 5))):
            att = _run_query(run, keep=user_order, target=target, steps=steps)
            assert att.axes == ("test", *user_order, "output")
            final = _final(run, target, stop)
            assert rel(att.final, final) <= 1e-12, (name, steps)
            assert rel(att.total(), final) <= 1e-10, (name, steps)
            assert rel(att.initial, _final(run, target, start)) <= 1e-12
            if "step" in keep:
                assert att.coords["step"].tolist() == list(range(start, stop))
            # the quadrature error is what the adaptive rule left: within its tolerance
            assert float(att.quadrature_error.abs().max()) <= 1e-6 * float(final.abs().max())


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adamw", "adam"])
@pytest.mark.parametrize("keep", [("train",), ("group", "train"), ("param", "train")])
def test_forward_and_reverse_momentum_sweeps_agree(optimizer, keep):
    run = engine_run("relu", optimizer)
    fwd = _run_query(run, keep=keep, momentum="forward", steps=(1, 6))
    rev = _run_query(run, keep=keep, momentum="reverse", steps=(1, 6))
    assert fwd.meta["momentum"] == "forward" and rev.meta["momentum"] == "reverse"
    for name in ("values", "regularization", "residual", "quadrature_error"):
        a, b = getattr(fwd, name), getattr(rev, name)
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-12 * max(float(b.abs().max()), 1e-3), name


def _close(a, b, tol=1e-11):
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1.0)


@pytest.mark.parametrize("optimizer", ["nesterov", "adamw"])
def test_forward_mode_and_jacobian_paths_agree(optimizer, monkeypatch):
    """Step/group via JVPs of batch gradients vs the Jacobian path with per-sample gradients."""
    monkeypatch.setattr(explaind.InfluenceEstimator, "_jvp_tangent_ratio", 100.0)
    run = engine_run("tanh", optimizer)
    kw = {"quadrature": "gauss-legendre", "steps": (1, 6)}
    jvp = _run_query(run, keep=("step", "group"), **kw)
    assert jvp.meta["path"] == "jvp"
    jac = _run_query(run, keep=("step", "param"), **kw).by_group()
    per_sample = _run_query(run, keep=("group", "train", "step"), **kw).sum("train")
    assert jac.axes == jvp.axes and per_sample.axes == ("test", "group", "step", "output")
    for name in ("values", "regularization", "residual"):
        _close(getattr(jac, name), getattr(jvp, name))
        _close(getattr(per_sample, name).permute(0, 2, 1, 3), getattr(jvp, name))
    _close(jac.quadrature_error, jvp.quadrature_error)
    _close(per_sample.quadrature_error, jvp.quadrature_error)
    assert jac.meta["path"] == per_sample.meta["path"] == "jacobian"
    monkeypatch.setattr(explaind.InfluenceEstimator, "_jvp_tangent_ratio", 0.0)
    assert _run_query(run, keep=("step", "group"), **kw).meta["path"] == "jacobian"
    rev = _run_query(run, keep=("train",), momentum="reverse", **kw).sum("train")
    monkeypatch.setattr(explaind.InfluenceEstimator, "_jvp_tangent_ratio", 1.0)
    total = _run_query(run, keep=(), **kw)
    assert total.meta["path"] == "jvp"
    for name in ("values", "regularization", "residual", "quadrature_error"):
        _close(getattr(rev, name), getattr(total, name))


def test_train_values_of_one_plain_sgd_step_by_hand():
    """One SGD step without momentum: value[k] = -lr w_k sum_q w_q grad g(theta(t_q)) . grad l_k(theta_0)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    idx = torch.tensor([0, 2, 3])
    with rec:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        opt.step()
    traj = rec.trajectory
    x_test = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    att = _est(keep=("train",), quadrature="gauss-legendre", nodes=3).fit(traj).transform(x_test)
    theta0, theta1 = traj.params(0), traj.params(1)
    names = list(theta0)
    nodes = torch.tensor([0.5 - 0.5 * 0.6**0.5, 0.5, 0.5 + 0.5 * 0.6**0.5], dtype=torch.float64)
    weights = torch.tensor([5.0, 8.0, 5.0], dtype=torch.float64) / 18
    expected = torch.zeros(2, 6, 2, dtype=torch.float64)
    for k in idx.tolist():
        p = {n: theta0[n].clone().requires_grad_(True) for n in names}
        loss = torch.nn.functional.cross_entropy(functional_call(model, p, (X[k:k + 1],)), y[k:k + 1])
        g_k = torch.autograd.grad(loss, [p[n] for n in names])
        for t, w in zip(nodes.tolist(), weights.tolist()):
            q = {n: (theta0[n] + t * (theta1[n] - theta0[n])).requires_grad_(True) for n in names}
            out = functional_call(model, q, (x_test,))
            for i in range(2):
                for o in range(2):
                    grads = torch.autograd.grad(out[i, o], [q[n] for n in names], retain_graph=True)
                    dot = sum((a * b).sum() for a, b in zip(grads, g_k))
                    expected[i, k, o] += -0.5 * (1 / 3) * w * dot
    torch.testing.assert_close(att.values, expected, rtol=1e-12, atol=1e-14)
    assert att.coords["train"].tolist() == list(range(6))


def test_chunking_and_memory_budget_do_not_change_results():
    run = engine_run("relu", "adamw")
    base = _run_query(run, keep=("group", "train"), momentum="reverse")
    chunked = _run_query(run, keep=("group", "train"), momentum="reverse", test_chunk_size=1, param_chunk_size=10,
                         chunk_size=3)
    tight = _est(keep=("group", "train"), memory_budget="8KB").fit(run.trajectory)
    small = tight.transform(run.X_test)
    assert tight.sweep_["test_chunk"] < 4 and tight.sweep_["n_blocks"] > 1
    for other in (chunked, small):
        for name in ("values", "regularization", "residual", "quadrature_error"):
            _close(getattr(other, name), getattr(base, name), 1e-12)


def test_residual_reports_an_unmodelled_update():
    run = engine_run("tanh", "sgd")
    traj = run.trajectory
    params = [traj.params(s) for s in range(traj.n_steps + 1)]
    bumped = [dict(p) for p in params]
    for s in range(3, len(bumped)):  # an update the optimizer never made, kept by every later state
        bumped[s] = {n: v + 1e-3 * torch.ones_like(v) for n, v in params[s].items()}
    fake = InMemoryTrajectory.from_steps(traj.model, loss=traj.loss, params=bumped,
                                         updates=[traj.updates(s) for s in range(traj.n_steps)],
                                         batches=[traj.batch(s) for s in range(traj.n_steps)],
                                         train_data=traj.train_samples(torch.arange(traj.n_train)))
    honest = _run_query(run, keep=("step",), quadrature="gauss-legendre")
    att = _est(keep=("step",), quadrature="gauss-legendre").fit(fake).transform(run.X_test)
    assert rel(att.total(), att.final) <= 1e-10
    res = att.residual.abs().amax(dim=(0, 2))
    # nothing before the bump; the bump itself at step 2 (later steps follow gradients at moved parameters)
    assert float(res[:2].max()) < 1e-12 and float(res[2]) > 1e-4
    assert float(honest.residual.abs().max()) < 1e-12


def test_float32_is_complete_and_close_to_float64():
    run = engine_run("tanh", "adamw")
    a32 = _run_query(run, keep=("step", "train"), dtype="float32")
    a64 = _run_query(run, keep=("step", "train"))
    assert a32.values.dtype == torch.float32
    assert rel(a32.total(), a32.final) <= 1e-5
    assert rel(a32.values, a64.values) <= 1e-4


def test_attribution_api(tmp_path):
    run = engine_run("relu", "nesterov")
    att = _run_query(run, keep=("train", "step", "param"), steps=(1, 4))
    T, O, D = 4, 3, run.trajectory.params(0)["0.weight"].numel() * 0 + sum(
        v.numel() for v in run.trajectory.params(0).values())
    assert att.values.shape == (T, 12, 3, D, O)
    assert att.side_axes == ("test", "step", "param", "output") and att.regularization.shape == (T, 3, D, O)
    assert att.quadrature_axes == ("test", "step", "output") and att.quadrature_error.shape == (T, 3, O)
    assert att.coords["step"].tolist() == [1, 2, 3] and att.coords["param"].tolist() == list(range(D))
    assert att.param_label(0) == "0.weight[0,0]" and att.param_label(4) == "0.weight[1,1]"
    assert att.param_label(D - 1) == "2.bias[2]"
    summed = att.sum(["train", "param"])
    assert summed.axes == ("test", "step", "output")
    torch.testing.assert_close(summed.values, att.values.sum(dim=(1, 3)))
    torch.testing.assert_close(summed.regularization, att.regularization.sum(2))
    torch.testing.assert_close(summed.total(), att.total())
    groups = att.sum("train").by_group()
    assert groups.axes == ("test", "step", "group", "output") and groups.coords["group"] == list(
        run.trajectory.param_names)
    torch.testing.assert_close(groups.values.sum(2), summed.values)
    parts = att.unflatten(att.values.sum(dim=(0, 1, 2, 4)))
    assert parts["0.weight"].shape == (6, 3)
    with pytest.raises(ConfigError, match="not a kept axis"):
        att.sum("output")
    att.save(tmp_path / "a")
    back = explaind.Attribution.load(tmp_path / "a")
    assert back.axes == att.axes and back.meta == att.meta
    for name in ("values", "initial", "final", "regularization", "residual", "quadrature_error"):
        torch.testing.assert_close(getattr(back, name), getattr(att, name), rtol=0, atol=0)
    assert back.coords["train"] == att.coords["train"].tolist()
    d = att.to_dict()
    assert d["axes"] == list(att.axes) and d["values"].shape == tuple(att.values.shape)
    assert att.numpy().shape == tuple(att.values.shape) and att.torch() is att.values


@pytest.mark.parametrize("params, transform_y, match", [
    ({"keep": ("layer",)}, None, "'keep"),
    ({"keep": ("group", "param")}, None, "by_group"),
    ({"keep": ("train", "train")}, None, "must not repeat"),
    ({"target": "logits"}, None, "'target'"),
    ({"target": [0.5, 1.0]}, None, "'target'"),
    ({"momentum": "sideways"}, None, "'momentum'"),
    ({"keep": ("step", "train"), "momentum": "reverse"}, None, "momentum='forward'"),
    ({"memory_budget": "lots"}, None, "'memory_budget'"),
    ({"memory_budget": -5}, None, "'memory_budget'"),
    ({"test_chunk_size": 0}, None, "'test_chunk_size'"),
])
def test_bad_parameters(params, transform_y, match):
    run = engine_run("tanh", "sgd")
    with pytest.raises(ConfigError, match=match):
        _est(**params).fit(run.trajectory).transform(run.X_test, transform_y)


def test_bad_queries():
    run = engine_run("tanh", "sgd")
    with pytest.raises(ConfigError, match=r"transform\(X, y\)"):
        _est(target="loss").fit(run.trajectory).transform(run.X_test)
    with pytest.raises(ConfigError, match="one output index per test input"):
        _est(target=[0, 1]).fit(run.trajectory).transform(run.X_test)
    with pytest.raises(ConfigError, match="0..2"):
        _est(target=[0, 1, 2, 3]).fit(run.trajectory).transform(run.X_test)
    with pytest.raises(ConfigError, match="memory_budget"):
        _est(keep=("param", "train", "step"), memory_budget=1000).fit(run.trajectory).transform(run.X_test)


def test_sample_weights_and_unmoved_parameters():
    """Non-uniform weights and a frozen step (a=1, b=0, P=0) are followed exactly."""
    run = engine_run("tanh", "sgd")
    traj = run.trajectory
    params = [traj.params(0), traj.params(1), traj.params(1), traj.params(2)]
    still = {n: LinearUpdate(a=1.0, b=0.0, P=0.0) for n in traj.param_names}
    updates = [traj.updates(0), still, traj.updates(1)]
    idx, w = traj.batch(1)
    batches = [traj.batch(0), (idx, torch.rand(idx.shape[0], dtype=torch.float64)), traj.batch(1)]
    fake = InMemoryTrajectory.from_steps(traj.model, loss=traj.loss, params=params, updates=updates,
                                         batches=batches, train_data=traj.train_samples(torch.arange(traj.n_train)))
    fwd = _est(keep=("step", "train"), quadrature="gauss-legendre").fit(fake).transform(run.X_test)
    rev = _est(keep=("train",), momentum="reverse", quadrature="gauss-legendre").fit(fake).transform(run.X_test)
    assert rel(fwd.total(), fwd.final) <= 1e-10
    assert float(fwd.values[:, 1].abs().max()) == 0.0  # nothing moved at the frozen step
    _close(fwd.sum("step").values, rev.values, 1e-12)
    assert float(fwd.residual.abs().max()) < 1e-12


def _whole_update_loop(run, nodes: int):
    """sum_s sum_q w_q jacrev(f)(theta_s + t_q delta_s)[x, o, p] * delta_s[p]: (T, D, O), by explicit loops."""
    from torch.func import jacrev

    from explaind.kernel.quadrature import rule_nodes

    traj = run.trajectory
    names = list(traj.param_names)
    t_nodes, weights = rule_nodes("gauss-legendre", nodes)
    total = None
    for s in range(traj.n_steps):
        a, b = traj.params(s), traj.params(s + 1)
        delta = {n: b[n] - a[n] for n in names}
        for t, w in zip(t_nodes.tolist(), weights.tolist()):
            point = {n: a[n] + t * delta[n] for n in names}
            for i in range(run.X_test.shape[0]):
                def f(p, i=i):
                    return functional_call(traj.model, {**traj.constants(), **p}, (run.X_test[i:i + 1],))[0]

                jac = jacrev(f)(point)
                row = torch.cat([(jac[n] * delta[n]).reshape(jac[n].shape[0], -1) for n in names], 1).T * w
                if total is None:
                    total = torch.zeros(run.X_test.shape[0], *row.shape, dtype=row.dtype)
                total[i] += row
    return total


@pytest.mark.parametrize("factored", ["auto", "never"])
def test_whole_update_per_parameter_matches_a_jacrev_loop(factored):
    run = engine_run("tanh", "adamw")
    att = _run_query(run, keep=("param",), split=False, quadrature="gauss-legendre", nodes=3, factored=factored)
    assert att.axes == ("test", "param", "output")
    assert rel(att.values, _whole_update_loop(run, 3)) <= 1e-12
    assert float(att.regularization.abs().max()) == 0.0 and float(att.residual.abs().max()) == 0.0
    assert att.meta["split"] is False


@pytest.mark.parametrize("keep", [(), ("step",), ("group",), ("step", "group"), ("param",), ("step", "param")])
def test_whole_update_equals_the_sum_of_the_split_parts(keep):
    run = engine_run("relu", "sgd")
    whole = _run_query(run, keep=keep, split=False)
    parts = _run_query(run, keep=keep)
    assert whole.completeness_error() <= 1e-12
    assert rel(whole.values, parts.values + parts.regularization + parts.residual) <= 1e-10
    assert rel(whole.quadrature_error, parts.quadrature_error) <= 1e-12 or float(
        (whole.quadrature_error - parts.quadrature_error).abs().max()) <= 1e-14


def test_whole_update_reads_only_the_parameters(monkeypatch):
    run = engine_run("relu", "adam")
    traj = run.trajectory

    def forbidden(*args, **kwargs):
        raise AssertionError("split=False must not read batches, training data or optimizer coefficients")

    for name in ("batch", "train_samples", "updates", "grad_scale"):
        monkeypatch.setattr(traj, name, forbidden)
    for keep in [("step", "group"), ("param",)]:
        att = _run_query(run, keep=keep, split=False)
        assert att.completeness_error() <= 1e-12


def test_whole_update_cannot_keep_train():
    run = engine_run("tanh", "sgd")
    with pytest.raises(ConfigError, match=r"needs split=True.*keep only 'step', 'group' or 'param'"):
        _est(keep=("train",), split=False).fit(run.trajectory)
