"""A slow float64 loop reference for Hugging Face models whose training moves buffers (batch norm's running
statistics), for tests/test_hf_zoo_round11.py, tests/test_hf_zoo_round11_more.py and tests/hf_zoo_round11_table.py.

:class:`BufferReplayReference` replays the buffers itself instead of reading them from the trajectory: from the
start values ``beta_0`` (the trajectory's constants), step ``s``'s training forwards run, in a plain loop over its
micro-batches, on a training-mode copy of the model at ``theta_s`` with the recorded random state and with
the buffers of that moment, which the forward updates in place (as ``BatchNorm``'s does); what is left after step
``s`` is ``beta_{s+1}``. Each sample's gradient is its own loss term's through that batched forward, one
``autograd.grad`` per sample. The explained function along step ``s``'s segment is the model in evaluation mode at
``beta_s`` (Gauss-Legendre panels, the reference's own quadrature error ``f(theta_{s+1}, beta_s) - f(theta_s,
beta_s) - phi_s delta_s`` kept), and the buffers term ``f(theta_{s+1}, beta_{s+1}) - f(theta_{s+1}, beta_s)`` is
computed per step (docs/maths.md, "Dropout and batch norm"). ``_zoo9_kit.run(case, BufferReplayReference)``
compares explaind with it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from _zoo9_kit import Float64ReplayReference, NoFloat32, logits_of
from reference import rel_err
from torch import Tensor
from torch.func import functional_call

__all__ = ["BufferReplayReference"]

DT = torch.float64


class BufferReplayReference(Float64ReplayReference):
    """The mapping loop reference with the buffers replayed step by step (module docstring)."""

    def __init__(self, traj, X: dict[str, Tensor], **kwargs: Any):
        start = traj.constants()
        #: ``betas[s]``: the buffers along step ``s``'s segment, replayed (``betas[0]`` the recorded start)
        self.betas: list[dict[str, Tensor]] = [
            {n: start[n].to(DT) if start[n].is_floating_point() else start[n].clone() for n in traj.buffer_names}]
        self._beta = self.betas[0]
        super().__init__(traj, X, **kwargs)

    def _logits(self, vec: Tensor, x: dict[str, Tensor]) -> Tensor:
        """The logits of the rows of ``x`` (one test input here), evaluated in a batch of each row twice.

        Not in a batch of one: torch's CPU backward of an evaluation-mode ``BatchNorm2d`` on a batch of one, when
        the gradient reaching it is a permuted view (CvT's projections flatten and transpose the normalised map), is
        not the derivative of the forward (measured on CvT against central differences and forward mode; a batch of
        two agrees with both).
        """
        twice = {k: torch.cat([v, v]) if isinstance(v, Tensor) else v for k, v in x.items()}
        n = next(v for v in x.values() if isinstance(v, Tensor)).shape[0]
        with NoFloat32():
            out = functional_call(self.model, {**self.constants, **self._beta, **self._unflat(vec)}, (), twice)
        return logits_of(out)[:n]

    def _compute_gradients(self) -> None:
        loss_fn = self._loss or self.traj.loss.implementation
        train_model = copy.deepcopy(self.model).train()
        self.G = torch.zeros(self.N, self.K, self.D, dtype=DT)
        for i in range(self.N):
            th = self.theta[i].clone().requires_grad_(True)
            moving = {n: b.clone() for n, b in self.betas[i].items()}  # updated in place by the training forwards
            for micro in self.traj.micro_batches(i):
                Xb, yb = self.traj.train_samples(micro.indices)
                before = torch.get_rng_state()
                if micro.state is not None:
                    torch.set_rng_state(micro.state.cpu)
                out = logits_of(functional_call(train_model, {**self.constants, **moving, **self._unflat(th)}, (),
                                                dict(Xb.data)))
                torch.set_rng_state(before)
                losses = loss_fn(out, yb).reshape(-1)
                for j in range(len(micro.indices)):
                    (g,) = torch.autograd.grad(losses[j], th, retain_graph=True)
                    self.G[i, int(micro.indices[j])] += self.coef[i]["scale"] * float(micro.weights[j]) * g
            self.betas.append({n: b.detach().clone() for n, b in moving.items()})

    def _compute_features(self) -> None:
        n = self.X.shape[0]
        self._beta = self.betas[0]
        self.O = O = self.explained(self.theta[0], 0).shape[0]
        self.phi = torch.zeros(self.N, n, O, self.D, dtype=DT)
        self.values_at = torch.zeros(self.N + 1, n, O, dtype=DT)  # f(theta_s, beta_s)
        self.quad_error = torch.zeros(self.N, n, O, dtype=DT)
        self.buffer_term = torch.zeros(self.N, n, O, dtype=DT)
        for s in range(self.N):
            for xi in range(n):
                self._beta = self.betas[s]
                with torch.no_grad():
                    start, end = self.explained(self.theta[s], xi), self.explained(self.theta[s + 1], xi)
                ts, ws = self.nodes(s, xi)
                for t, w in zip(ts, ws):
                    self.phi[s, xi] += float(w) * self.jacobian(self.theta[s] + float(t) * self.delta[s], xi)
                self.values_at[s, xi] = start
                self.quad_error[s, xi] = end - start - self.phi[s, xi] @ self.delta[s]
                self._beta = self.betas[s + 1]
                with torch.no_grad():
                    final = self.explained(self.theta[s + 1], xi)
                self.buffer_term[s, xi] = final - end
                self.values_at[s + 1, xi] = final
        self._beta = self.betas[-1]
        self.step_contrib = torch.einsum("sxod,sd->sxo", self.phi, torch.stack(self.delta))

    def figures(self, att) -> dict[str, float]:
        """The recorded buffers against the replayed ones (``buffers_replayed``: the largest ``|beta_s -
        traj.buffers(s)|`` over steps and floating buffers), explaind's buffers term (summed over steps) against
        the reference's (``buffers_term``), and the attribution's total against the explained value at
        ``(theta_N, beta_N)`` (``complete``)."""
        worst = 0.0
        for s, beta in enumerate(self.betas):
            recorded = self.traj.buffers(s)
            for name, value in beta.items():
                if value.is_floating_point():
                    worst = max(worst, float((value - recorded[name].to(DT)).abs().max()))
        terms = self.buffer_term.sum(0)
        return {"buffers_replayed": worst,
                "buffers_term": rel_err(att.buffers, terms),
                "complete": rel_err(att.total(), self.values_at[-1])}
