"""Print the errors of every hard-model case of tests/test_hard_models_*.py as one table.

Run from the repository root::

    PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/hard_models_table.py [--inductor]

Each row trains the case as its test does and prints what tests/hard_models_kit.py measures (replica against
the trained model in evaluation mode, residual share, ``keep=("train",)`` scores against the slow loop
reference), or the first line of the error explaind raises. ``--inductor`` adds ``torch.compile`` with its
default backend (compiles C++; about a minute on a 2-core CPU).
"""

from __future__ import annotations

import sys
import warnings

import torch
from hard_models_kit import data, measure, seeded, train
from test_hard_models_layers import XI, YI, ConvNorm, FunctionalDropout, RunningCenter, StochasticDepth, X, Y, mlp
from test_hard_models_packed import CASES as PACKED
from test_hard_models_packed import PackedClassifier, tokens
from test_hard_models_params import (
    XC,
    YC,
    Conv,
    Returns,
    Shared,
    Tied,
    custom_parametrizations,
    old_weight_norm,
    spectral,
    weight_norms,
)
from test_hard_models_recurrent import Conv1dNet, DeepRecurrentHead, RecurrentHead
from torch import nn

from explaind.exceptions import ExplaindError


def cases() -> list[tuple[str, dict]]:
    seq, seq_y = data(14, (4, 3), 1)
    conv1d, conv1d_y = data(14, (2, 9), 2)
    ids, ids_y = data(14, (3,), 4, classes=7, vocab=7)
    channels_last = XC.contiguous(memory_format=torch.channels_last)
    rows = []
    for cell in (nn.LSTM, nn.GRU):
        for first, opt in ((True, "sgd"), (False, "adam")):
            rows.append((f"{cell.__name__} batch_first={first} ({opt})",
                         dict(build=lambda c=cell, f=first: RecurrentHead(c, f), opt=opt, X=seq, Y=seq_y)))
    for cell, opt in ((nn.LSTM, "sgd"), (nn.GRU, "adam")):
        rows.append((f"{cell.__name__} 2 layers, dropout=0.3 between them ({opt})",
                     dict(build=lambda c=cell: DeepRecurrentHead(c, c is nn.GRU), opt=opt, X=seq, Y=seq_y)))
    packed, packed_y = tokens(14, 3)
    for name, (rnn, read, sort, opt) in PACKED.items():
        rows.append((f"packed sequences: {name} ({opt})",
                     dict(build=lambda r=rnn, d=read, s=sort: PackedClassifier(r(), d, s), opt=opt, X=packed,
                          Y=packed_y)))
    rows += [
        ("Conv1d ReLU over sequences (sgd)", dict(build=Conv1dNet, X=conv1d, Y=conv1d_y)),
        ("torch.compile(backend='eager') (adam)",
         dict(build=lambda: torch.compile(Conv1dNet(), backend="eager"), opt="adam", X=conv1d, Y=conv1d_y)),
        ("weight_norm parametrization (sgd)", dict(build=weight_norms)),
        ("weight_norm parametrization (adam)", dict(build=weight_norms, opt="adam")),
        ("weight_norm hook API (sgd)", dict(build=old_weight_norm)),
        ("spectral_norm parametrization (sgd)", dict(build=spectral, buffers=True)),
        ("parametrize: symmetric W, exp(b) (sgd)", dict(build=custom_parametrizations)),
        ("tied embedding / output (sgd)", dict(build=Tied, X=ids, Y=ids_y)),
        ("shared weight, module used twice (adam)", dict(build=Shared, opt="adam")),
        ("channels_last model and inputs (sgd)",
         dict(build=lambda: Conv().to(memory_format=torch.channels_last), X=channels_last, Y=YC)),
        ("output dict['logits'] (sgd)", dict(build=lambda: Returns("dict"), logits=lambda o: o["logits"])),
        ("output tuple (sgd)", dict(build=lambda: Returns("tuple"), logits=lambda o: o[0])),
        ("output dataclass .logits (sgd)", dict(build=lambda: Returns("dataclass"), logits=lambda o: o.logits)),
        ("output dict without 'logits' (sgd)", dict(build=lambda: Returns("unnamed"), logits=lambda o: o["scores"])),
        ("BatchNorm1d(track_running_stats=False) (sgd)",
         dict(build=lambda: mlp(nn.BatchNorm1d(6, track_running_stats=False)))),
        ("InstanceNorm2d(affine, running stats) (sgd)",
         dict(build=lambda: ConvNorm(nn.InstanceNorm2d(3, affine=True, track_running_stats=True)), X=XI, Y=YI,
              buffers=True)),
        ("LayerNorm(elementwise_affine=False) (adam)",
         dict(build=lambda: mlp(nn.LayerNorm(6, elementwise_affine=False)), opt="adam")),
        ("Dropout2d (sgd)", dict(build=lambda: ConvNorm(nn.Dropout2d(0.3), relu_first=True), X=XI, Y=YI)),
        ("SELU + AlphaDropout (sgd)",
         dict(build=lambda: nn.Sequential(nn.Linear(4, 6), nn.SELU(), nn.AlphaDropout(0.2), nn.Linear(6, 3)))),
    ]
    for name, build in (("F.dropout in forward", FunctionalDropout), ("stochastic depth, torch.rand", StochasticDepth),
                        ("non-persistent buffer updated in forward", RunningCenter)):
        rows.append((f"{name} (sgd)", dict(build=build, buffers=build is RunningCenter)))
        rows.append((f"{name}, capture_random=True (sgd)",
                     dict(build=build, buffers=build is RunningCenter, recorder={"capture_random": True})))
    if "--inductor" in sys.argv:
        rows.append(("torch.compile, default backend (sgd)", dict(build=lambda: torch.compile(Conv()), X=XC, Y=YC)))
    return rows


def run(build, opt="sgd", X=X, Y=Y, buffers=False, logits=lambda o: o, recorder=None) -> str:
    model = seeded(build)
    try:
        traj, copies = train(model, opt, X[:12], Y[:12], logits=logits, **(recorder or {}))
        got = measure(model, traj, copies, X[12:], buffers=buffers, logits=logits)
    except ExplaindError as exc:
        return f"refused: {type(exc).__name__}: {str(exc).splitlines()[-1].strip()[:150]}"
    return (f"replica {got['replica']:.1e} | share {got['residual_share']:.1e} | train vs ref "
            f"{got['train_vs_reference']:.1e} | ref residual {got['reference_residual']:.1e}")


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # the deprecated weight_norm hook API
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
    for name, case in cases():
        torch._dynamo.reset()
        print(f"| {name} | {run(**case)} |", flush=True)


if __name__ == "__main__":
    main()
