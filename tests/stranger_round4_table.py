"""Print the table of tests/test_stranger_round4.py: each case's replica error, residual share, train-score error
and class (exact, loud, or the warning or error a user sees). Not collected by pytest.

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round4_table.py

Model rows train as tests/hard_models_kit.py does (float64, SGD 0.5, adaptive rule at tol 1e-11) and compare with
tests/replay_reference.py; loop rows as tests/_stranger_loops_kit.py (8-node Gauss-Legendre, tests/reference.py)
or, for the learning-rate rows, with the default estimators. The load average is printed first; no figure is a
timing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from _round4_kit import (
    XT,
    XV,
    YT,
    YV,
    Tokens,
    annealed,
    default_figures,
    estimator_warnings,
    float32_inputs,
    hooked,
    one_hot_router,
    relu_mlp,
    replica_warnings,
    scaled_run,
    scripted,
    stack,
    straight_through,
    warm_up,
)
from _round4_kit import custom_function as function
from _stranger_loops_kit import batches, data, mlp, sgd
from _stranger_loops_kit import measure as measure_loop
from hard_models_kit import measure, seeded, train
from replay_reference import BufferReference
from test_stranger_round4 import EXACT_MODELS
from torch import nn

import explaind
from explaind.exceptions import ExplaindError, ExplaindWarning


def model_row(build: Callable[[], nn.Module], X: Any = XV, Y: Any = YV, key: str = "", **recorder: Any) -> str:
    """Train and measure one model case; its figures, or the first explaind warning or error (shown around
    ``key``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ExplaindWarning)
            model = seeded(build)
            panels = recorder.pop("panels", 2)  # the reference's, not the recorder's
            traj, copies = train(model, "sgd", X[:12], Y[:12], **recorder)
            explaind.KernelReplica(device="cpu", tol=1e-11).fit(traj).predict(X[12:])  # an error when explaining
            got = measure(model, traj, copies, X[12:], panels=panels)
    except (ExplaindError, ExplaindWarning) as exc:
        return f"| | | | {type(exc).__name__}: {_cut(str(exc), key)} |"
    exact = got["replica"] <= 1e-6 and got["residual_share"] <= 1e-9 and got["train_vs_reference"] <= 1e-9
    return (f"| {got['replica']:.1e} | {got['residual_share']:.1e} | {got['train_vs_reference']:.1e} | "
            f"{'exact' if exact else 'NOT EXACT'} |")


def loop_row(figures: dict[str, Any]) -> str:
    exact = figures["replica"] <= 1e-6 and figures["share"] <= 1e-9 and figures["scores"] <= 1e-9
    return (f"| {figures['replica']:.1e} | {figures['share']:.1e} | {figures['scores']:.1e} | "
            f"{'exact' if exact and not figures['warnings'] else 'NOT EXACT'} |")


def _cut(message: str, key: str = "") -> str:
    """The message on one line, cut to 200 characters around ``key`` (its start when absent)."""
    text = " ".join(message.split())
    at = max(text.find(key) - 40, 0) if key and key in text else 0
    return ("..." if at else "") + text[at:at + 200] + ("..." if len(text) > at + 200 else "")


def warned_row(err: float | None, share: float | None, caught: list[str], key: str) -> str:
    shown = next((w for w in caught if key in w), caught[0] if caught else "no warning")
    return (f"| {'' if err is None else f'{err:.1e}'} | {'' if share is None else f'{share:.1e}'} | | "
            f"warns: {_cut(shown, key)} |")


def contrastive() -> str:
    """An in-batch contrastive loss (each sample's positive is itself) given as the loss callable."""
    def loss(out, y):
        z = torch.nn.functional.normalize(out, dim=-1)
        return torch.nn.functional.cross_entropy(z @ z.T / 0.5, torch.arange(len(out)))

    model = mlp()
    opt = sgd(model)
    X, y, _ = data()
    try:
        rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y))
        with rec:
            for idx in batches():
                opt.zero_grad()
                loss(model(X[idx]), y[idx]).backward()
                rec.log_batch(idx)
                opt.step()
    except ExplaindError as exc:
        return f"| | | | {type(exc).__name__}: {_cut(str(exc), 'coupling')} |"
    return "| | | | not refused |"


def temperature() -> str:
    try:
        annealed(counted=False)
    except ExplaindError as exc:
        return f"| | | | {type(exc).__name__}: {_cut(str(exc), 'tau')} |"
    return "| | | | not refused |"


def temperature_ignored() -> str:
    model, traj = annealed(counted=False, ignore_attributes=["tau"])
    err, _ = replica_warnings(model, traj)
    share, caught = estimator_warnings(traj)
    return warned_row(err, share, caught, "Python attribute")


def diverging() -> str:
    model, traj = scaled_run(50.0, relu_mlp)
    err, caught = replica_warnings(model, traj)
    return warned_row(err, None, caught, "per-step errors add up")


def tiny() -> str:
    model, traj = scaled_run(1e-14)
    err, _ = replica_warnings(model, traj)
    share, caught = estimator_warnings(traj)
    return warned_row(err, share, caught, "rounding level")


def main() -> None:
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print("| case | replica | residual share | train vs reference | class |")
    print("|---|---|---|---|---|")
    for name, (build, X, Y, kw) in EXACT_MODELS.items():
        print(f"| {name} {model_row(build, X, Y, **kw)}", flush=True)
    print(f"| hardsigmoid (tol 1e-11) {model_row(stack(nn.Hardsigmoid(), nn.Hardsigmoid()))}", flush=True)
    for opt in ("sgd", "adam"):
        print(f"| LambdaLR factors 0 at steps 0 and 3 ({opt}) {loop_row(warm_up(opt))}", flush=True)
    print(f"| float32 inputs, float64 model {loop_row(float32_inputs())}", flush=True)
    adam = default_figures(*scaled_run(3.0, relu_mlp, torch.optim.Adam))
    print(f"| Adam lr 3, ReLU MLP, default estimators {loop_row(adam)}", flush=True)
    counted = measure_loop(*annealed(counted=True), BufferReference)
    print(f"| temperature from an integer buffer the forward counts {loop_row(counted)}", flush=True)
    centred = EXACT_MODELS["batch_centred_captured"][0]
    loud = [("batch centring without capture_random", lambda: model_row(centred, key="capture_random=True")),
            ("hardshrink", lambda: model_row(stack(nn.Hardshrink(0.3)), key="whose output jumps")),
            ("threshold", lambda: model_row(stack(nn.Threshold(0.1, -1.0)), key="whose output jumps")),
            ("straight-through round", lambda: model_row(straight_through, key="torch.round")),
            ("Embedding(scale_grad_by_freq=True)", lambda: model_row(Tokens, XT, YT, key="scale_grad_by_freq")),
            ("torch.jit.script block", lambda: model_row(scripted, key="TorchScript")),
            ("old-style autograd.Function", lambda: model_row(lambda: function(old=True), key="old style")),
            ("F.one_hot top-1 router", lambda: model_row(one_hot_router, key="F.one_hot")),
            ("backward hook rescaling a gradient", lambda: model_row(hooked(0.5), key="gradient hooks")),
            ("in-batch contrastive loss callable", contrastive),
            ("temperature as a Python attribute changed between steps", temperature),
            ("the same, let through with ignore_attributes=['tau']", temperature_ignored),
            ("SGD lr 50, ReLU MLP (diverging), default replica", diverging),
            ("SGD lr 1e-14, default estimators", tiny)]
    for name, row in loud:
        print(f"| {name} {row()}", flush=True)


if __name__ == "__main__":
    main()
