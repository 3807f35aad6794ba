"""The scripts in examples/ run at tiny sizes and produce sound results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from _png import check_report_folder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(capsys):
    result = _load("quickstart").main(tiny=True)
    out = capsys.readouterr().out
    assert "replica: argmax agreement 1.000" in out
    assert result["fidelity"]["max_rel_error"] < 1e-6
    assert result["completeness_gap"] < 1e-10
    assert set(result["pruning"]) == {"unpruned", "explaind", "magnitude"}
    for accuracy in result["pruning"].values():
        assert 0.0 <= accuracy <= 1.0


def test_grokking_phases(tmp_path, capsys):
    result = _load("grokking_phases").main(tiny=True, out=str(tmp_path))
    out = capsys.readouterr().out
    assert "phases: memorisation" in out
    assert result["completeness_gap"] < 1e-8
    for shares in result["shares"].values():
        assert sum(shares.values()) == pytest.approx(1.0)
    check_report_folder(tmp_path, {"curves.png", "heatmap.png", "balance.png"})


def test_every_example_is_tested():
    tested = {"quickstart", "grokking_phases", "checkpoints_causal_lm", "hf_trainer", "lightning_callback",
              "lightning_manual"}
    scripts = {p.stem for p in EXAMPLES.glob("*.py")}
    assert scripts == tested, f"untested examples: {sorted(scripts - tested)}"


def test_checkpoints_causal_lm(tmp_path, capsys):
    result = _load("checkpoints_causal_lm").main(tiny=True, out=str(tmp_path))
    out = capsys.readouterr().out
    assert "3 macro-steps of 2 optimizer steps" in out
    assert result["fidelity"]["model_max_rel_error"] < 1e-6
    assert result["fidelity"]["model_vs_recorded"] < 1e-12
    assert result["completeness_gap"] < 1e-10


@pytest.mark.parametrize("name, line", [("hf_trainer", "most loss-lowering training sequences"),
                                        ("lightning_callback", "most supporting training sequences")])
def test_framework_callback_examples(capsys, name, line):
    result = _load(name).main(tiny=True)
    out = capsys.readouterr().out
    assert "3 steps recorded" in out and out.count(line) == 4
    assert result["fidelity"]["model_max_rel_error"] < 1e-6
    assert result["residual_share"] < 1e-9 and result["completeness_gap"] < 1e-10
    assert result["scores"].shape == (4, 16)


def test_lightning_manual_optimization_example(capsys):
    result = _load("lightning_manual").main(tiny=True)
    out = capsys.readouterr().out
    assert "2 steps recorded (manual optimization" in out and out.count("most supporting training samples") == 4
    assert "measured factor 0.500" in out  # the loss / 2 of the accumulation (the clipping at 1.0 does not act)
    assert result["fidelity"]["model_max_rel_error"] < 1e-6
    assert result["residual_share"] < 1e-9 and result["completeness_gap"] < 1e-10
    assert result["scores"].shape == (4, 16)
