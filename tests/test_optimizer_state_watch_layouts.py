"""The optimizer-state watch on momentum buffers that are not contiguous or start off an 8-byte boundary.

explaind/trajectory/_optimizer_state_watch.py keeps views of each carried buffer's bits (its sample and its 64-bit
words) from step to step. Before, a buffer that is not contiguous (the momentum of a transposed parameter, of a
``channels_last`` convolution) was read through ``reshape(-1)``, a copy, and a buffer whose storage offset is off
an 8-byte boundary had its words read through a copy too; the views of those copies were kept, so every later
comparison read the copy made at the first step, and an edit through ``.data`` was recorded without a word (the
first three tests and the end-to-end refusal fail on the code before). Now a buffer whose entries fill one block of
memory (a permuted layout) is viewed in memory order, and any other is read through a fresh copy at every read.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _stranger_loops_kit import assert_exact, measure, mlp, train
from _watch_kit import assert_halving_refused
from torch import nn

from explaind.exceptions import TrajectoryError
from explaind.trajectory._optimizer_state_watch import SAMPLE, OptimizerStateWatch

pytestmark = pytest.mark.usefixtures("one_thread")


def _watched(make_param: Callable[[], torch.Tensor], make_buffer: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> tuple[torch.optim.SGD, torch.Tensor, OptimizerStateWatch]:
    """An SGD momentum optimizer of one parameter after one step (its buffer replaced by ``make_buffer``), watched."""
    torch.manual_seed(0)
    w = nn.Parameter(make_param())
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.randn_like(w)
    opt.step()
    if make_buffer is not None:
        opt.state[w]["momentum_buffer"] = make_buffer(opt.state[w]["momentum_buffer"])
    watch = OptimizerStateWatch("sgd", {"w": w}, lambda: 1)
    watch.hooks(opt)
    watch.check(opt)  # unchanged: passes
    opt.step()
    watch.arm(opt)
    watch.check(opt)
    return opt, w, watch


def _unsampled(buf: torch.Tensor) -> int:
    """A position in memory order (of the buffer's block) that the sample leaves out."""
    stride = -(-buf.numel() // SAMPLE)
    assert stride > 1
    return 5 * stride + 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_an_unsampled_entry_of_a_permuted_buffer_edited_through_data_is_refused(dtype, layout):
    if layout == "transposed":
        opt, w, watch = _watched(lambda: torch.randn(60, 50, dtype=dtype).t())
    else:
        opt, w, watch = _watched(lambda: torch.randn(8, 6, 7, 7, dtype=dtype).to(memory_format=torch.channels_last))
    buf = opt.state[w]["momentum_buffer"]
    assert not buf.is_contiguous()
    memory = buf.as_strided((buf.numel(),), (1,))  # the block of memory the buffer fills
    memory.data[_unsampled(buf)] += 1.0
    with pytest.raises(TrajectoryError, match=r"momentum buffers of w \(momentum_buffer: changed through \.data\)"):
        watch.check(opt)


@pytest.mark.parametrize("where", ["offset_4_bytes", "every_other_entry"])
def test_an_unsampled_entry_of_a_buffer_read_through_a_copy_is_refused(where):
    """A float32 buffer at a storage offset of 4 bytes, and one that takes every other entry of its storage: both
    are read through a copy, made afresh at each read."""
    def place(buf: torch.Tensor) -> torch.Tensor:
        n = buf.numel()
        block = torch.zeros(n + 1 if where == "offset_4_bytes" else 2 * n)
        out = block[1:] if where == "offset_4_bytes" else block[::2]
        return out.copy_(buf)

    opt, w, watch = _watched(lambda: torch.randn(3001), place)
    buf = opt.state[w]["momentum_buffer"]
    buf.data[_unsampled(buf)] += 1.0
    with pytest.raises(TrajectoryError, match=r"momentum buffers of w \(momentum_buffer: changed through \.data\)"):
        watch.check(opt)


def _transposed_mlp() -> nn.Sequential:
    """The kit's tanh MLP with its first weight held transposed in memory (same values, not contiguous)."""
    model = mlp()
    model[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous().t())
    assert not model[0].weight.is_contiguous()
    return model


def test_a_transposed_parameters_momentum_halved_through_data_is_refused_at_the_next_step():
    model = _transposed_mlp()
    assert_halving_refused(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def test_a_transposed_parameter_without_edits_stays_exact():
    model = _transposed_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert_exact(measure(model, train(model, opt)))
