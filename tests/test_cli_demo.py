"""demo, study grokking, prune and the reference fidelity table at tiny sizes."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import pytest
from _browser import check_rendered, render, screenshot
from _png import check_png, check_report_folder
from sklearn.datasets import load_digits

from explaind.cli import main
from explaind.exceptions import ExplaindWarning
from explaind.studies import fidelity

REPORT_FIGURES = {
    "training_curves.png",
    "step_group_influence.png",
    "kernel_vs_regularization.png",
    "phase_influence.png",
    "top_samples.png",
    "kernel_matrices.png",
}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """The tiny demo, run once for the tests of this module: (report folder, JSON result, its warnings)."""
    out = tmp_path_factory.mktemp("demo") / "report"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["demo", "--tiny", "--out", str(out), "--json"]) == 0
    return out, json.loads(buffer.getvalue()), [str(w.message) for w in caught
                                                if issubclass(w.category, ExplaindWarning)]


def test_demo_tiny_writes_a_complete_report(tiny_demo):
    out, result, warned = tiny_demo
    assert result["report"] == str(out / "index.html")
    expected = REPORT_FIGURES | {"pruning_curve.png"}
    if not result["outcome"]["generalised"]:
        expected -= {"phase_influence.png"}
    files = check_report_folder(out, expected)
    assert set(files) == expected
    rules = [row["rule"] for row in result["fidelity"]]
    assert rules == ["midpoint-10", "gauss-legendre-4", "adaptive-2"]
    for row in result["fidelity"]:
        assert row["argmax agreement"] == 1.0
    # the adaptive row is replicate's default rule, within its tolerance; the fixed rules' errors are the table's
    # column, read in one note under it instead of a warning; the report's rule is the scores' (no warning either)
    adaptive = result["fidelity"][-1]
    assert adaptive["tol"] == 1e-3 and adaptive["step error"] <= adaptive["tol"] and not adaptive["warned"]
    assert warned == []
    inexact = [row["rule"] for row in result["fidelity"] if row["warned"]]
    note = fidelity.inexact_rules_note(result["fidelity"])
    assert (note is None) == (not inexact)
    assert set(result["timings"]) == {"train", "fidelity", "pruning", "report"}
    assert (out / "run" / "run.json").is_file() and (out / "pruning" / "results.json").is_file()
    html = (out / "index.html").read_text()
    for title in ("Training", "Fidelity of the kernel replica", "Which layers, and when", "Which training samples",
                  "Pruning (a digits model)"):
        assert f">{title}</h2>" in html
    history = json.loads((out / "run" / "run.json").read_text())["history"]
    rows = list(zip(history["step"], history["train_acc"], history["val_acc"]))
    t_train = next((s for s, a, _ in rows if a >= 0.99), None)
    t_val = next((s for s, _, v in rows if t_train is not None and s >= t_train and v >= 0.99), None)
    assert result["outcome"]["generalised"] == (t_val is not None)
    if t_val is None:
        # a run that did not generalise is called so, and its page neither labels phases nor says grokking
        assert "Detected phases" not in html and "(grokking)" not in html
        assert "did not generalise" in html or "did not memorise" in html


def test_demo_report_renders_in_a_browser(tiny_demo, tmp_path):
    out, result, _ = tiny_demo
    figures = {p.name for p in out.glob("*.png")}
    measured = render(out / "index.html", tmp_path)
    check_rendered(measured, figures=figures, tables={"Fidelity of the kernel replica": 7,
                                                      "Pruning (a digits model)": 5})
    assert len(measured["images"]) == len(figures)
    check_png(screenshot(out / "index.html", tmp_path), min_side=300)


def test_study_grokking_tiny(tmp_path, capsys):
    out = tmp_path / "grok"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["study", "grokking", "--tiny", "--out", str(out), "--device", "cpu", "--json"]) == 0
    assert [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)] == []
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result
    assert result["p"] == 5 and 1 <= result["n_steps"] <= 12
    names = [ph["name"] for ph in result["phases"]]
    outcome = result["outcome"]
    # phases are labelled exactly when the run generalised (validation reached 0.99 after training did)
    assert bool(names) == outcome["generalised"]
    if names:
        assert names[0] == "memorisation" and result["phases"][0]["start"] == 0
    for ph in result["phases"]:
        shares = result["phase_group_share"][ph["name"]]
        assert abs(sum(shares.values()) - 1.0) < 1e-9
        assert "embed.weight" in shares and "unembed.weight" in shares
    run = json.loads((out / "run" / "run.json").read_text())
    assert run["config"]["optimizer"] == "adamw" and run["config"]["betas"] == [0.9, 0.98]
    assert run["history"]["train_acc"][-1] == result["final_train_acc"]
    check_report_folder(out / "report", REPORT_FIGURES if len(names) > 1 else REPORT_FIGURES - {"phase_influence.png"})


def test_study_grokking_overrides(tmp_path, capsys):
    out = tmp_path / "grok7"
    assert main(["study", "grokking", "--tiny", "--p", "7", "--steps", "3", "--out", str(out), "--device", "cpu",
                 "-q"]) == 0
    text = capsys.readouterr().out
    assert "p=7" in text and "3 steps" in text
    # the same command again into the same folder replaces the study's run (the documented command, run twice)
    (out / "run" / "marker").write_text("the earlier run")
    assert main(["study", "grokking", "--tiny", "--p", "7", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "2 steps" in captured.out and f"replacing the run of the previous study in {out / 'run'}" in captured.err
    assert not (out / "run" / "marker").exists()
    assert json.loads((out / "run" / "run.json").read_text())["status"] == "complete"


def test_prune_tiny(tmp_path, capsys):
    out = tmp_path / "prune"
    assert main(["prune", "--tiny", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "magnitude" in text and "random" in text
    results = json.loads((out / "results.json").read_text())
    assert {r["strategy"] for r in results["rows"]} == {"magnitude", "random"}
    assert sorted({r["sparsity"] for r in results["rows"]}) == [0.5, 0.9]
    # the cost said before the work: one epoch of batches of 100 over the training digits, and as many pruned
    # models as the results hold
    n_train = len(load_digits(return_X_y=True)[1]) - 300 - 497  # the splits' scoring and test sizes, docs/pruning.md
    line = next(x for x in captured.err.splitlines() if x.startswith("prune (tiny)"))
    assert f"of {-(-n_train // 100)} steps" in line and f"evaluates {len(results['rows'])} pruned models" in line
    assert (out / "pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_fidelity_table_tiny(capsys):
    assert main(["replicate", "--table", "--tiny", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    setups = {r["setup"] for r in rows}
    assert setups == {"digits CNN, SGD momentum", "modular transformer, AdamW", "digits MLP, Adam"}
    assert len(rows) == 12
    for row in rows:
        assert row["argmax agreement"] == 1.0
        assert row["KL"] >= -1e-12
    evals = {r["rule"]: r["evals/step"] for r in rows if r["setup"] == "digits MLP, Adam"}
    assert evals["midpoint-10"] == 10 and evals["midpoint-100"] == 100 and evals["gauss-legendre-4"] == 4


def test_reference_table_says_its_cost_before_training(monkeypatch):
    from explaind.studies import fidelity, runs

    said, order = [], []
    monkeypatch.setattr(runs, "train_run", lambda *a, **k: order.append("train"))
    monkeypatch.setattr(fidelity, "run_fidelity", lambda *a, **k: [])
    fidelity.reference_table("small", log=lambda line: said.append(line) or order.append("said"))
    # every rule over 40 steps x 64 inputs: (10 + 100 + 4) nodes + adaptive's lower bound of 12, per step and input
    assert said == ["replicate --table (small): 3 reference setups, each trained for 40 steps, then midpoint-10, "
                    f"midpoint-100, gauss-legendre-4 and adaptive over 40 steps x 64 inputs = at least "
                    f"{(10 + 100 + 4 + 12) * 40 * 64:,} path-gradient evaluations per setup"]
    assert order == ["said", "train", "train", "train"]
    assert fidelity.rules_cost([fidelity.Rule("gauss-legendre", 2)], 780, 64) == (
        "gauss-legendre-2 over 780 steps x 64 inputs = 99,840 path-gradient evaluations")


def test_prune_nodes_reach_the_explaind_scores(tmp_path, monkeypatch):
    import explaind.pruning
    from explaind.exceptions import ConfigError
    from explaind.studies import pruning_run

    seen = {}

    class _Result:
        baseline = {}

        def table(self):
            return ""

        def summary(self):
            return {}

    def fake(out_dir, **options):
        seen.update(options)
        return _Result()

    monkeypatch.setattr(explaind.pruning, "run_digits_benchmark", fake)
    pruning_run.run_benchmark(tmp_path, size="tiny", nodes=4)
    assert seen["quadrature_nodes"] == 4
    seen.clear()
    pruning_run.run_benchmark(tmp_path, size="tiny")
    assert not {"quadrature_nodes", "quadrature", "tol"} & set(seen)  # the benchmark's own defaults
    pruning_run.run_benchmark(tmp_path, size="tiny", quadrature="gauss-legendre", nodes=1)
    assert seen["quadrature"] == "gauss-legendre" and seen["quadrature_nodes"] == 1
    seen.clear()
    pruning_run.run_benchmark(tmp_path, size="tiny", tol=1e-4)
    assert seen["tol"] == 1e-4
    with pytest.raises(ConfigError, match="nodes=0 must be a positive integer"):
        pruning_run.run_benchmark(tmp_path, size="tiny", nodes=0)
    with pytest.raises(ConfigError, match="Unknown size 'medium'. Choose one of: tiny, small, full"):
        pruning_run.cost_text("medium")


def test_prune_scores_use_the_rule_of_influence_and_do_not_warn(tmp_path):
    # the benchmark's ExPLAIND scores at a reduced size: by default the adaptive rule of `explaind influence`
    # (2-node panels, SCORES_TOL, float64) leaves no warning; the former 1-node rule warned on the same run
    import warnings

    from explaind.exceptions import ExplaindWarning
    from explaind.pruning import run_digits_benchmark
    from explaind.studies.fidelity import SCORES_RULE, SCORES_TOL

    small = {"strategies": ("explaind",), "epochs": 1, "hidden_sizes": (16,), "sparsities": (0.5,), "seeds": (0,),
             "batch_size": 100}

    def warned(**rule):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run_digits_benchmark(tmp_path / str(len(rule)), **small, **rule)
        return result, [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]

    result, messages = warned()
    assert messages == []
    assert result.config["quadrature"] == SCORES_RULE.quadrature == "adaptive"
    assert result.config["quadrature_nodes"] == SCORES_RULE.nodes and result.config["tol"] == SCORES_TOL
    assert result.config["scores_dtype"] == "float64"
    _, messages = warned(quadrature="gauss-legendre", quadrature_nodes=1, scores_dtype="float32")
    assert len(messages) == 1 and "quadrature error share" in messages[0]
