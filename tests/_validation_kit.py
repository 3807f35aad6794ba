"""Slow float64 loop references of the validation benchmark, shared by its test files.

* :func:`influence_reference`: the explicit damped influence function, Hessian row by row and one
  solve per (test point, training sample);
* :func:`leave_out_reference`: leave-out retraining of the batch-norm CNN and of the InfoNCE pair
  encoder, one Python loop per batch over the kept samples, with batch norm, InfoNCE and SGD with
  momentum written out (no torch module runs the training forward, no torch optimizer steps);
* :func:`weighted_mlp_reference`: the weighted retraining of the digits MLP (``sgd_mlp``, ``relu_untuned``),
  one loss term per sample, the MLP and SGD with momentum written out;
* :func:`weighted_lm_reference`: the weighted retraining of the token model (``tiny_lm``), one sequence at a time,
  attention over each position's past written as a loop, AdamW written out;
* :func:`lm_influence_reference`: the damped influence function of the token model, Hessian row by row;
* :func:`dropout_leave_out_reference`: leave-out retraining of the dropout MLP, the recorded batch's masks drawn
  at every step and each kept sample's row used, the MLP and SGD with momentum written out.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def influence_reference(problem, model, tests=None, samples=None) -> np.ndarray:
    """``-(1/n) grad f(x_t)^T (H + damping I)^{-1} grad l_k`` for the test points ``tests`` and samples ``samples``."""
    params = [p for p in model.parameters()]
    n, damping = problem.config.n_train, problem.config.damping
    tests = range(problem.config.n_test) if tests is None else tests
    samples = range(n) if samples is None else samples

    def flat_grad(value, create_graph=False):
        grads = torch.autograd.grad(value, params, create_graph=create_graph, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    mean_loss = F.cross_entropy(model(problem.X_train), problem.y_train)
    g = flat_grad(mean_loss, create_graph=True)
    hessian = torch.stack([flat_grad(g[i]) for i in range(g.numel())])  # row i: d g_i / d theta
    damped = hessian + damping * torch.eye(g.numel(), dtype=torch.float64)
    rows = []
    for t in tests:
        g_test = flat_grad(model(problem.X_test[t:t + 1])[0, problem.y_test[t]])
        row = []
        for k in samples:
            g_k = flat_grad(F.cross_entropy(model(problem.X_train[k:k + 1]), problem.y_train[k:k + 1]))
            row.append(-float(g_test @ torch.linalg.solve(damped, g_k)) / n)
        rows.append(row)
    return np.asarray(rows)


def _bn_cnn(theta, x, mean, var, act):
    h = F.conv2d(x, theta["0.weight"], theta["0.bias"], padding=1)
    h = (h - mean[None, :, None, None]) / torch.sqrt(var + 1e-5)[None, :, None, None]
    h = act(h * theta["1.weight"][None, :, None, None] + theta["1.bias"][None, :, None, None])
    return F.avg_pool2d(h, 2).flatten(1) @ theta["5.weight"].T + theta["5.bias"]


def _embed(theta, x):
    return torch.tanh(x @ theta["encoder.0.weight"].T + theta["encoder.0.bias"]) @ theta["encoder.2.weight"].T \
        + theta["encoder.2.bias"]


def _info_nce_term(a, b, i, temperature):
    sims = [[float("nan")] * len(a) for _ in a]
    for r in range(len(a)):
        for c in range(len(a)):
            sims[r][c] = torch.dot(a[r], b[c]) / (torch.linalg.norm(a[r]) * torch.linalg.norm(b[c])) / temperature
    row = torch.logsumexp(torch.stack(sims[i]), 0) - sims[i][i]
    col = torch.logsumexp(torch.stack([sims[r][i] for r in range(len(a))]), 0) - sims[i][i]
    return 0.5 * (row + col)


def leave_out_reference(problem, keep) -> torch.Tensor:
    """The explained test outputs after leave-out retraining (``keep[k]`` false: ``k`` left out), by loops."""
    c = problem.config
    theta = {name: p.detach().clone() for name, p in problem.build_model().named_parameters()}
    run_mean, run_var = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    act = torch.tanh if c.activation == "tanh" else torch.relu
    velocity: dict = {}
    for idx in problem.batches:
        kept = [k for k in idx.tolist() if bool(keep[k])]
        if not kept:  # the whole batch left out: a step on a zero gradient (momentum goes on)
            for name, v in theta.items():
                velocity[name] = torch.zeros_like(v) if name not in velocity else c.momentum * velocity[name]
                theta[name] = v - c.lr * velocity[name]
            continue
        live = {name: v.clone().requires_grad_(True) for name, v in theta.items()}
        if c.setting == "batchnorm":
            h = F.conv2d(problem.X_train[kept], live["0.weight"], live["0.bias"], padding=1)
            count = h.shape[0] * h.shape[2] * h.shape[3]
            mean = torch.stack([h[:, ch].sum() / count for ch in range(8)])
            var = torch.stack([((h[:, ch] - mean[ch]) ** 2).sum() / count for ch in range(8)])
            run_mean = 0.9 * run_mean + 0.1 * mean.detach()
            run_var = 0.9 * run_var + 0.1 * var.detach() * count / (count - 1)
            out = _bn_cnn(live, problem.X_train[kept], mean, var, act)
            terms = [-torch.log_softmax(out[i], 0)[problem.y_train[k]] for i, k in enumerate(kept)]
        else:
            x = problem.X_train[kept]
            a, b = _embed(live, x[:, 0]), _embed(live, x[:, 1])
            terms = [_info_nce_term(a, b, i, c.temperature) for i in range(len(kept))]
        loss = torch.stack(terms).sum() / len(idx)
        grads = torch.autograd.grad(loss, list(live.values()))
        for (name, v), g in zip(theta.items(), grads):
            velocity[name] = g if name not in velocity else c.momentum * velocity[name] + g
            theta[name] = v - c.lr * velocity[name]
    if c.setting == "batchnorm":
        out = _bn_cnn(theta, problem.X_test, run_mean, run_var, act)
        return out.gather(1, problem.y_test[:, None])[:, 0]
    a, b = _embed(theta, problem.X_test[:, 0]), _embed(theta, problem.X_test[:, 1])
    return (a * b).sum(1) / (torch.linalg.norm(a, dim=1) * torch.linalg.norm(b, dim=1))


def weighted_mlp_reference(problem, weights) -> torch.Tensor:
    """True-class test logits of the MLP retrained with sample weights ``weights``, by loops (one term per sample)."""
    c = problem.config
    theta = {name: p.detach().clone() for name, p in problem.build_model().named_parameters()}
    act = torch.tanh if c.activation == "tanh" else torch.relu

    def mlp(params, x):
        return F.linear(act(F.linear(x, params["0.weight"], params["0.bias"])), params["2.weight"], params["2.bias"])

    velocity: dict = {}
    for idx in problem.batches:
        live = {name: v.clone().requires_grad_(True) for name, v in theta.items()}
        terms = [float(weights[k]) * -torch.log_softmax(mlp(live, problem.X_train[k]), 0)[problem.y_train[k]]
                 for k in idx.tolist()]
        grads = torch.autograd.grad(torch.stack(terms).sum() / len(idx), list(live.values()))
        for (name, v), g in zip(theta.items(), grads):
            velocity[name] = g if name not in velocity else c.momentum * velocity[name] + g
            theta[name] = v - c.lr * velocity[name]
    return mlp(theta, problem.X_test).gather(1, problem.y_test[:, None])[:, 0].detach()


def dropout_leave_out_reference(problem, keep) -> torch.Tensor:
    """True-class test logits of the dropout MLP retrained with the samples where ``keep`` is false left out, by loops.

    Each step draws the mask of the recorded batch, ``(|B_s|, hidden)`` Bernoulli(1 - p) from the global generator
    seeded with ``problem.mask_seed`` (as ``nn.Dropout`` draws it), and sample ``k`` at row ``i`` of its batch uses
    mask row ``i``; the removed samples' rows are drawn and not used. One loss term per kept sample, SGD with
    momentum written out.
    """
    c = problem.config
    theta = {name: p.detach().clone() for name, p in problem.build_model().named_parameters()}
    act = torch.tanh if c.activation == "tanh" else torch.relu
    torch.manual_seed(problem.mask_seed)
    velocity: dict = {}
    for idx in problem.batches:
        draws = torch.empty(len(idx), c.hidden, dtype=torch.float64).bernoulli_(1 - c.dropout)
        live = {name: v.clone().requires_grad_(True) for name, v in theta.items()}
        terms = []
        for i, k in enumerate(idx.tolist()):
            if not bool(keep[k]):
                continue
            h = act(live["0.weight"] @ problem.X_train[k] + live["0.bias"]) * draws[i] / (1 - c.dropout)
            out = live["3.weight"] @ h + live["3.bias"]
            terms.append(-torch.log_softmax(out, 0)[problem.y_train[k]])
        if terms:
            grads = torch.autograd.grad(torch.stack(terms).sum() / len(idx), list(live.values()))
        else:
            grads = tuple(torch.zeros_like(v) for v in theta.values())
        for (name, v), g in zip(theta.items(), grads):
            velocity[name] = g if name not in velocity else c.momentum * velocity[name] + g
            theta[name] = v - c.lr * velocity[name]
    out = F.linear(act(F.linear(problem.X_test, theta["0.weight"], theta["0.bias"])), theta["3.weight"],
                   theta["3.bias"])
    return out.gather(1, problem.y_test[:, None])[:, 0].detach()


def _lm_logits(theta, ids) -> torch.Tensor:
    """Logits ``(length, vocab)`` of the tiny causal LM on one sequence; position ``j`` attends to ``0..j`` (a loop)."""
    h = theta["tokens.weight"][ids] + theta["positions"][:len(ids)]
    q = h @ theta["query.weight"].T + theta["query.bias"]
    k = h @ theta["key.weight"].T + theta["key.bias"]
    v = h @ theta["value.weight"].T + theta["value.bias"]
    rows = []
    for j in range(len(ids)):
        weights = torch.softmax(k[:j + 1] @ q[j] / h.shape[1] ** 0.5, 0)
        rows.append((weights[:, None] * v[:j + 1]).sum(0))
    h = h + torch.stack(rows) @ theta["mix.weight"].T + theta["mix.bias"]
    h = h + torch.tanh(h @ theta["up.weight"].T + theta["up.bias"]) @ theta["down.weight"].T + theta["down.bias"]
    return h @ theta["head.weight"].T + theta["head.bias"]


def weighted_lm_reference(problem, weights) -> torch.Tensor:
    """Explained test logits of the tiny LM retrained with sequence weights ``weights``, by loops.

    Sequence ``k``'s loss is the mean over its positions ``j < length - 1`` of ``-log p(x_{j+1} | x_{<=j})``; step
    ``s`` minimises ``sum_k w_k l_k / |B_s|`` with AdamW (torch's defaults: betas 0.9, 0.999, eps 1e-8) written out.
    """
    c = problem.config
    theta = {name: p.detach().clone() for name, p in problem.build_model().named_parameters()}
    m = {name: torch.zeros_like(v) for name, v in theta.items()}
    sq = {name: torch.zeros_like(v) for name, v in theta.items()}
    for step, idx in enumerate(problem.batches, start=1):
        live = {name: v.clone().requires_grad_(True) for name, v in theta.items()}
        terms = []
        for k in idx.tolist():
            ids = problem.X_train[k]
            logits = _lm_logits(live, ids)
            token = [-torch.log_softmax(logits[j], 0)[ids[j + 1]] for j in range(len(ids) - 1)]
            terms.append(float(weights[k]) * torch.stack(token).mean())
        grads = torch.autograd.grad(torch.stack(terms).sum() / len(idx), list(live.values()))
        for (name, v), g in zip(theta.items(), grads):
            m[name] = 0.9 * m[name] + 0.1 * g
            sq[name] = 0.999 * sq[name] + 0.001 * g * g
            decayed = v * (1 - c.lr * c.weight_decay)
            denom = (sq[name] / (1 - 0.999 ** step)).sqrt() + 1e-8
            theta[name] = decayed - c.lr / (1 - 0.9 ** step) * m[name] / denom
    last = problem.X_test.shape[1] - 1
    return torch.stack([_lm_logits(theta, x)[last - 1, x[last]] for x in problem.X_test]).detach()


def lm_influence_reference(problem, model, tests, samples) -> np.ndarray:
    """The damped influence function of the tiny LM: Hessian of the mean next-token loss row by row, one solve each.

    ``-(1/n) grad f(x_t)^T (H + damping I)^{-1} grad l_k``, ``f`` the logit of test sequence ``t``'s last token at
    the position before it, ``l_k`` the mean over the positions of sequence ``k`` of ``-log p(x_{j+1} | x_{<=j})``.
    """
    params = [p for p in model.parameters()]
    n, damping = problem.config.n_train, problem.config.damping

    def flat_grad(value, create_graph=False):
        grads = torch.autograd.grad(value, params, create_graph=create_graph, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    def next_token_loss(ids):
        logp = torch.log_softmax(model(ids)[:, :-1], -1)
        return -logp.gather(2, ids[:, 1:, None])[..., 0].mean(1)

    g = flat_grad(next_token_loss(problem.X_train).mean(), create_graph=True)
    hessian = torch.stack([flat_grad(g[i]) for i in range(g.numel())])
    damped = hessian + damping * torch.eye(g.numel(), dtype=torch.float64)
    last = problem.X_test.shape[1] - 1
    rows = []
    for t in tests:
        x = problem.X_test[t:t + 1]
        g_test = flat_grad(model(x)[0, last - 1, x[0, last]])
        rows.append([-float(g_test @ torch.linalg.solve(damped, flat_grad(next_token_loss(
            problem.X_train[k:k + 1])[0]))) / n for k in samples])
    return np.asarray(rows)
