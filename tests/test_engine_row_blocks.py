"""Rows of many steps in per-step blocks (explaind.kernel.layer_hooks.step_blocks, StepRows.linear).

The layer-factored evaluator lays the rows ``(step, input, t)`` of a refinement level out in blocks of
one step each and forms the forward-mode tangent of every linear layer itself. Checked here in float64
against per-row ``torch.func.jvp`` loops at each row's own parameters, against the generic path
(``vmap`` over per-row parameters) and against the same rows evaluated one at a time, so that a layout
that mixed rows of different steps or inputs fails.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from engine_testkit import rel
from torch import Tensor, nn
from torch.func import jvp

from explaind.kernel.autograd import AutogradEvaluator
from explaind.kernel.evaluate import Rows, StepStack
from explaind.kernel.explained import Explained, FunctionalModel
from explaind.kernel.layer_hooks import BLOCK_ROWS, step_blocks
from explaind.kernel.layers import LayerEvaluator
from explaind.losses import resolve_loss

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


class ProjectionHeads(nn.Module):
    """Scaled token embeddings, bias-free single-projection heads (query = key = value), no residual around
    attention, two ReLU layers, log-probabilities of the last position: python scalars and an ``int`` sum
    between covered layers, as in the ExPLAIND paper's transformer."""

    def __init__(self, vocab: int = 7, d: int = 8, heads: int = 2, d_mlp: int = 12):
        super().__init__()
        self.d, self.d_head = d, d // heads
        self.embed = nn.Embedding(vocab, d)
        self.heads_in = nn.ModuleList(nn.Linear(d, d // heads, bias=False) for _ in range(heads))
        self.heads_out = nn.ModuleList(nn.Linear(d // heads, d, bias=False) for _ in range(heads))
        self.linear1 = nn.Linear(d, d_mlp)
        self.linear2 = nn.Linear(d_mlp, d)
        self.unembed = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) * math.sqrt(self.d)
        a = 0
        for proj_in, proj_out in zip(self.heads_in, self.heads_out):
            z = proj_in(x)
            a = a + proj_out(torch.softmax(z @ z.transpose(-1, -2) / math.sqrt(self.d_head), dim=-1) @ z)
        y = a + torch.relu(self.linear2(torch.relu(self.linear1(a))))
        return torch.log_softmax(self.unembed(y[:, -1]), dim=-1)


def _frozen_parts() -> nn.Module:
    """Raw features into a Linear with a frozen weight and a moving bias, then one with a frozen bias."""
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4))
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


MODELS = {
    "heads": (ProjectionHeads, lambda T, g: torch.randint(0, 7, (T, 4), generator=g)),
    "frozen": (_frozen_parts, lambda T, g: torch.randn(T, 3, generator=g, dtype=DT)),
}


def _stack(case: str, T: int, S: int, seed: int = 0):
    make, inputs = MODELS[case]
    torch.manual_seed(seed)
    model = make().to(DT)
    gen = torch.Generator().manual_seed(seed + 1)
    X = inputs(T, gen)
    names = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    constants = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fm = FunctionalModel(model, constants, resolve_loss("nll").implementation, torch.device("cpu"), DT)
    params = dict(model.named_parameters())
    base = {n: params[n].detach() + 0.3 * torch.randn((S, *params[n].shape), generator=gen, dtype=DT) for n in names}
    delta = {n: 0.5 * torch.randn((S, *params[n].shape), generator=gen, dtype=DT) for n in names}
    with torch.no_grad():
        n_out = fm({n: v[0] for n, v in base.items()}, X[:1]).reshape(1, -1).shape[1]
    explained = Explained("outputs", torch.zeros(T, 1, dtype=DT), n_out)
    return fm, names, StepStack(base, delta, X, explained)


def _loop(fm, stack: StepStack, rows: Rows) -> tuple[Tensor, Tensor]:
    """h and dh/dt of each row by its own torch.func.jvp at theta_s + t delta_s (a plain loop)."""
    prim, tang = [], []
    for s, i, t in zip(rows.steps.tolist(), rows.inputs.tolist(), rows.t.tolist()):
        point = {n: stack.base[n][s] + t * stack.delta[n][s] for n in stack.base}
        direction = {n: stack.delta[n][s] for n in stack.base}

        def g(p, i=i):
            return stack.explained(fm, p, stack.X[i:i + 1], stack.explained.aux[i:i + 1])[0]

        p, d = jvp(g, (point,), (direction,))
        prim.append(p)
        tang.append(d)
    return torch.stack(prim), torch.stack(tang)


def _uneven_rows(S: int, T: int, seed: int) -> Rows:
    """One step with many rows, others with one to three, one step absent; repeated (step, input) pairs."""
    gen = torch.Generator().manual_seed(seed)
    counts = [23, 1, 0, 3, 2, 7][:S]
    steps = torch.cat([torch.full((c,), s) for s, c in enumerate(counts)])
    steps = steps[torch.randperm(steps.numel(), generator=gen)]  # unsorted, as the adaptive rule asks
    inputs = torch.randint(0, T, (steps.numel(),), generator=gen)
    inputs[:4] = 1  # the same input at several steps and points
    return Rows(steps, inputs, torch.rand(steps.numel(), generator=gen, dtype=DT))


@pytest.mark.parametrize("case", sorted(MODELS))
def test_rows_of_uneven_steps_match_the_per_row_loop_and_the_generic_path(case):
    fm, names, stack = _stack(case, T=5, S=6)
    rows = _uneven_rows(6, 5, seed=3)
    want_h, want_d = _loop(fm, stack, rows)
    generic = AutogradEvaluator(fm, 256).slopes(stack, rows)
    for chunk in (4, 1024):  # several batches of sorted rows, or one
        ev = LayerEvaluator(AutogradEvaluator(fm, 256, rows_chunk=chunk), names)
        h, d = ev.slopes(stack, rows)
        assert "rows" in ev.used, ev.state["rows"]
        assert rel(h, want_h) <= 1e-13 and rel(d, want_d) <= 1e-12
        assert rel(h, generic[0]) <= 1e-13 and rel(d, generic[1]) <= 1e-12


def test_a_row_is_the_same_alone_in_any_batch():
    """Each row's values do not depend on the rows batched with it (order, padding, other steps)."""
    fm, names, stack = _stack("heads", T=5, S=6, seed=2)
    rows = _uneven_rows(6, 5, seed=8)
    ev = LayerEvaluator(AutogradEvaluator(fm, 256), names)
    h, d = ev.slopes(stack, rows)
    perm = torch.randperm(rows.t.numel(), generator=torch.Generator().manual_seed(1))
    hp, dp = ev.slopes(stack, Rows(rows.steps[perm], rows.inputs[perm], rows.t[perm]))
    assert rel(hp, h[perm]) <= 1e-14 and rel(dp, d[perm]) <= 1e-14
    for e in range(0, rows.t.numel(), 5):
        one = Rows(rows.steps[e:e + 1], rows.inputs[e:e + 1], rows.t[e:e + 1])
        h1, d1 = ev.slopes(stack, one)
        assert rel(h1, h[e:e + 1]) <= 1e-13 and rel(d1, d[e:e + 1]) <= 1e-12


def _brute_cost(counts: list[int], C: int) -> int:
    return sum(-(-c // C) for c in counts) * (C + BLOCK_ROWS)


@pytest.mark.parametrize("counts", [[1], [5], [40, 1, 1, 2], [3, 3, 3, 3, 3], [1, 17, 64, 2, 9], [200, 1]])
def test_step_blocks_is_a_padded_partition_by_step(counts):
    sidx = torch.cat([torch.full((c,), 2 * s + 1) for s, c in enumerate(counts)])  # sorted, gaps in the steps
    block_step, C, pad, slot = step_blocks(sidx)
    E = sidx.numel()
    assert pad.numel() == block_step.numel() * C
    assert sorted(pad[slot].tolist()) == list(range(E)) and pad[slot].tolist() == list(range(E))
    for b in range(block_step.numel()):  # every slot of a block holds a row of the block's step
        for r in pad[b * C:(b + 1) * C].tolist():
            assert int(sidx[r]) == int(block_step[b])
    for s, c in enumerate(counts):  # each step's rows fill ceil(c / C) blocks
        assert int((block_step == 2 * s + 1).sum()) == -(-c // C)
    if max(counts) <= 64:  # every size is a candidate: the least padded rows plus BLOCK_ROWS per block
        assert _brute_cost(counts, C) == min(_brute_cost(counts, k) for k in range(1, max(counts) + 1))


def test_covered_layers_own_forward_runs_on_one_row():
    """The rows' outputs come from the rules; a covered layer's own forward sees a single row."""
    fm, names, stack = _stack("heads", T=5, S=6)
    rows = _uneven_rows(6, 5, seed=4)
    ev = LayerEvaluator(AutogradEvaluator(fm, 256), names)
    ev.slopes(stack, rows)  # the start-up check
    seen: list[int] = []
    handle = fm.module.linear1.register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    try:
        h, _ = ev.slopes(stack, rows)
    finally:
        handle.remove()
    assert seen == [1] and h.shape[0] == rows.t.numel() > 1


def test_rows_run_no_python_meta_kernel_for_the_models_numbers():
    """``x * sqrt(d)``, ``/ sqrt(d_head)`` and ``0 + ...`` between dual tensors and Python numbers take torch's
    slow forward-mode path (torch._refs in Python, once per evaluation); the rows split them (ScalarDuals)."""
    fm, names, stack = _stack("heads", T=5, S=6)
    rows = _uneven_rows(6, 5, seed=4)
    ev = LayerEvaluator(AutogradEvaluator(fm, 256), names)
    ev.slopes(stack, rows)  # the start-up check
    entered: list[str] = []

    def spy(frame, event, arg):
        if event == "call" and "torch/_refs" in frame.f_code.co_filename.replace("\\", "/"):
            entered.append(frame.f_code.co_name)

    sys.setprofile(spy)
    try:
        h, d = ev.slopes(stack, rows)
    finally:
        sys.setprofile(None)
    assert entered == []
    want_h, want_d = _loop(fm, stack, rows)
    assert rel(h, want_h) <= 1e-13 and rel(d, want_d) <= 1e-12


def test_layer_rules_run_outside_the_scalar_mode(monkeypatch):
    """The mode's Python dispatch is skipped inside the covered layers' hooks (without_scalar_duals), where
    there are no Python numbers to split: no torch function called from the layer rules reaches it."""
    from explaind.kernel import layers, scalar_duals

    callers: list[str] = []

    class Counting(scalar_duals.ScalarDuals):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            callers.append(sys._getframe(1).f_code.co_filename.replace("\\", "/").rsplit("/", 1)[-1])
            return super().__torch_function__(func, types, args, kwargs)

    fm, names, stack = _stack("heads", T=5, S=6)
    rows = _uneven_rows(6, 5, seed=4)
    ev = LayerEvaluator(AutogradEvaluator(fm, 256), names)
    ev.slopes(stack, rows)  # the start-up check
    monkeypatch.setattr(layers, "ScalarDuals", Counting)
    monkeypatch.setattr(scalar_duals, "ScalarDuals", Counting)
    h, d = ev.slopes(stack, rows)
    assert callers and "layer_rules.py" not in callers, sorted(set(callers))
    want_h, want_d = _loop(fm, stack, rows)
    assert rel(h, want_h) <= 1e-13 and rel(d, want_d) <= 1e-12
