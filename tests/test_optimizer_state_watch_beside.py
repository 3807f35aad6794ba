"""The optimizer-state watch's reads after a step, made on the state copier's thread, finished when the step returns.

explaind/trajectory/_optimizer_state_watch.py reads the carried buffers after every ``optimizer.step()`` (a copy of
each buffer's sampled bits and the sum of its 64-bit words); in a recorder, for CPU buffers of at least
``BESIDE_FROM`` entries in all, on the recorder's state copier thread, and a post-step hook registered after the
recorder's own waits for them. Here every read made off the loop's thread is slowed by a sleep (and
``BESIDE_FROM`` is 0, so that the small models of tests/_stranger_loops_kit.py take that path): an edit of the
momentum right after ``optimizer.step()`` returns, through ``.data`` or in place, is still refused at the next step
(a read still running when the step returned would see the edited bits and let it through), in memory and with a
store; a run without an edit stays exact against the kit's slow float64 loop reference; a watch without a copier
reads on the loop's thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _stranger_loops_kit import adam, assert_exact, measure, mlp, sgd, train
from _watch_kit import assert_halving_refused

from explaind.exceptions import TrajectoryError
from explaind.trajectory import _optimizer_state_watch
from explaind.trajectory._optimizer_state_watch import OptimizerStateWatch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def slow_reads(monkeypatch) -> list[str]:
    """Every read of the buffers made off the loop's thread sleeps first; returns the thread name of each read."""
    real = OptimizerStateWatch._read
    threads: list[str] = []

    def slow(self, seen, into=None):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.05)
        threads.append(threading.current_thread().name)
        return real(self, seen, into)

    monkeypatch.setattr(OptimizerStateWatch, "_read", slow)
    monkeypatch.setattr(_optimizer_state_watch, "BESIDE_FROM", 0)
    return threads


def _edit_after(step: int, key: str, edit: Callable[[torch.Tensor], Any]) -> Callable[[Any, int], None]:
    def after(opt: Any, s: int) -> None:
        if s == step:  # at once: the reads after this step may still be running unless the step waited for them
            for state in opt.state.values():
                edit(state[key])
    return after


def _train(make_opt: Callable, after: Callable[[Any, int], None] | None, **options) -> tuple[Any, Any]:
    model = mlp()
    opt = make_opt(model)
    return model, train(model, opt, after=None if after is None else (lambda s: after(opt, s)), **options)


@pytest.mark.parametrize("store", [False, True], ids=["memory", "store"])
@pytest.mark.parametrize(("make_opt", "key"), [(sgd, "momentum_buffer"), (adam, "exp_avg")], ids=["sgd", "adam"])
@pytest.mark.parametrize(("edit", "how"), [(lambda b: b.data.mul_(0.5), r"changed through \.data"),
                                           (lambda b: b.add_(1e-3), "changed in place")],
                         ids=["through_data", "in_place"])
def test_an_edit_right_after_the_step_is_refused_at_the_next(slow_reads, tmp_path, store, make_opt, key, edit, how):
    options = {"store": tmp_path / "run"} if store else {}
    with pytest.raises(TrajectoryError, match=rf"Step 3: the optimizer's momentum buffers of 0\.weight \({key}: "
                                              rf"{how}\).*Fix: change the optimizer's state outside `with rec:`"):
        _train(make_opt, _edit_after(2, key, edit), **options)
    assert "explaind-state-copy" in " ".join(slow_reads)  # the reads after the steps ran on the copier's thread


@pytest.mark.parametrize("store", [False, True], ids=["memory", "store"])
@pytest.mark.parametrize("make_opt", [sgd, adam], ids=["sgd", "adam"])
def test_a_run_without_edits_stays_exact_with_the_reads_beside(slow_reads, tmp_path, store, make_opt):
    model, traj = _train(make_opt, None, **({"store": tmp_path / "run"} if store else {}))
    assert_exact(measure(model, traj))
    assert any(t.startswith("explaind-state-copy") for t in slow_reads), slow_reads


def test_a_watch_without_a_copier_reads_on_the_loops_thread(slow_reads):
    """The watch alone (no recorder): its reads run inline, and an edit through ``.data`` is refused."""
    w = torch.nn.Parameter(torch.randn(300, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    watch = OptimizerStateWatch("sgd", {"w": w}, lambda: 1)
    w.grad = torch.ones_like(w)
    opt.step()
    watch.hooks(opt)
    opt.step()
    watch.arm(opt)
    assert set(slow_reads) == {threading.main_thread().name}
    opt.state[w]["momentum_buffer"].data[7] += 1.0
    with pytest.raises(TrajectoryError, match=r"momentum buffers of w \(momentum_buffer: changed through \.data\)"):
        watch.check(opt)


def _all_transposed() -> torch.nn.Sequential:
    """A bias-free tanh MLP whose weights are held transposed in memory: the recorder copies theta on the loop's
    thread (not contiguous), so only the watch's own post-step hook waits for its reads."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3, bias=False)).double()
    for i in (0, 2):
        model[i].weight = torch.nn.Parameter(model[i].weight.detach().t().contiguous().t())
    return model


def test_the_step_waits_for_the_reads_when_the_recorder_copies_nothing_beside(slow_reads):
    model = _all_transposed()
    assert_halving_refused(model, sgd(model))
    assert "explaind-state-copy" in " ".join(slow_reads)
