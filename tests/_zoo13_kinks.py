"""How many kinks a path crosses: for tests/test_hf_zoo_round13_more.py and tests/hf_zoo_round13_table.py, the
sign changes of the inputs of every ReLU-like module of a recorded model (tests/reference.py's list, minus each
module's thresholds: Hardswish at -3 and 3, ReLU at 0) between neighbouring points of a fine grid along step ``s``'s
segment ``theta_s + t delta_s``, evaluated in evaluation mode at that step's recorded buffers, one test input at a time.

A fine grid counts a lower bound on the kinks (two crossings of one unit inside one cell cancel); it is what LeViT's
and SwiftFormer's paths cost a rule that locates each kink (the adaptive rule; the reference's bisection, 60
forwards per kink).
"""

from __future__ import annotations

import torch
from reference import _KINK_MODULES, _thresholds
from torch import Tensor
from torch.func import functional_call

__all__ = ["kinks_on_grid"]


def kinks_on_grid(model: torch.nn.Module, traj, X: dict[str, Tensor], grid: int = 256) -> list[list[int]]:
    """Per step ``s`` and test row ``i`` of ``X``, the number of sign changes of the watched values between the
    ``grid + 1`` points ``t = 0, 1/grid, ..., 1``."""
    seen: list[Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda m, inp: seen.extend(inp[0].detach().reshape(-1) - th
                                                                    for th in _thresholds(m)))
             for m in model.modules() if isinstance(m, _KINK_MODULES)]
    model.eval()
    counts: list[list[int]] = []
    try:
        for s in range(traj.n_steps):
            start, stop = traj.params(s), traj.params(s + 1)
            fixed = {**traj.constants(), **traj.buffers(s)}
            row = []
            for i in range(next(iter(X.values())).shape[0]):
                x = {k: v[i:i + 1] for k, v in X.items()}
                values = []
                for t in torch.linspace(0.0, 1.0, grid + 1, dtype=torch.float64).tolist():
                    seen.clear()
                    params = {n: start[n] + t * (stop[n] - start[n]) for n in start}
                    with torch.no_grad():
                        functional_call(model, {**fixed, **params}, (), x)
                    values.append(torch.cat(seen))
                signs = torch.stack(values) > 0
                row.append(int((signs[1:] != signs[:-1]).sum()))
            counts.append(row)
    finally:
        for hook in hooks:
            hook.remove()
    return counts
