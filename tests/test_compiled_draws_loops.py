"""Compiled code that draws random numbers in a plain loop, by the ways in other than ``torch.compile(model)``.

``torch.compile`` with inductor (its default backend) draws dropout masks and ``torch.rand`` values from its own
generator, which no eager replay repeats (explaind/_compiled.py). Each way in is refused up front naming the compiled
callable and the fix, ``torch._inductor.config.fallback_random = True`` or an eager backend, or caught at the first
checked step with the callable named and the same fix (each test failed before: the function held by the module and
the compiled loss were not refused, the failed check named inductor but not what was compiled, and inductor with
``fallback_random = True``, which draws as torch does, was refused though exact):

* ``model.forward = torch.compile(model.forward)``: refused at the recorder;
* a compiled loss drawing label noise with ``torch.rand`` given as ``loss=``: refused at the recorder;
* a submodule compiled in place (``model[0].compile()``) after the recorder started: refused at step 0 naming it
  (with the check off too since round 14, tests/test_gaps_round14.py) (before: the gradient check, which runs the
  compiled submodule with the loop's draws, passed, and the residual share warned at 0.30); one replaced by its
  ``torch.compile`` wrapper: the renamed parameters are refused at step 0 naming the wrapper (before: naming
  pruning and parametrizations);
* ``torch.compile`` of a function that calls the model: refused at its first training forward naming the function
  (since round 14, with the gradient check on or off; before, the gradient check at step 0 named it, and with the
  check off nothing did);
* ``torch.compile(model)`` with ``fallback_random = True``: recorded, exact against the slow float64 loop reference.
"""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from replay_reference import assert_replay_exact
from torch import nn

import explaind
from explaind.exceptions import ConfigError, TrajectoryError

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
FIX = r"Fix: torch\._inductor\.config\.fallback_random = True before compiling.*backend='aot_eager'"


def _data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(16, 5, generator=gen, dtype=DT)
    return X[:12], (X[:12, 0] > 0).long() + (X[:12, 1] > 0).long(), X[12:]


def _net(dropout: float = 0.3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).to(DT)


def _recorder(model, X, y, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    return opt, explaind.TrajectoryRecorder(model, opt, loss=kw.pop("loss", "cross_entropy"), train_data=(X, y),
                                            **kw)


@pytest.fixture()
def inductor_draws():
    """Inductor with its own random numbers (torch's default), dynamo's caches emptied before and after."""
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=False):
        yield
    torch._dynamo.reset()


def test_a_compiled_forward_held_by_the_module_is_refused_up_front(inductor_draws):
    X, y, _ = _data()
    model = _net()
    model.forward = torch.compile(model.forward)
    with pytest.raises(ConfigError, match=r"compiled code draws random numbers with the compiler's own generator: "
                                          r"model\.forward = torch\.compile\(\.\.\.\) \(backend='inductor'\).*" + FIX):
        _recorder(model, X, y)


def _noisy_ce(out, y):
    """Cross entropy against labels flipped to the next class with probability 0.2 (label noise by torch.rand)."""
    flip = torch.rand(y.shape) < 0.2
    return F.cross_entropy(out, torch.where(flip, (y + 1) % 3, y))


def test_a_compiled_loss_drawing_label_noise_is_refused_up_front(inductor_draws):
    X, y, _ = _data()
    with pytest.raises(ConfigError, match=r"the loss _noisy_ce = torch\.compile\(\.\.\.\) \(backend='inductor'\).*"
                                          + FIX):
        _recorder(_net(0.0), X, y, loss=torch.compile(_noisy_ce), capture_random=True)


def _step(model, opt, rec, X, y, forward):
    idx = torch.arange(4)
    opt.zero_grad()
    F.cross_entropy(forward(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def _compile_in_place(model):
    model[0].compile()


def _replace_by_wrapper(model):
    model[0] = torch.compile(model[0])


@pytest.mark.parametrize(("compile_", "match"), [
    (_compile_in_place, r"Step 0: compiled code draws random numbers with the compiler's own generator: the submodule "
                        r"'0' \(torch\.compile\(backend='inductor'\)\), compiled after the recorder started.*" + FIX),
    (_replace_by_wrapper, r"Step 0: the recorded parameter\(s\) 0\.0\.weight \(now '0\._orig_mod\.0\.weight'\).*"
                          r"replaced by its torch\.compile wrapper.*Fix: compile before the recorder starts \(then "
                          r"torch\._inductor\.config\.fallback_random = True"),
], ids=["compiled_in_place", "replaced_by_its_wrapper"])
def test_a_submodule_compiled_after_recording_began_is_named_at_step_0(inductor_draws, compile_, match):
    X, y, _ = _data()
    model = nn.Sequential(_net(), nn.Tanh()).to(DT)
    opt, rec = _recorder(model, X, y)
    with pytest.raises(TrajectoryError, match=match), rec:
        compile_(model)
        _step(model, opt, rec, X, y, model)


def test_a_compiled_function_calling_the_model_is_named_at_its_first_training_forward(inductor_draws):
    X, y, _ = _data()
    model = _net()
    opt, rec = _recorder(model, X, y)

    def logits_of(x):
        return model(x)

    with pytest.raises(TrajectoryError, match=r"training forward runs inside code compiled by torch\.compile: "
                                              r"logits_of at test_compiled_draws_loops\.py:\d+ \(torch\.compile\("
                                              r"backend='inductor'\)\).*" + FIX), rec:
        _step(model, opt, rec, X, y, torch.compile(logits_of))


def test_inductor_with_fallback_random_is_recorded_and_exact():
    X, y, X_test = _data()
    net = _net()
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        model = torch.compile(net)
        opt, rec = _recorder(model, X, y, check_gradients=True)
        with rec:
            gen = torch.Generator().manual_seed(1)
            for _ in range(3):
                idx = torch.randperm(12, generator=gen)[:4]
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                rec.log_batch(idx)
                opt.step()
    torch._dynamo.reset()
    traj = rec.trajectory
    assert max(traj.gradient_check()) <= 1e-12
    assert_replay_exact(traj, net, X_test)
