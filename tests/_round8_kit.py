"""Set-up of tests/test_stranger_round8.py, tests/test_stranger_round8_more.py and tests/stranger_round8_table.py: the
eighth round of models, layers and losses a new user brings (written from docs/quickstart.md and
docs/guide_own_model.md only).

Every case trains as tests/_round5_kit.py does (float64 plain loop, SGD 0.5 unless the case names another optimizer
or rate, 3 steps of 4 of 12 samples, 2 held-out inputs, the adaptive rule at tol 1e-11) and is measured by
tests/_round6_kit.py's :func:`figures`; batch norm, instance norm and spectral norm are checked against
tests/replay_reference.py's ``BufferReference`` (step ``s`` evaluated at the recorded buffers). The models are in
tests/_round8_models.py, the losses, loops and cases in tests/_round8_cases.py. :func:`classify` is the seventh
round's verdict; :func:`jump_sites` runs explaind's probe of calls that can jump on one input.
"""

from __future__ import annotations

from typing import Any

import torch
from _round7_kit import assert_exact, classify, figures, scores_bound
from torch import Tensor, nn

from explaind.kernel.jumps import find_jumps

__all__ = ["assert_buffers_exact", "assert_exact", "classify", "figures", "jump_sites", "scores_bound"]


def assert_buffers_exact(got: dict[str, Any]) -> None:
    """The bounds of :func:`assert_exact` with the scores held to 1e-9 directly: against ``BufferReference`` the
    reference's own quadrature measure holds the buffers' change, so it cannot widen the bound."""
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and not got["warnings"], got
    assert got["scores"] <= 1e-9 and got["reference_residual"] <= 1e-10, got


def jump_sites(model: nn.Module, x: Tensor) -> tuple[str, ...]:
    """What :func:`explaind.kernel.jumps.find_jumps` names on ``model`` at one input ``x`` (all parameters trainable,
    the model in evaluation mode)."""
    params = dict(model.named_parameters())
    model.eval()

    def forward(point: dict[str, Tensor]) -> Any:
        return torch.func.functional_call(model, point, (x,))

    return find_jumps(model, forward, params, tuple(params))
