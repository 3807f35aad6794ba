"""Shared by tests/test_optimizer_state_watch_*.py: a recorded run whose momentum is halved through ``.data``."""

from __future__ import annotations

import pytest
import torch
from _stranger_loops_kit import train
from torch import nn

from explaind.exceptions import TrajectoryError


def assert_halving_refused(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Record the kit's run of ``model``; the momentum of ``model[0].weight`` halved through ``.data`` right after step
    2 must be refused at step 3, naming the parameter, the buffer and ``.data``."""
    def after(s: int) -> None:
        if s == 2:
            opt.state[model[0].weight]["momentum_buffer"].data.mul_(0.5)

    with pytest.raises(TrajectoryError, match=r"Step 3: the optimizer's momentum buffers of 0\.weight "
                                              r"\(momentum_buffer: changed through \.data\)"):
        train(model, opt, after=after)
