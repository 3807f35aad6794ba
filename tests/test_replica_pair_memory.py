"""The adaptive rule's memory within one (step, input) pair, and the command line's ``--memory-budget``.

A GPT-2 of 4 layers of width 256 peaked at 6,008 MB in its replica (``benchmarks/bench_scale.py --cases gpt2
--no-train-axis --where``; docs/scaling.md, *Real widths*): one pair at ``tol=1e-10`` held so many open panels, each
level copying them all with the values of their nodes (output-sized vectors each), that it alone passed any budget.
A level now takes its open panels a group at a time and accepted panels are summed at once
(``explaind/kernel/adaptive_memory.py``). The tests shrink the groups to a panel or two and hold the plans to the
unbounded ones, the rule's estimate to a slow float64 loop over its nodes, and the replica to the trained model.
"""

from __future__ import annotations

import math

import pytest
import torch
from _hf_testkit import lm_data
from reference import rel_err
from test_token_models import _record_lm

import explaind
from explaind.cli import build_parser, main
from explaind.kernel import adaptive
from explaind.kernel.quadrature import rule_nodes

pytestmark = pytest.mark.usefixtures("one_thread")

PANEL_COPIES = 160  # output-sized vectors an open panel takes at a level (adaptive_memory.LEVEL_PANEL_COPIES)
TOL = 1e-10


def spy_levels(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The open panels of every call of one refinement level (``adaptive._level``)."""
    seen: list[int] = []
    original = adaptive._level

    def spy(jobs, *args, **kwargs):
        seen.append(int(jobs.unit.numel()))
        return original(jobs, *args, **kwargs)

    monkeypatch.setattr(adaptive, "_level", spy)
    return seen


# --------------------------------------------------------------------------- the rule on a path with many kinks
class Kinked:
    r"""Units whose :math:`h_o(t) = \sum_k W_{ko} \max(0, t - c_k) + \sin(a_o t)` cross ``K`` kinks on ``[0, 1]``,
    shared by their ``O`` outputs (as a ReLU network's path): at ``tol=1e-10`` each unit opens tens of panels."""

    def __init__(self, units: int, kinks: int, outputs: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.c = torch.rand(units, kinks, generator=gen, dtype=torch.float64)
        self.W = torch.randn(units, kinks, outputs, generator=gen, dtype=torch.float64) / kinks
        self.a = 1 + 3 * torch.rand(units, outputs, generator=gen, dtype=torch.float64)

    def refine(self, units: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`h, h'` of ``units`` at ``t``, batched (the rule's ``refine``)."""
        c, W, a, tt = self.c[units], self.W[units], self.a[units], t[:, None]
        h = torch.einsum("pk,pko->po", (tt - c).clamp_min(0), W) + torch.sin(a * tt)
        d = torch.einsum("pk,pko->po", (tt > c).double(), W) + a * torch.cos(a * tt)
        return h, d

    def slope(self, u: int, t: float) -> list[float]:
        """:math:`h'(t)` of unit ``u``, output by output, in a Python loop (the reference)."""
        out = []
        for o in range(self.W.shape[2]):
            s = sum(float(self.W[u, k, o]) for k in range(self.W.shape[1]) if t > float(self.c[u, k]))
            out.append(s + float(self.a[u, o]) * math.cos(float(self.a[u, o]) * t))
        return out

    def loop(self, u: int, ts: list[float], ws: list[float]) -> list[float]:
        r""":math:`\sum_i w_i h'(t_i)` of unit ``u`` over the nodes ``ts``, weights ``ws``, in a Python loop."""
        out = [0.0] * self.W.shape[2]
        for t, w in zip(ts, ws):
            if w != 0.0:
                out = [s + w * v for s, v in zip(out, self.slope(u, t))]
        return out

    def change(self, u: int) -> list[float]:
        """:math:`h(1) - h(0)` of unit ``u`` in closed form, output by output."""
        return [sum(float(self.W[u, k, o]) * (1 - float(self.c[u, k])) for k in range(self.W.shape[1]))
                + math.sin(float(self.a[u, o])) for o in range(self.W.shape[2])]

    def plan(self, **kwargs):
        x, w = (torch.tensor(v, dtype=torch.float64) for v in rule_nodes("gauss-legendre", 4))
        U = self.c.shape[0]
        h, d = self.refine(torch.arange(U).repeat_interleave(4), x.repeat(U))
        h, d = h.reshape(U, 4, -1), d.reshape(U, 4, -1)
        g_a = self.refine(torch.arange(U), torch.zeros(U))[0]
        g_b = self.refine(torch.arange(U), torch.ones(U))[0]
        return adaptive.adaptive_plan(torch.einsum("q,uqo->uo", w, d), g_a, g_b, self.refine, tol=TOL, nodes=4,
                                      first=(x, h, d), dense_after=0, **kwargs)


@pytest.fixture(scope="module")
def kinked():
    return Kinked(units=2, kinks=12, outputs=5)


@pytest.mark.parametrize("coarsen", [False, True])
def test_a_level_refines_open_panels_a_group_at_a_time_and_the_plan_is_unchanged(kinked, monkeypatch, coarsen):
    """One open panel a level call (``level_bytes=1``) against every open panel at once: the same nodes and weights
    bit for bit, the estimates summed in another order (rounding), each within ``tol`` of the closed form by a slow
    loop over the plan's nodes."""
    whole = kinked.plan(coarsen=coarsen)
    seen = spy_levels(monkeypatch)
    grouped = kinked.plan(coarsen=coarsen, level_bytes=1)
    assert max(seen) == 1 and len(seen) > 40, seen  # tens of open panels a level before
    assert torch.equal(grouped.t, whole.t) and torch.equal(grouped.w, whole.w)
    assert torch.equal(grouped.evals, whole.evals)
    assert rel_err(grouped.estimate, whole.estimate) <= 1e-13
    for u in range(2):
        exact = kinked.change(u)
        loop = kinked.loop(u, grouped.t[u].tolist(), grouped.w[u].tolist())
        scale = max(abs(v) for v in exact)
        assert max(abs(a - b) for a, b in zip(loop, exact)) <= 2 * TOL * scale
        assert max(abs(float(a) - b) for a, b in zip(grouped.estimate[u], loop)) <= 1e-12 * scale


def test_accepted_panels_keep_only_their_scalars_unless_merged_afterwards(kinked, monkeypatch):
    """Their estimates go into a sum per unit at once; only ``coarsen``, which reads them, keeps the vectors."""
    made = []
    original = adaptive.Accepted

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(adaptive, "Accepted", spy)
    kinked.plan()
    kinked.plan(coarsen=True)
    plain, merged = made
    assert sum(p.unit.numel() for p in plain.parts) > 40
    assert all(p.est.shape[1] == p.f_a.shape[1] == p.f_b.shape[1] == 0 for p in plain.parts)
    assert all(p.est.shape[1] == 5 for p in merged.parts)


def test_open_panels_past_the_rules_budget_are_logged_once_with_the_fix(kinked, caplog):
    """What stays between levels (13 vectors an open panel) is what the plan needs: past the rule's budget (four
    times ``level_bytes``) a warning says so, once, with the panels, their bytes and the fix; within it, none."""
    vectors = 13 * 8 * 5  # bytes of an open panel of five float64 outputs
    with caplog.at_level("WARNING", logger="explaind.kernel.adaptive_memory"):
        kinked.plan(level_bytes=10**6)
        assert not caplog.records
        kinked.plan(level_bytes=vectors)  # the budget of four open panels
    (record,) = caplog.records
    text = record.getMessage()
    assert "open panels of 5 outputs" in text and "tol=1e-10" in text and "0 MB: RULE_BYTES" in text
    assert "Fix: a looser tol" in text and "memory_budget" in text


def test_level_rows_take_the_budget_in_open_panels_and_never_less_than_one():
    from explaind.kernel import adaptive_memory

    assert adaptive_memory.LEVEL_PANEL_COPIES == PANEL_COPIES and adaptive_memory.PANEL_VECTORS == 13
    per_panel = PANEL_COPIES * 8 * 64 * 1024  # a GPT-2 pair: 64 tokens of 1,024, float64
    assert adaptive_memory.level_rows(64 * 1024, torch.float64) == adaptive_memory.LEVEL_BYTES // per_panel == 3
    assert adaptive_memory.level_rows(64 * 50_257, torch.float64) == 1
    assert adaptive_memory.level_rows(64 * 1024, torch.float64, 10 * per_panel) == 10


# --------------------------------------------------------------------------- a language model's replica
@pytest.fixture(scope="module")
def lm():
    """A tiny float64 GPT-2 (vocabulary 30, sequences of 8: 240 outputs per input) after three AdamW steps; its
    trajectory, four test sequences, the trained model's logits on them and the replica with the default budget."""
    model, traj = _record_lm(steps=3)
    test_ids, _ = lm_data(4, seed=11)
    with torch.no_grad():
        truth = model(input_ids=test_ids).logits.reshape(4, -1)
    X = {"input_ids": test_ids}
    whole = torch.as_tensor(explaind.KernelReplica(device="cpu", quadrature="adaptive", tol=TOL).fit(traj).predict(X))
    return traj, X, truth, whole


def test_a_memory_budget_bounds_the_open_panels_of_a_level_and_the_replica_is_unchanged(lm, monkeypatch):
    """``memory_budget`` of two open panels a level (an eighth of it at ``PANEL_COPIES`` vectors of 240 outputs):
    before, a level took every open panel of its pairs at once."""
    traj, X, truth, whole = lm
    rows = 2
    budget = 8 * rows * PANEL_COPIES * 8 * truth.shape[1]
    seen = spy_levels(monkeypatch)
    replica = torch.as_tensor(explaind.KernelReplica(device="cpu", quadrature="adaptive", tol=TOL,
                                                     memory_budget=budget).fit(traj).predict(X))
    assert seen and max(seen) <= rows, seen
    assert rel_err(replica, whole) <= 1e-13
    assert rel_err(replica, truth) <= 1e-6 and rel_err(whole, truth) <= 1e-6


# --------------------------------------------------------------------------- the chunked rule's first decision
def test_the_chunks_first_estimate_counts_are_taken_once_and_the_plans_are_unchanged(monkeypatch):
    """The probe's counts (failing units, far ones no kink explains) are summed over every chunk's first estimate
    before any chunk is refined; a chunk refined next does not count them again (before: one kink test a chunk)."""
    from test_replica_output_chunks import relu_mlp

    from explaind.kernel import adaptive_chunks

    model, traj, X = relu_mlp(32, 0.05)
    quad = {"quadrature": "adaptive", "tol": TOL}
    whole = torch.as_tensor(explaind.KernelReplica(device="cpu", **quad).fit(traj).predict(X))
    monkeypatch.setattr(adaptive_chunks, "RULE_BYTES", 2 * 1024 * 8 * 3)  # two pairs of three outputs a chunk
    tests = {"chunks": 0, "rule": 0}
    for module, key in ((adaptive_chunks, "chunks"), (adaptive, "rule")):
        def spy(*args, _original=module.one_kink, _key=key):
            tests[_key] += 1
            return _original(*args)

        monkeypatch.setattr(module, "one_kink", spy)
    chunked = torch.as_tensor(explaind.KernelReplica(device="cpu", **quad).fit(traj).predict(X))
    assert tests == {"chunks": 4 * 3, "rule": 0}, tests  # four chunks a step, three steps
    assert rel_err(chunked, whole) <= 1e-13
    with torch.no_grad():
        assert rel_err(chunked, model(X)) <= 1e-6


# --------------------------------------------------------------------------- the command line
def test_the_commands_that_run_an_estimator_take_a_memory_budget():
    parser = build_parser()
    for argv in (["replicate", "RUN"], ["influence", "RUN", "--out", "o"], ["report", "RUN"]):
        assert parser.parse_args([*argv, "--memory-budget", "512MiB"]).memory_budget == "512MiB"
        assert parser.parse_args(argv).memory_budget is None


@pytest.mark.parametrize("argv", [["replicate", "{run}"], ["influence", "{run}", "--out", "{run}/o"],
                                  ["report", "{run}"]])
def test_a_bad_memory_budget_is_one_line_naming_the_option_and_the_accepted_forms(tmp_path, capsys, argv):
    code = main([a.format(run=tmp_path) for a in argv] + ["--memory-budget", "lots"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in ("--memory-budget", "'lots'", "2GB", "GiB"):
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "-q", "--out", str(folder), "--architecture", "mlp", "--dataset", "digits", "--model",
                 "hidden_sizes=[4]", "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "64", "--steps", "2",
                 "--eval-every", "2", "--dtype", "float64"]) == 0
    return folder


@pytest.mark.parametrize(("command", "cls", "given", "default"), [
    (["replicate", "--quadrature", "gauss-legendre", "--nodes", "2"], "KernelReplica", 512 * 2**20, None),
    (["influence", "--quadrature", "gauss-legendre", "--nodes", "2", "--no-csv", "--out", "{run}/o"],
     "InfluenceEstimator", 512 * 2**20, "2GB")])
def test_the_memory_budget_reaches_the_estimator(run_dir, monkeypatch, command, cls, given, default):
    got = []
    estimator = getattr(explaind, cls)
    fit = estimator.fit

    def spy(self, *args, **kwargs):
        got.append(self.memory_budget)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(estimator, "fit", spy)
    argv = [command[0], str(run_dir), *(a.format(run=run_dir) for a in command[1:]), "-q", "--n-test", "3"]
    assert main([*argv, "--memory-budget", "512MiB"]) == 0
    assert main(argv) == 0
    assert got == [given, default], got
