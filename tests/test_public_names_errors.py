"""Error paths of new public names: load's generators, counterfactual chunks, CLI threads, default rule, attention.

Each bad value is refused with an explaind exception naming the value, the allowed values and the fix.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from test_private_generators import OUTSIDE, OutsideNoise, _data, _model, _record
from torch import nn

import explaind
from explaind.cli import default_threads
from explaind.exceptions import ConfigError
from explaind.kernel.attention_rules import MultiheadAttentionRule
from explaind.kernel.layer_rules import covered_parameters
from explaind.studies.fidelity import DEFAULT_RULES, TABLE_MAX_EVALS, Rule, default_rule, estimated_evals, evals_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def outside_run(tmp_path_factory):
    """A run whose noise layer draws from ``OUTSIDE``, passed to the recorder as ``generators=[OUTSIDE]``."""
    root = tmp_path_factory.mktemp("gen") / "run"
    X, y = _data(1)
    _record(_model(OutsideNoise), X, y, steps=2, generators=[OUTSIDE], store=root)
    return root


@pytest.mark.parametrize(("given", "shown"), [
    ([3], r"\['int'\]"),
    (3, r"\['int'\]"),
    ("gen", r"\['str'\]"),
    ([OUTSIDE, torch.Generator()], r"got 2 object\(s\) \(torch.Generator\), 2 of them not held"),
    ([], r"got 0 object\(s\)"),
])
def test_load_refuses_generators_that_are_not_the_recorded_ones(outside_run, given, shown):
    with pytest.raises(ConfigError, match=shown + r".*recorded with 1 generator\(s\) passed as generators=\[\.\.\.\] "
                                                  r"\(\['generators\[0\]'\]\)\. Allowed: a list of 1 torch.Generator"
                                                  r".*Fix: pass the same generators"):
        explaind.Trajectory.load(outside_run, model=_model(OutsideNoise), generators=given)


def test_load_leaves_out_a_generator_the_model_holds(outside_run):
    """The recorder's list passed again, a model-held generator included: ``generators[0]`` is still OUTSIDE."""
    model = _model(OutsideNoise)
    model[1].own = torch.Generator()  # held by a module: found by name, so left out as the recorder did
    traj = explaind.Trajectory.load(outside_run, model=model, generators=[model[1].own, OUTSIDE])
    assert traj.generators == (OUTSIDE,)
    assert explaind.Trajectory.load(outside_run, model=_model(OutsideNoise), generators=(OUTSIDE,)).generators \
        == (OUTSIDE,)


def test_load_refuses_generators_for_a_run_that_passed_none(tmp_path):
    X, y = _data()
    _record(_model(), X, y, steps=2, store=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"recorded with 0 generator\(s\).*leave generators= out when the run passed "
                                          r"none"):
        explaind.Trajectory.load(tmp_path / "run", model=_model(), generators=[OUTSIDE])


@pytest.mark.parametrize("bad", [0, -3])
def test_counterfactual_chunk_size_names_value_and_allowed(outside_run, bad):
    traj = explaind.Trajectory.load(outside_run, model=_model(OutsideNoise), generators=[OUTSIDE])
    with pytest.raises(ConfigError, match=rf"chunk_size.*{bad}.*greater than or equal to 1"):
        explaind.CounterfactualEstimator(chunk_size=bad, device="cpu").fit(traj)


def test_recorder_generators_not_a_list_is_refused():
    model = _model()
    with pytest.raises(ConfigError, match=r"generators must be a list of torch.Generator.*\['str'\].*Fix: pass e.g."):
        explaind.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), loss="cross_entropy",
                                    generators=["noise.gen"])


@pytest.mark.parametrize(("threads", "env", "device", "want"), [
    (None, False, "cpu", 1), (None, True, "cpu", None), (None, False, "cuda:0", None), (3, True, "cuda", 3),
])
def test_default_threads(monkeypatch, threads, env, device, want):
    if env:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
    else:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads(argparse.Namespace(threads=threads, device=device)) == want


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_threads_below_one_is_a_usage_error(capsys, bad):
    with pytest.raises(SystemExit) as info:
        explaind.cli.main(["--threads", bad, "plugins"])
    assert info.value.code == 2
    assert f"--threads {bad} must be a positive integer" in capsys.readouterr().err


def test_default_rule_refuses_a_negative_budget_and_says_the_cost():
    with pytest.raises(ConfigError, match=rf"max_evals=-1 is not allowed.*Allowed: an integer >= 0, or None.*Fix: "
                                          rf"pass e.g. max_evals={TABLE_MAX_EVALS}"):
        default_rule(10, 4, -1)
    assert default_rule(10, 4, None) == (Rule("adaptive"), [])
    adaptive = estimated_evals(DEFAULT_RULES[0], 10, 4)
    assert default_rule(10, 4, adaptive)[0] == Rule("adaptive")
    assert default_rule(10, 4, adaptive - 1) == (Rule("adaptive", 2, 1e-3), [(Rule("adaptive"), adaptive)])
    assert default_rule(10, 4, estimated_evals(DEFAULT_RULES[1], 10, 4) - 1)[0] == DEFAULT_RULES[2]
    assert default_rule(10, 4, 0) == (DEFAULT_RULES[-1], [(r, estimated_evals(r, 10, 4)) for r in DEFAULT_RULES[:-1]])
    assert evals_text(Rule("adaptive"), 4800) == "at least 4,800"
    assert evals_text(Rule("gauss-legendre", 4), 4000) == "4,000"


@pytest.mark.parametrize("kwargs", [{"kdim": 3, "vdim": 3}, {"add_zero_attn": True}, {"add_bias_kv": True}])
def test_attention_layouts_the_rule_does_not_cover_fall_back(kwargs):
    """``nn.MultiheadAttention`` outside the rule's conditions (docs/engine.md) gets no factored roles."""
    mha = nn.MultiheadAttention(4, 2, **kwargs).eval()
    assert MultiheadAttentionRule().roles(mha) == {}
    names = [n for n, _ in mha.named_parameters()]
    # the projections outside any rule turn the factored path off for the whole model (the generic path runs)
    assert {n for n in names if "proj_weight" in n} - set(covered_parameters(mha, names))
    plain = nn.MultiheadAttention(4, 2).eval()
    assert set(MultiheadAttentionRule().roles(plain).values()) == {"in_weight", "in_bias", "out_weight", "out_bias"}
