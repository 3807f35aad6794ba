"""Optimizer state edited through ``.data`` between steps (torch's version counter does not count such an edit).

The recorder's optimizer-state watch (explaind/trajectory/_optimizer_state_watch.py) compares a strided sample of
each carried buffer's bits, and the sum of its 64-bit words, between ``optimizer.step()`` calls (edits of single
entries between the sampled ones: tests/test_gaps_round14.py): SGD's ``momentum_buffer`` and Adam's ``exp_avg`` halved
through ``.data`` are refused at the next step, naming the parameters, the buffer, ``.data`` and the fix (before:
recorded without a word, residual share 0.16 and 0.12). Adam's ``exp_avg_sq`` and ``step``, which the adapter reads
afresh at every step, stay exact through ``.data`` edits too: no refusal, scores against the slow float64 loop
reference. Runs of tests/_stranger_loops_kit.py (a tanh MLP, 6 steps, the edit after step 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _stranger_loops_kit import adam, assert_exact, measure, mlp, sgd, train

from explaind.exceptions import TrajectoryError
from explaind.trajectory._optimizer_state_watch import SAMPLE, OptimizerStateWatch, sampled_bits

pytestmark = pytest.mark.usefixtures("one_thread")


def _through_data(key: str, edit: Callable[[torch.Tensor], Any]) -> Callable[[Any, int], None]:
    def after(opt: Any, s: int) -> None:
        if s == 2:
            for state in opt.state.values():
                edit(state[key].data)
    return after


def _run(make_opt: Callable, after: Callable[[Any, int], None]) -> tuple[Any, Any]:
    model = mlp()
    opt = make_opt(model)
    return model, train(model, opt, after=lambda s: after(opt, s))


def _rmsprop_momentum(model):
    return torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9)


@pytest.mark.parametrize(("make_opt", "key"), [(sgd, "momentum_buffer"), (adam, "exp_avg"),
                                               (_rmsprop_momentum, "momentum_buffer")],
                         ids=["sgd_momentum", "adam_exp_avg", "rmsprop_momentum"])
def test_a_carried_buffer_edited_through_data_is_refused_at_the_next_step(make_opt, key):
    with pytest.raises(TrajectoryError, match=rf"Step 3: the optimizer's momentum buffers of 0\.weight \({key}: "
                                              rf"changed through \.data\).*Fix: change the optimizer's state outside "
                                              rf"`with rec:`.*not counted by torch's version counter"):
        _run(make_opt, _through_data(key, lambda b: b.mul_(0.5)))


@pytest.mark.parametrize(("key", "edit"), [("exp_avg_sq", lambda b: b.mul_(0.5)), ("step", lambda b: b.fill_(1.0))],
                         ids=["exp_avg_sq_halved", "step_set_to_1"])
def test_state_read_afresh_at_every_step_stays_exact_through_data(key, edit):
    assert_exact(measure(*_run(adam, _through_data(key, edit))))


def test_the_sample_sees_a_halving_a_zeroing_a_last_bit_and_a_run_as_long_as_the_stride():
    """Changed sampled bits for each edit of a buffer of 10 000 entries (stride 10), the same bits for its copy."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        buf = torch.linspace(-1, 1, 10_000, dtype=dtype)
        before = sampled_bits(buf).clone()
        stride = -(-buf.numel() // SAMPLE)
        assert before.numel() <= SAMPLE and torch.equal(sampled_bits(buf.clone()), before)
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[buf.element_size()]
        for edit in (lambda b: b.mul_(0.5), lambda b: b.zero_(), lambda b, ints=ints: b.view(ints)[::7].add_(1),
                     lambda b, k=stride: b[4321:4321 + k].fill_(3.0)):
            changed = buf.clone()
            edit(changed.data)
            assert not torch.equal(sampled_bits(changed), before), (dtype, changed)


def test_one_buffer_of_several_dtypes_edited_through_data_is_named_alone():
    """Buffers of two widths (float64 and bfloat16 parameters, their samples joined in one tensor): the edited one is
    named, the other not; a restart (``opt.state.clear()``) of both passes."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3000, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(50, dtype=torch.bfloat16))
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    watch = OptimizerStateWatch("sgd", {"a": a, "b": b}, lambda: 1)
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    watch.hooks(opt)
    watch.check(opt)  # nothing changed
    opt.state.clear()
    watch.check(opt)  # a restart
    opt.step()
    watch.arm(opt)
    opt.state[b]["momentum_buffer"].data[:10].mul_(0.5)
    with pytest.raises(TrajectoryError, match=r"momentum buffers of b \(momentum_buffer: changed through \.data\) "
                                              r"changed outside"):
        watch.check(opt)
