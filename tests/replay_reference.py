"""Slow loop references for stochastic and batch-coupled runs (dropout masks, batch statistics, buffers).

:class:`ReplayReference` keeps the path features of :class:`reference.Reference` and replaces its per-sample
gradients by an independent loop: for every step and micro-batch, set the recorded CPU generator state with
``torch.set_rng_state``, run the plain module in training mode on the micro-batch (one batched forward), and
take each sample's own loss gradient with ``torch.autograd.grad`` one sample at a time.
:class:`BufferReference` adds the recorded buffers: step ``s``'s segment is evaluated at ``beta_s`` and the
exact buffers term ``f(theta_{s+1}, beta_{s+1}) - f(theta_{s+1}, beta_s)`` is computed per step.
:class:`ForwardJacobianReference` takes its path Jacobians one column at a time by ``torch.func.jvp`` (the output's
own derivative, no finite step) for models whose backward is not the derivative of the forward (a gradient reversal
layer), while the per-sample gradients keep the backward, which the optimizer applied.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from reference import Reference

from explaind.outputs import model_output

__all__ = ["BufferReference", "ForwardJacobianReference", "ReplayReference", "assert_replay_exact"]

DT = torch.float64


def _cast(x: torch.Tensor) -> torch.Tensor:
    """Float inputs in float64; token ids as they are."""
    return x.to(DT) if x.is_floating_point() else x


class ReplayReference(Reference):
    """The reference with per-sample gradients through the replayed batched training forward (a plain loop).

    Models may return a ``ModelOutput`` (its logits are taken) of any shape (flattened per test input).
    A subclass may define ``before_forward(module, step, micro)``, called right before each micro-batch's
    training forward (e.g. to seed a layer's private generator as the loop did).
    """

    before_forward = None

    def forward(self, vec, xi):
        params = {**self.constants, **self._unflat(vec)}
        return model_output(torch.func.functional_call(self.model, params, (self.X[xi:xi + 1],)))[0].reshape(-1)

    def _compute_gradients(self) -> None:
        train_model = copy.deepcopy(self.model).train()
        self.G = torch.zeros(self.N, self.K, self.D, dtype=DT)
        for i in range(self.N):
            th = self.theta[i].clone().requires_grad_(True)
            for m, micro in enumerate(self.traj.micro_batches(i)):
                idx, w = micro.indices, micro.weights
                Xb, yb = self.traj.train_samples(idx)
                buffers = {k: v.clone() for k, v in self._buffers_of_step(i).items()}
                module = train_model if micro.state is not None else self.model  # else: evaluation mode
                before = torch.get_rng_state()
                if micro.state is not None:
                    torch.set_rng_state(micro.state.cpu)
                if self.before_forward is not None:
                    self.before_forward(module, i, m)
                out = model_output(torch.func.functional_call(module, {**buffers, **self._unflat(th)}, (_cast(Xb),)))
                torch.set_rng_state(before)
                losses = self.loss_fn(out, yb).reshape(-1)
                for j in range(len(idx)):
                    (g,) = torch.autograd.grad(losses[j], th, retain_graph=True)
                    self.G[i, int(idx[j])] += self.coef[i]["scale"] * float(w[j]) * g

    def _buffers_of_step(self, s: int) -> dict[str, torch.Tensor]:
        """The buffers the training forward of step ``s`` starts from (the constants recorded at the start)."""
        return self.constants

    def kept(self, keep: Sequence[str], steps: tuple[int, int] | None = None) -> np.ndarray:
        """As :meth:`Reference.kept`; ``keep=("train",)`` without the full atom tensor (large models)."""
        if tuple(keep) != ("train",):
            return super().kept(keep, steps)
        start, stop = self._window(steps)
        return torch.einsum("sxop,skp->xko", self.phi[start:stop], self.Dk[start:stop]).numpy()


class BufferReference(ReplayReference):
    """The replaying reference with the recorded buffers: step ``s``'s path at ``beta_s`` (a plain loop)."""

    def __init__(self, traj, X, **kw):
        self.betas = [{k: v.to(DT) if v.is_floating_point() else v for k, v in traj.buffers(s).items()}
                      for s in range(traj.n_steps + 1)]
        self._s = 0
        super().__init__(traj, X, **kw)

    def _buffers_of_step(self, s: int) -> dict[str, torch.Tensor]:
        return {**self.constants, **self.betas[s]}

    def nodes(self, s, xi):
        self._s = s  # the Jacobians and kinks that follow are along step s's segment
        return super().nodes(s, xi)

    def forward(self, vec, xi):
        step = next((s for s, th in enumerate(self.theta) if th is vec), self._s)  # values at theta_s use beta_s
        params = {**self.constants, **self.betas[step], **self._unflat(vec)}
        return torch.func.functional_call(self.model, params, (self.X[xi:xi + 1],))[0]

    def buffer_terms(self):
        """``f(theta_{s+1}, beta_{s+1}) - f(theta_{s+1}, beta_s)`` per step and test input, ``(N, T, O)``.

        With an index ``target`` (one output per test input), ``O == 1``; ``target="loss"`` is not covered.
        """
        out = torch.zeros(self.N, self.X.shape[0], self.O, dtype=DT)
        with torch.no_grad():
            for s in range(self.N):
                params = self._unflat(self.theta[s + 1])
                for beta, sign in ((self.betas[s + 1], 1.0), (self.betas[s], -1.0)):
                    f = torch.func.functional_call(self.model, {**self.constants, **beta, **params}, (self.X,))
                    if self.target is not None:  # one output per test input
                        f = f[torch.arange(len(f)), torch.as_tensor(self.target)].unsqueeze(-1)
                    out[s] += sign * f
        return out



class ForwardJacobianReference(ReplayReference):
    """The reference with each path Jacobian ``d explained / d theta`` built column by column: one
    ``torch.func.jvp`` along each unit vector of the flat parameters (a loop of ``D`` calls, no ``vmap``)."""

    def jacobian(self, vec: torch.Tensor, xi: int) -> torch.Tensor:
        cols = []
        for p in range(vec.shape[0]):
            unit = torch.zeros_like(vec)
            unit[p] = 1.0
            cols.append(torch.func.jvp(lambda v: self.explained(v, xi), (vec.detach(),), (unit,))[1])
        return torch.stack(cols, 1)


def assert_replay_exact(traj, model: torch.nn.Module, X_test: torch.Tensor) -> None:
    """The default estimators on ``traj`` against ``model`` (evaluation mode) and :class:`ReplayReference`: replica
    <= 1e-6, residual share <= 1e-9, the reference's own residual <= 1e-12 and ``train`` scores <= 1e-9."""
    from reference import rel_err

    import explaind

    with torch.no_grad():
        truth = model.eval()(X_test)
    assert rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X_test), truth) <= 1e-6
    att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X_test)
    assert att.meta["residual_share"] <= 1e-9
    ref = ReplayReference(traj, X_test)
    assert float(ref.E.abs().max()) <= 1e-12
    assert rel_err(np.asarray(att.values), ref.kept(("train",))) <= 1e-9
