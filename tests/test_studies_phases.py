"""Grokking phase detection from training curves."""

from __future__ import annotations

import pytest

from explaind.exceptions import ConfigError
from explaind.studies.phases import History, Phase, detect_phases, run_outcome


def _history(rows):
    h = History()
    for step, tr, va in rows:
        h.append(step, 1.0 - tr, tr, 1.0 - va, va)
    return h


def test_three_phases_on_a_hand_made_grokking_curve():
    # train acc reaches 1 at step 40; val acc flat at 0.1 until 120, then rises, reaches 1 at 160
    rows = [(0, 0.0, 0.1), (20, 0.6, 0.1), (40, 1.0, 0.1), (60, 1.0, 0.1), (80, 1.0, 0.1), (100, 1.0, 0.1),
            (120, 1.0, 0.1), (140, 1.0, 0.5), (160, 1.0, 1.0), (180, 1.0, 1.0)]
    phases = detect_phases(_history(rows))
    assert phases == [
        Phase("memorisation", 0, 40),
        Phase("circuit formation", 40, 120),  # cleanup starts at the last evaluation before the rise
        Phase("cleanup", 120, 160),
    ]
    assert phases[0].contains(39) and not phases[0].contains(40)


def test_run_that_never_memorises_is_one_phase():
    rows = [(0, 0.0, 0.0), (10, 0.3, 0.0), (20, 0.5, 0.1)]
    assert detect_phases(_history(rows), n_steps=25) == [Phase("memorisation", 0, 25)]


def test_run_that_never_generalises_ends_in_circuit_formation():
    rows = [(0, 0.0, 0.0), (10, 1.0, 0.05), (20, 1.0, 0.06), (30, 1.0, 0.05)]
    assert detect_phases(_history(rows)) == [Phase("memorisation", 0, 10), Phase("circuit formation", 10, 30)]


def test_generalising_together_with_memorising_has_no_plateau():
    rows = [(0, 0.0, 0.0), (10, 0.5, 0.4), (20, 1.0, 0.8), (30, 1.0, 1.0)]
    phases = detect_phases(_history(rows))
    assert [p.name for p in phases] == ["memorisation", "cleanup"]
    assert phases[1] == Phase("cleanup", 20, 30)


def test_history_roundtrip_and_validation():
    h = _history([(0, 0.0, 0.0), (5, 1.0, 1.0)])
    assert History.from_dict(h.to_dict()) == h
    with pytest.raises(ConfigError, match="lacks the column"):
        History.from_dict({"step": [0]})
    bad = h.to_dict()
    bad["val_acc"] = [0.0]
    with pytest.raises(ConfigError, match="differ in length"):
        History.from_dict(bad)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"threshold": 0.0}, "threshold=0.0"), ({"rise": 1.0}, "rise=1.0"), ({"n_steps": 0}, "n_steps=0")],
)
def test_bad_arguments(kwargs, fragment):
    h = _history([(0, 0.0, 0.0), (5, 1.0, 1.0)])
    with pytest.raises(ConfigError, match=fragment):
        detect_phases(h, **kwargs)
    with pytest.raises(ConfigError, match="at least two evaluations"):
        detect_phases(_history([(0, 0.0, 0.0)]))


def test_outcome_of_a_run_that_memorises_but_does_not_generalise():
    # the shape reported in issue 16: train acc 1 at step 110, validation levels off at ~0.70
    rows = [(0, 0.0, 0.05), (50, 0.6, 0.3), (110, 1.0, 0.62), (250, 1.0, 0.71), (500, 1.0, 0.70), (1000, 1.0, 0.69)]
    outcome = run_outcome(_history(rows))
    assert outcome.train_step == 110 and outcome.val_step is None
    assert not outcome.generalised and not outcome.grokked
    assert (outcome.best_val, outcome.best_val_step, outcome.final_val) == (0.71, 250, 0.69)
    text = outcome.describe()
    assert "did not generalise" in text and "step 110" in text and "0.710" in text and "no grokking phases" in text


def test_outcome_of_a_grokking_run_and_of_one_without_delay():
    grok = run_outcome(_history([(0, 0.0, 0.0), (40, 1.0, 0.1), (120, 1.0, 0.5), (160, 1.0, 1.0)]))
    assert (grok.train_step, grok.val_step, grok.generalised, grok.grokked) == (40, 160, True, True)
    assert "120 steps later" in grok.describe() and grok.to_dict()["grokked"] is True
    together = run_outcome(_history([(0, 0.0, 0.0), (40, 1.0, 1.0)]))
    assert together.generalised and not together.grokked and "without a delay" in together.describe()
    never = run_outcome(_history([(0, 0.0, 0.0), (40, 0.5, 0.2)]))
    assert never.train_step is None and not never.generalised and "did not memorise" in never.describe()
    with pytest.raises(ConfigError, match="threshold"):
        run_outcome(_history([(0, 0.0, 0.0)]), threshold=0.0)
