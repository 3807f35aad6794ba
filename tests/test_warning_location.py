"""Warnings name the user's line that caused them, not a line inside explaind or torch.

A fixed ``stacklevel`` points into the library whenever the call depth differs (a check run from
torch's optimizer hook, a quadrature warning raised three calls below ``predict``); Python then shows
an internal source line and its once-per-location filter counts that line for every user.
:func:`explaind.exceptions.warn_at_caller` walks up to the first frame outside the libraries.
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning, warn_at_caller


def _explaind_warnings(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, ExplaindWarning)]


def _recorded_relu_mlp(steps: int = 4):
    torch.manual_seed(0)
    X = torch.randn(24, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s in range(steps):
            idx = torch.arange(8) + 8 * (s % 3)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory, X


def test_a_quadrature_warning_names_the_line_that_called_predict():
    traj, X = _recorded_relu_mlp()
    replica = explaind.KernelReplica(quadrature="midpoint", nodes=1, tol=1e-12).fit(traj)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _line_after()
        replica.predict(X[:6])
    ours = _explaind_warnings(caught)
    assert ours, "midpoint with 1 node at tol 1e-12 must warn that it left pairs above tol"
    assert {(w.filename, w.lineno) for w in ours} == {(__file__, line)}, [(w.filename, w.lineno) for w in ours]


def test_a_recorder_check_names_the_users_with_statement():
    torch.manual_seed(1)
    X = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _line_after()
        with rec:
            for s in range(2):
                idx = torch.arange(8) + 8 * s
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                rec.log_batch(idx)
                opt.step()
            model(X)  # a training-mode forward after the last step moves BatchNorm's running statistics
    ours = [w for w in _explaind_warnings(caught) if "buffers" in str(w.message)]
    assert ours, "a buffer change after the last step must warn"
    assert {w.filename for w in ours} == {__file__}
    assert all(line <= w.lineno <= line + 8 for w in ours), [w.lineno for w in ours]


def test_frames_of_skipped_packages_are_walked_past_in_any_thread():
    namespace = {"__name__": "torch.fake_inner", "warn_at_caller": warn_at_caller}
    exec("def inner():\n    warn_at_caller('from inside')\n", namespace)
    found, line = _where(namespace["inner"])
    assert found == [(__file__, line)]

    seen: list[tuple[list[tuple[str, int]], int]] = []
    thread = threading.Thread(target=lambda: seen.append(_where(namespace["inner"])))
    thread.start()
    thread.join()
    assert seen[0][0] == [(__file__, seen[0][1])]  # _where is this module's frame: not skipped

    skipped = frozenset({"torch", "tests_fake"})
    namespace2 = {"__name__": "tests_fake", "warn_at_caller": warn_at_caller, "skipped": skipped}
    exec("def outer():\n    warn_at_caller('deep', skip=skipped)\n", namespace2)
    found, line = _where(namespace2["outer"])
    assert found == [(__file__, line)]


def _where(call) -> tuple[list[tuple[str, int]], int]:
    """The (file, line) of each warning ``call()`` raises, and the line of that call here."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _line_after()
        call()
    return [(w.filename, w.lineno) for w in caught], line


def _line_after() -> int:
    """The line number just after the caller's line."""
    import sys

    return sys._getframe(1).f_lineno + 1
