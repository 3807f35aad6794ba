"""Where the residual of a float32 run comes from: the rounding of the parameters, or of the loop's gradients.

For a run folder of ``explaind train`` (docs/cli.md's ``runs/cli`` example without ``--dtype float64``) it
replays every step's update with the optimizer adapter's coefficients (``traj.updates(s)``) from two
gradients of the recorded batch, computed here with ``torch.autograd`` on the run's model:

* **float64** — the gradient recomputed in float64, as the engine recomputes it: the residual
  ``E_s = Delta theta_s - (modelled update)`` of the influence scores;
* **float32** — the gradient recomputed in the run's float32, as the training loop took it (the loss
  summed with the recorded weights rather than averaged: the same value up to a rounding).

Per step it prints ``||E_s|| / ||Delta theta_s||`` and ``||E_s|| / (u ||theta_{s+1}||)`` (``u = 2**-24``, the
float32 unit roundoff: about 0.5 is the rounding of the stored parameters) for both, on a spread of steps and
the largest ones. With ``--scores DIR`` (the output of ``explaind influence RUN --out DIR``, which keeps
``step``) it also prints the residual share of the window ``0:N`` for growing ``N``, from the saved terms
(each step's change is the sum of its terms, so ``g(theta_N) - g(theta_0)`` needs no forward pass).

Run: ``python benchmarks/bench_float32_residual.py RUN [--scores DIR]``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F


def _replay(traj, dtype: torch.dtype) -> np.ndarray:
    """Rows ``(step, ||E||/||dtheta||, ||E||/(u ||theta_{s+1}||))`` with the batch gradient taken in ``dtype``."""
    model = traj.model.to(dtype)
    constants = {k: v.to(dtype) for k, v in traj.constants().items()}
    names = traj.param_names
    momentum: dict[str, torch.Tensor] = {}
    unit = 2.0 ** -24
    rows = []
    for s in range(traj.n_steps):
        theta = {n: v.detach().to(dtype).clone().requires_grad_(True) for n, v in traj.params(s).items()}
        idx, weights = traj.batch(s)
        X, y = traj.train_samples(idx)
        out = torch.func.functional_call(model, {**constants, **theta}, (X,))
        loss = (F.cross_entropy(out, y, reduction="none") * weights.to(dtype)).sum()
        grads = torch.autograd.grad(loss, list(theta.values()))
        updates, following, c = traj.updates(s), traj.params(s + 1), float(traj.grad_scale(s))
        err2 = step2 = size2 = 0.0
        for n, g in zip(names, grads):
            u = updates[n]

            def co(v):
                return torch.as_tensor(v, dtype=torch.float64)

            t = theta[n].detach().double()
            inp = c * g.double() + co(u.lambda_c) * t
            momentum[n] = co(u.b) * inp if n not in momentum else co(u.a) * momentum[n] + co(u.b) * inp
            modelled = -co(u.P) * (co(u.q) * momentum[n] + co(u.n) * inp) - co(u.lambda_d) * t
            delta = following[n].double() - traj.params(s)[n].double()
            err2 += float((delta - modelled).square().sum())
            step2 += float(delta.square().sum())
            size2 += float(following[n].double().square().sum())
        rows.append((s, (err2 / max(step2, 1e-300)) ** 0.5, err2 ** 0.5 / (unit * size2 ** 0.5)))
    return np.array(rows)


def _share_growth(scores_dir: str) -> None:
    from safetensors.torch import load_file

    t = load_file(os.path.join(scores_dir, "attribution.safetensors"))
    per_step = {k: (t[k].sum(2) if t[k].dim() == 4 else t[k]).double()
                for k in ("values", "regularization", "residual", "quadrature_error")}
    change = sum(per_step.values()).cumsum(1)  # (T, S, O): g(theta_{N}) - g(theta_0) for the window 0:N
    residual = per_step["residual"].cumsum(1)
    print("| window | residual share |")
    print("|---|---|")
    S = change.shape[1]
    for N in sorted({n for n in (50, 100, 150, 200, 250, 300, 500, 750, 1000, 1250, 1500) if n <= S} | {S}):
        share = float(residual[:, N - 1].abs().sum() / change[:, N - 1].abs().sum())
        print(f"| 0:{N} | {share:.3g} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder of 'explaind train'")
    p.add_argument("--scores", default=None, help="output folder of 'explaind influence RUN --out DIR'")
    args = p.parse_args()
    torch.set_num_threads(1)
    from explaind.studies.runs import load_run

    print(f"# load average before: {', '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores")
    traj = load_run(args.run).trajectory
    print(f"# {args.run}: {traj.n_steps} steps, parameters in {traj.dtype}; traj.audit() max "
          f"{float(np.max(traj.audit())):.3g} at step {int(np.argmax(traj.audit()))}")
    wide, own = _replay(traj, torch.float64), _replay(traj, torch.float32)
    shown = sorted(set(range(0, traj.n_steps, max(1, traj.n_steps // 10)))
                   | set(np.argsort(-wide[:, 1])[:6].tolist()) | {int(np.argmax(own[:, 1]))})
    print("| step | float64 gradient: ‖E‖/‖Δθ‖ | ‖E‖/(u‖θ_{s+1}‖) | float32 gradient: ‖E‖/‖Δθ‖ | ‖E‖/(u‖θ_{s+1}‖) |")
    print("|---|---|---|---|---|")
    for s in shown:
        print(f"| {s} | {wide[s, 1]:.3g} | {wide[s, 2]:.3g} | {own[s, 1]:.3g} | {own[s, 2]:.3g} |")
    print(f"| all steps, largest | {wide[:, 1].max():.3g} (step {int(np.argmax(wide[:, 1]))}) | {wide[:, 2].max():.3g} "
          f"| {own[:, 1].max():.3g} (step {int(np.argmax(own[:, 1]))}) | {own[:, 2].max():.3g} |")
    if args.scores:
        _share_growth(args.scores)
    print(f"# load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
