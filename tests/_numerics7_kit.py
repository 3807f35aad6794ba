"""Models, loops and measurements of the seventh numerics round: runs as a new user writes them (docs/quickstart.md),
in float32, half precision and at untuned learning rates, measured for the replica error, the residual share and
the warnings (``tests/numerics_round7_table.py`` prints the table, ``tests/test_numerics_round7.py`` tests the fixes).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError

N_TRAIN, N_IN, N_OUT, BATCH = 64, 8, 3, 16


def data(dtype: torch.dtype = torch.float32, kind: str = "vec", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``N_TRAIN`` inputs (``"vec"``: 8 features, ``"img"``: 1x8x8, ``"tok"``: 6 tokens of 10) and 3-class labels."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "img":
        X = torch.randn(N_TRAIN, 1, 8, 8, generator=gen).to(dtype)
    elif kind == "tok":
        X = torch.randint(10, (N_TRAIN, 6), generator=gen)
    else:
        X = torch.randn(N_TRAIN, N_IN, generator=gen).to(dtype)
    return X, torch.randint(N_OUT, (N_TRAIN,), generator=gen)


def mlp(act: type[nn.Module] = nn.Tanh, hidden: int = 16, seed: int = 0) -> nn.Sequential:
    """An 8-h-h-3 MLP."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_IN, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, N_OUT))


class CNN(nn.Module):
    """Two ReLU convolutions and a linear head on 1x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, N_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1))


class TinyTransformer(nn.Module):
    """Token embedding, learned positions, one GELU encoder layer (no dropout), mean pooling, linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 16)
        self.pos = nn.Parameter(torch.randn(6, 16) * 0.1)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, activation="gelu")
        self.head = nn.Linear(16, N_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.emb(x) + self.pos).mean(1))


class Scaled(nn.Module):
    """``k`` times the inner model's output (logits of scale ``k``)."""

    def __init__(self, inner: nn.Module, k: float) -> None:
        super().__init__()
        self.inner, self.k = inner, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.k


def train(model: nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, steps: int, *,
          loss: str = "cross_entropy", lr_at: Callable[[int], float] | None = None,
          forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
    """The quickstart's loop over ``steps`` batches of ``BATCH``; returns ``(trajectory, error or None)``.

    ``forward(model, x, y)`` returns the loss (default: the model's output under ``loss``); ``lr_at(s)`` sets every
    group's learning rate before step ``s``. An error raised by the recorder is returned, not raised, with the
    trajectory of the steps recorded before it.
    """
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y))
    lossf = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    gen = torch.Generator().manual_seed(1)
    error = None
    try:
        with rec:
            for s in range(steps):
                if lr_at is not None:
                    for group in opt.param_groups:
                        group["lr"] = lr_at(s)
                idx = torch.randint(len(X), (BATCH,), generator=gen)
                opt.zero_grad()
                value = forward(model, X[idx], y[idx]) if forward else lossf(model(X[idx]), y[idx])
                value.backward()
                rec.log_batch(idx)
                opt.step()
    except TrajectoryError as exc:
        error = exc
    return rec.trajectory, error


def explain(model: nn.Module, traj, X_test: torch.Tensor) -> dict:
    """Replica (default estimator) and ``keep=("train",)`` scores as the quickstart computes them.

    Returns ``replica`` (max relative error against the recorded final state, in float64), ``model`` (against the
    user's model), ``share``, ``quad`` (quadrature share), ``warnings`` (the messages of every warning raised), and
    ``cpu`` seconds.
    """
    t0 = time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = explaind.KernelReplica(device="cpu").fit(traj).fidelity_report(X_test, model=model)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X_test)
    return {"replica": float(report["max_rel_error"]), "model": float(report["model_max_rel_error"]),
            "share": float(att.meta["residual_share"]), "quad": float(att.meta["quadrature_share"]),
            "warnings": [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)],
            "cpu": time.process_time() - t0}


def diverging(dtype: torch.dtype, steps: int = 12):
    """SGD at lr 200 on the ReLU MLP: the outputs reach 1e29 by step 4; in float32 step 6's gradient is NaN."""
    X, y = data(dtype)
    model = mlp(nn.ReLU).to(dtype)
    traj, error = train(model, torch.optim.SGD(model.parameters(), lr=200.0), X, y, steps)
    return model, traj, error, X[:8]


def rounded_away(lr: float, steps: int = 10):
    """Float32 SGD at a learning rate whose updates fall below half an ulp of the parameters (all: lr 1e-12)."""
    X, y = data(torch.float32)
    model = mlp()
    traj, _ = train(model, torch.optim.SGD(model.parameters(), lr=lr), X, y, steps)
    return model, traj, X[:8]


def half_model(dtype: torch.dtype, optimizer: str = "sgd", steps: int = 50):
    """The tanh MLP stored and trained in ``dtype`` (``model.to(dtype)``, no float32 master weights)."""
    X, y = data(dtype)
    model = mlp().to(dtype)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    traj, _ = train(model, opt, X, y, steps)
    return model, traj, X[:8]


def relu_adam_lr1(steps: int = 300):
    """Adam at lr 1.0 on the ReLU MLP: its first steps' changes dwarf the outputs and cross many kinks."""
    X, y = data(torch.float32)
    model = mlp(nn.ReLU)
    traj, _ = train(model, torch.optim.Adam(model.parameters(), lr=1.0), X, y, steps)
    return model, traj, X[:8]


def midpoint_reference(model: nn.Module, traj, X: torch.Tensor, step: int, nodes: int = 10_000,
                       chunk: int = 500) -> torch.Tensor:
    r"""The step's path integral :math:`\int_0^1 \nabla f(x;\theta_s + t\Delta\theta_s)\,dt\,\Delta\theta_s` by the
    ``nodes``-point midpoint rule in float64, with ``torch.func.jvp`` (independent of the engine), ``(n, O)``."""
    wide = copy.deepcopy(model).double().eval()
    a = {k: v.double() for k, v in traj.params(step).items()}
    b = {k: v.double() for k, v in traj.params(step + 1).items()}
    delta = {k: b[k] - a[k] for k in a}
    x = X.double() if X.is_floating_point() else X

    def at(t: torch.Tensor) -> torch.Tensor:
        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(wide, p, (x,))

        return torch.func.jvp(f, ({k: a[k] + t * delta[k] for k in a},), (delta,))[1]

    total = torch.zeros(())
    ts = (torch.arange(nodes, dtype=torch.float64) + 0.5) / nodes
    for lo in range(0, nodes, chunk):
        total = total + torch.func.vmap(at)(ts[lo:lo + chunk]).sum(0)
    return total / nodes


def step_errors(model: nn.Module, traj, X: torch.Tensor, steps: range, nodes: int = 10_000) -> list[dict]:
    """Per step of one ``keep=("step",)`` attribution of the whole run (the adaptive rule at its default tol): the
    error it reports (``quadrature_error``) against the distance of its estimate (the sum of the step's terms) from
    the dense midpoint reference, and the reference's own error against ``g(theta_s+1) - g(theta_s)``, all as the
    largest over inputs and outputs."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        att = explaind.InfluenceEstimator(keep=("step",), device="cpu").fit(traj).transform(X)
    estimate = att.values + att.regularization + att.residual + att.buffers  # (test, step, output)
    wide = copy.deepcopy(model).double().eval()
    rows = []
    for s in steps:
        outputs = []
        for k in (s, s + 1):
            wide.load_state_dict({n: v.double() for n, v in traj.params(k).items()}, strict=False)
            with torch.no_grad():
                outputs.append(wide(X.double() if X.is_floating_point() else X))
        exact, reference = outputs[1] - outputs[0], midpoint_reference(model, traj, X, s, nodes)
        rows.append({"step": s, "change": float(exact.abs().max()),
                     "reported": float(att.quadrature_error[:, s].abs().max()),
                     "estimate_vs_exact": float((estimate[:, s] - exact).abs().max()),
                     "estimate_vs_reference": float((estimate[:, s] - reference).abs().max()),
                     "reference_error": float((reference - exact).abs().max())})
    return rows
