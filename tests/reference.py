r"""A slow, deliberately simple float64 reference of the ExPLAIND decomposition (docs/maths.md §4–5).

Everything is computed with plain Python loops over the definitions, independently of the engine,
and the trajectory is read only through the abstract :class:`explaind.Trajectory` interface:

* per-sample gradients ``grad l_k(theta_i)``: one ``torch.autograd.grad`` call per sample;
* the momentum recurrence unrolled by hand, with explicit loops over ``i <= s`` and the products
  ``A_{i,s} = prod_{j=i+1..s} a_j``:

  .. math::

      D_{s,k} &= -P_s \odot \big[q_s \sum_{i \le s} A_{i,s} b_i c_i w_{i,k} \nabla\ell_k(\theta_i)
                 + n_s c_s w_{s,k} \nabla\ell_k(\theta_s)\big] \\
      R_s &= -P_s \odot \big[q_s \sum_{i \le s} A_{i,s} b_i \lambda^c_i \theta_i
             + n_s \lambda^c_s \theta_s\big] - \lambda^d_s \theta_s \\
      E_s &= \Delta\theta_s - \sum_k D_{s,k} - R_s

* ``phi_s(x) = int_0^1 grad_theta f(x; theta_s + t Delta theta_s) dt`` by a Gauss–Legendre rule
  (``numpy.polynomial.legendre.leggauss``) on composite panels, with full Jacobians taken one
  output at a time. For piecewise-smooth networks the segment is first split at every kink: the
  inputs of each ``nn.ReLU``/``nn.LeakyReLU``/``nn.SELU``-like module are watched along the segment and every sign
  change is located by bisection to machine precision, so each piece is smooth (polynomial for a
  one-hidden-layer ReLU MLP) and the rule is exact on it. The reference measures its own error
  exactly, ``[f(theta_{s+1}) - f(theta_s)] - phi_s Delta theta_s``, in :attr:`Reference.quad_error`;
  the tests require it to vanish to rounding.

The full atom tensor ``psi[s, p, k, x, o] = phi_s(x)[o, p] D_{s,k}[p]`` is materialised (the runs
are tiny) and summed to any combination of kept axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.polynomial.legendre import leggauss
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["Reference", "rel_err"]

AXES = ("step", "param", "train")
#: ELUs: kink at 0 (alpha != 1); PReLU: kink at 0; Hardswish, Hardsigmoid: kinks at -3 and 3; Softshrink at +-lambd
_KINK_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.PReLU, nn.Hardswish,
                 nn.Hardsigmoid, nn.Softshrink)


def _thresholds(m: nn.Module) -> tuple[float, ...]:
    """Where the activation module ``m`` of :data:`_KINK_MODULES` has its kinks."""
    if isinstance(m, nn.ReLU6):
        return (0.0, 6.0)
    if isinstance(m, nn.Hardtanh):
        return (m.min_val, m.max_val)
    if isinstance(m, (nn.Hardswish, nn.Hardsigmoid)):
        return (-3.0, 3.0)
    if isinstance(m, nn.Softshrink):
        return (-m.lambd, m.lambd)
    return (0.0,)


def _candidate_gaps(module: nn.Module, inp: tuple) -> Tensor:
    """Differences of every pair of candidates of each maximum ``module`` takes (a sign change is a kink).

    Max pooling (padding 0, dilation 1): the values of each window (of the input padded by the module's own ``pad``
    where it has one, as BiT's ``BitMaxPool2d``); a ``mode="max"`` embedding bag of a 2-D input: each coordinate of
    the rows of each bag.
    """
    if isinstance(module, nn.EmbeddingBag):
        if inp[0].dim() != 2:
            raise NotImplementedError("the reference watches mode='max' bags of 2-D inputs only")
        cands = module.weight.detach()[inp[0]].transpose(-1, -2)  # (n, D, L)
    elif isinstance(module, nn.AdaptiveMaxPool2d):  # windows of in/out when the sizes divide (as max pooling)
        size = inp[0].shape[-2:]
        out = [o or i for o, i in zip(_pair(module.output_size), size)]
        if any(i % o for i, o in zip(size, out)):
            raise NotImplementedError("the reference watches adaptive max pooling of divisible sizes only")
        windows = tuple(i // o for i, o in zip(size, out))
        return _candidate_gaps(nn.MaxPool2d(windows, windows), inp)
    else:
        if module.padding not in (0, (0, 0)) or module.dilation not in (1, (1, 1)):
            raise NotImplementedError("the reference watches max pooling without padding or dilation only")
        x = inp[0].detach()
        if isinstance(getattr(module, "pad", None), nn.Module):  # BiT's BitMaxPool2d pads inside its forward
            x = module.pad(x)
        nd, dims = x.dim(), (1 if isinstance(module, nn.MaxPool1d) else 2)
        ks = (module.kernel_size,) * dims if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
        st = (module.stride,) * dims if isinstance(module.stride, int) else tuple(module.stride)
        for a in range(dims):  # (..., *out, *kernel): unfold appends each window axis at the end
            x = x.unfold(nd - dims + a, ks[a], st[a])
        cands = x.reshape(*x.shape[:nd], -1)
    i, j = torch.triu_indices(cands.shape[-1], cands.shape[-1], 1)
    return (cands[..., i] - cands[..., j]).reshape(-1)


def _pair(v) -> tuple:
    return (v, v) if not isinstance(v, (tuple, list)) else tuple(v)


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` (Frobenius), on numpy copies in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {a.shape} vs {b.shape}")
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (den if den > 0 else 1.0))


class Reference:
    """Slow float64 reference of replica outputs and the atom decomposition.

    Parameters
    ----------
    traj : explaind.Trajectory
        The recorded run (read through the abstract interface only).
    X : Tensor
        Test inputs, shape ``(n, ...)``.
    target : None, int sequence or "loss"
        Explained quantity: all outputs, output ``target[x]`` of each test point, or the training
        loss of ``(f(x), y)``.
    y : Tensor, optional
        Test targets (needed for ``target="loss"``).
    order, panels : int
        Gauss–Legendre nodes per panel and panels per smooth piece.
    """

    def __init__(self, traj, X: Tensor, *, target=None, y: Tensor | None = None, order: int = 8,
                 panels: int = 2):
        self.traj = traj
        self.X = X.detach().to(torch.float64) if X.is_floating_point() else X.detach()  # token ids stay integer
        self.y = y
        self.target = target
        self.names = tuple(traj.param_names)
        p0 = traj.params(0)
        self.shapes = [tuple(p0[n].shape) for n in self.names]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.D = sum(self.sizes)
        self.N = traj.n_steps
        self.K = traj.n_train
        self.model = traj.model
        self.constants = {k: (v.to(torch.float64) if v.is_floating_point() else v)
                          for k, v in traj.constants().items()}
        self.loss_fn = traj.loss.implementation
        self.group_of = np.concatenate([np.full(sz, g) for g, sz in enumerate(self.sizes)])
        nodes, weights = leggauss(order)
        self._gl = (0.5 * (nodes + 1.0), 0.5 * weights)
        self.panels = panels
        with torch.no_grad():
            self.theta = [self._flat(traj.params(s)) for s in range(self.N + 1)]
        self.delta = [self.theta[s + 1] - self.theta[s] for s in range(self.N)]
        self._compute_coefficients()
        self._compute_gradients()
        self._compute_decomposition()
        self._compute_features()

    # ------------------------------------------------------------------ helpers
    def _flat(self, d: dict[str, Tensor]) -> Tensor:
        return torch.cat([d[n].detach().to(torch.float64).reshape(-1) for n in self.names])

    def _unflat(self, vec: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = vec[start : start + size].reshape(shape)
            start += size
        return out

    def forward(self, vec: Tensor, xi: int) -> Tensor:
        """``f(x_i; theta)`` for one test point, shape ``(O,)``."""
        params = {**self.constants, **self._unflat(vec)}
        return functional_call(self.model, params, (self.X[xi : xi + 1],))[0]

    def explained(self, vec: Tensor, xi: int) -> Tensor:
        """The explained quantity for test point ``xi`` at ``theta = vec``: ``(O,)`` or ``(1,)``."""
        out = self.forward(vec, xi)
        if self.target is None:
            return out
        if isinstance(self.target, str):
            if self.target != "loss":
                raise ValueError(self.target)
            return self.loss_fn(out[None], self.y[xi : xi + 1]).reshape(1)
        t = int(self.target[xi])
        return out[t : t + 1]

    def jacobian(self, vec: Tensor, xi: int) -> Tensor:
        """Full Jacobian ``d explained / d theta``, shape ``(O, D)``, one backward pass per output."""
        th = vec.detach().clone().requires_grad_(True)
        out = self.explained(th, xi)
        rows = []
        for o in range(out.shape[0]):
            (g,) = torch.autograd.grad(out[o], th, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(th) if g is None else g)
        return torch.stack(rows).detach()

    # ------------------------------------------------------------------ coefficients
    def _coef_vec(self, value, shape: tuple[int, ...]) -> Tensor:
        t = torch.as_tensor(value, dtype=torch.float64)
        return t.expand(shape).reshape(-1).clone()

    def _compute_coefficients(self) -> None:
        self.coef: list[dict[str, Tensor]] = []
        for s in range(self.N):
            ups = self.traj.updates(s)
            c = {}
            for field in ("a", "b", "P", "q", "n", "lambda_c", "lambda_d"):
                c[field] = torch.cat([self._coef_vec(getattr(ups[n], field), sh)
                                      for n, sh in zip(self.names, self.shapes)])
            c["scale"] = float(self.traj.grad_scale(s))
            self.coef.append(c)

    # ------------------------------------------------------------------ per-sample gradients
    def _compute_gradients(self) -> None:
        """``G[i][k] = c_i * w_{i,k} * grad l_k(theta_i)`` (zero when ``k`` is not in batch ``i``)."""
        self.G = torch.zeros(self.N, self.K, self.D, dtype=torch.float64)
        for i in range(self.N):
            idx, w = self.traj.batch(i)
            Xb, yb = self.traj.train_samples(idx)
            th = self.theta[i].clone().requires_grad_(True)
            params = {**self.constants, **self._unflat(th)}
            for j in range(len(idx)):
                x_j = Xb[j : j + 1].to(torch.float64) if Xb.is_floating_point() else Xb[j : j + 1]
                out = functional_call(self.model, params, (x_j,))
                loss = self.loss_fn(out, yb[j : j + 1]).sum()
                (g,) = torch.autograd.grad(loss, th)
                k = int(idx[j])
                self.G[i, k] += self.coef[i]["scale"] * float(w[j]) * g

    # ------------------------------------------------------------------ unrolled recurrence
    def carry(self, i: int, s: int) -> Tensor:
        """``A_{i,s} = prod_{j=i+1..s} a_j`` (elementwise, ones when ``i == s``)."""
        out = torch.ones(self.D, dtype=torch.float64)
        for j in range(i + 1, s + 1):
            out = out * self.coef[j]["a"]
        return out

    def _compute_decomposition(self) -> None:
        self.Dk = torch.zeros(self.N, self.K, self.D, dtype=torch.float64)  # D_{s,k}
        self.R = torch.zeros(self.N, self.D, dtype=torch.float64)
        self.E = torch.zeros(self.N, self.D, dtype=torch.float64)
        for s in range(self.N):
            c = self.coef[s]
            mom_data = torch.zeros(self.K, self.D, dtype=torch.float64)
            mom_reg = torch.zeros(self.D, dtype=torch.float64)
            for i in range(s + 1):
                A = self.carry(i, s)
                ci = self.coef[i]
                mom_data += (A * ci["b"])[None, :] * self.G[i]
                mom_reg += A * ci["b"] * ci["lambda_c"] * self.theta[i]
            self.Dk[s] = -c["P"][None, :] * (c["q"][None, :] * mom_data + c["n"][None, :] * self.G[s])
            self.R[s] = (-c["P"] * (c["q"] * mom_reg + c["n"] * c["lambda_c"] * self.theta[s])
                         - c["lambda_d"] * self.theta[s])
            self.E[s] = self.delta[s] - self.Dk[s].sum(0) - self.R[s]

    # ------------------------------------------------------------------ path features
    #: Names of modules whose output goes through a ReLU that is no module (``torch.relu`` or ``nn.ReLU()(h)``
    #: inside ``forward``, as DistilBERT's classifier does): their outputs' sign changes are kinks too.
    kink_outputs: tuple[str, ...] = ()

    def kinks(self, s: int, xi: int, grid: int = 16) -> list[float]:
        """Points ``t in (0, 1)`` where an input of a ReLU-like module (or a ``kink_outputs`` output) changes sign,
        or two candidates of a maximum (a max-pooling window, a ``mode="max"`` bag) swap order."""
        mods = [m for m in self.model.modules() if isinstance(m, _KINK_MODULES)]
        feeding = [dict(self.model.named_modules())[name] for name in self.kink_outputs]
        maxima = [m for m in self.model.modules() if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d))
                  or (isinstance(m, nn.EmbeddingBag) and m.mode == "max")]
        if not mods and not feeding and not maxima:
            return []
        seen: list[Tensor] = []  # each hook appends its watched values minus their thresholds

        def relu_like(m: nn.Module, inp: tuple) -> None:  # before the module: an in-place one overwrites inp
            seen.extend(inp[0].detach().reshape(-1) - th for th in _thresholds(m))

        hooks = [m.register_forward_pre_hook(relu_like) for m in mods]
        hooks += [m.register_forward_hook(lambda _m, _inp, out: seen.append(out.detach().reshape(-1)))
                  for m in feeding]
        hooks += [m.register_forward_hook(lambda m, inp, _out: seen.append(_candidate_gaps(m, inp)))
                  for m in maxima]

        def pre(t: float) -> Tensor:
            seen.clear()
            with torch.no_grad():
                self.forward(self.theta[s] + t * self.delta[s], xi)
            return torch.cat(seen)

        try:
            ts = np.linspace(0.0, 1.0, grid + 1)
            vals = torch.stack([pre(float(t)) for t in ts])
            roots = []
            for j in range(grid):
                lo_v, hi_v = vals[j], vals[j + 1]
                for unit in torch.nonzero(lo_v * hi_v < 0).reshape(-1).tolist():
                    lo, hi = float(ts[j]), float(ts[j + 1])
                    sign_lo = float(lo_v[unit]) > 0
                    for _ in range(60):
                        mid = 0.5 * (lo + hi)
                        if (float(pre(mid)[unit]) > 0) == sign_lo:
                            lo = mid
                        else:
                            hi = mid
                    roots.append(0.5 * (lo + hi))
        finally:
            for h in hooks:
                h.remove()
        return sorted(set(roots))

    def nodes(self, s: int, xi: int) -> tuple[np.ndarray, np.ndarray]:
        """Quadrature nodes and weights on ``[0, 1]`` for step ``s`` and test point ``xi``."""
        cuts = [0.0, *self.kinks(s, xi), 1.0]
        ts, ws = [], []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            edges = np.linspace(lo, hi, self.panels + 1)
            for a, b in zip(edges[:-1], edges[1:]):
                ts.append(a + (b - a) * self._gl[0])
                ws.append((b - a) * self._gl[1])
        return np.concatenate(ts), np.concatenate(ws)

    def _compute_features(self) -> None:
        n = self.X.shape[0]
        O = self.explained(self.theta[0], 0).shape[0]
        self.O = O
        self.phi = torch.zeros(self.N, n, O, self.D, dtype=torch.float64)
        self.values_at = torch.zeros(self.N + 1, n, O, dtype=torch.float64)
        self.n_nodes = np.zeros((self.N, n), dtype=int)
        with torch.no_grad():
            for s in range(self.N + 1):
                for xi in range(n):
                    self.values_at[s, xi] = self.explained(self.theta[s], xi)
        for s in range(self.N):
            for xi in range(n):
                ts, ws = self.nodes(s, xi)
                self.n_nodes[s, xi] = len(ts)
                acc = torch.zeros(O, self.D, dtype=torch.float64)
                for t, w in zip(ts, ws):
                    acc += float(w) * self.jacobian(self.theta[s] + float(t) * self.delta[s], xi)
                self.phi[s, xi] = acc
        # exact per-step error of the reference's own rule: (f(s+1) - f(s)) - phi_s Delta theta_s
        self.step_contrib = torch.einsum("sxod,sd->sxo", self.phi, torch.stack(self.delta))
        self.quad_error = (self.values_at[1:] - self.values_at[:-1]) - self.step_contrib

    # ------------------------------------------------------------------ results
    def initial(self, steps: tuple[int, int] | None = None) -> np.ndarray:
        start, _ = self._window(steps)
        return self.values_at[start].numpy()

    def final(self, steps: tuple[int, int] | None = None) -> np.ndarray:
        """The explained quantity at the end of the window, ``(n, O)``."""
        _, stop = self._window(steps)
        return self.values_at[stop].numpy()

    def replica(self, steps: tuple[int, int] | None = None) -> np.ndarray:
        """``f(x; theta_start) + sum_s phi_s(x) Delta theta_s``, shape ``(n, O)``."""
        start, stop = self._window(steps)
        return (self.values_at[start] + self.step_contrib[start:stop].sum(0)).numpy()

    def _window(self, steps: tuple[int, int] | None) -> tuple[int, int]:
        if steps is None:
            return 0, self.N
        start, stop = steps
        return int(start), int(self.N if stop is None else stop)

    def atoms(self, steps: tuple[int, int] | None = None) -> np.ndarray:
        """The full atom tensor ``psi[s, p, k, x, o]`` over the window's steps."""
        start, stop = self._window(steps)
        return torch.einsum("sxop,skp->spkxo", self.phi[start:stop], self.Dk[start:stop]).numpy()

    def _per_step_param(self, vec: Tensor, steps) -> np.ndarray:
        start, stop = self._window(steps)
        return torch.einsum("sxop,sp->spxo", self.phi[start:stop], vec[start:stop]).numpy()

    def _reduce(self, full: np.ndarray, axes: Sequence[str], keep: Sequence[str]) -> np.ndarray:
        """Sum ``full`` (axes ``(*axes, "test", "output")``) to ``("test", *keep, "output")``."""
        arr, names = full, list(axes)
        if "group" in keep:
            if "param" in keep:
                raise ValueError("keep both 'group' and 'param'")
            p = names.index("param")
            n_groups = len(self.names)
            arr = np.stack([np.take(arr, np.nonzero(self.group_of == g)[0], axis=p).sum(axis=p)
                            for g in range(n_groups)], axis=p)
            names[p] = "group"
        for ax in list(names):
            if ax not in keep:
                arr = arr.sum(axis=names.index(ax))
                names.remove(ax)
        order = [len(names)] + [names.index(k) for k in keep if k in names] + [len(names) + 1]
        return np.transpose(arr, order)

    def kept(self, keep: Sequence[str], steps: tuple[int, int] | None = None) -> np.ndarray:
        """Atoms summed to ``("test", *keep, "output")``."""
        return self._reduce(self.atoms(steps), AXES, keep)

    def regularization(self, keep: Sequence[str], steps: tuple[int, int] | None = None) -> np.ndarray:
        """``phi_s(x)[o, p] R_s[p]`` summed to ``("test", *keep \\ {train}, "output")``."""
        return self._reduce(self._per_step_param(self.R, steps), ("step", "param"),
                            [k for k in keep if k != "train"])

    def residual(self, keep: Sequence[str], steps: tuple[int, int] | None = None) -> np.ndarray:
        """``phi_s(x)[o, p] E_s[p]`` summed to ``("test", *keep \\ {train}, "output")``."""
        return self._reduce(self._per_step_param(self.E, steps), ("step", "param"),
                            [k for k in keep if k != "train"])

    def quadrature(self, keep: Sequence[str], steps: tuple[int, int] | None = None) -> np.ndarray:
        """The reference's own quadrature error, per step when ``"step"`` is kept."""
        start, stop = self._window(steps)
        q = self.quad_error[start:stop].numpy()
        return np.moveaxis(q, 0, 1) if "step" in keep else q.sum(0)
