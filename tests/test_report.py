"""Figures and the self-contained HTML report."""

from __future__ import annotations

import numpy as np
import pytest
from _png import check_png, check_report_folder, embedded_images

from explaind import viz
from explaind.exceptions import ExplaindError
from explaind.studies.phases import History, Phase


@pytest.fixture
def history():
    h = History()
    for s in range(0, 200, 10):
        val_acc = min(1.0, max(0.0, (s - 100) / 60))
        h.append(s, float(np.exp(-s / 30)), min(1.0, s / 50), 3.0 - min(2.9, s / 60), val_acc)
    return h


def test_every_figure_is_a_valid_png_and_embedded(tmp_path, history):
    phases = [Phase("memorisation", 0, 50), Phase("circuit formation", 50, 100), Phase("cleanup", 100, 160)]
    rng = np.random.default_rng(0)
    groups = ["embed.weight", "W_Q.weight", "mlp_in.weight", "unembed.weight"]
    steps = np.arange(0, 200, 10)
    paths = [
        viz.training_curves(history, tmp_path / "curves.png", phases=phases),
        viz.step_group_heatmap(steps, groups, rng.random((20, 4)), tmp_path / "heat.png", phases=phases),
        viz.balance_plot(steps, groups, rng.random((20, 4)), rng.random((20, 4)), tmp_path / "balance.png"),
        viz.phase_influence(groups, [p.name for p in phases], rng.random((3, 4)), tmp_path / "phases.png"),
        viz.top_samples(
            [{"label": "1+2=3", "proponents": [{"label": "1+3=4", "score": 0.5}],
              "opponents": [{"label": "2+2=4", "score": -0.2}]}],
            tmp_path / "top.png",
        ),
        viz.top_samples(
            [{"label": "digit 3", "image": rng.random((1, 8, 8)),
              "proponents": [{"label": "#1", "score": 0.5, "image": rng.random((1, 8, 8))}] * 2,
              "opponents": [{"label": "#2", "score": -0.2, "image": rng.random((1, 8, 8))}]}],
            tmp_path / "top_images.png",
        ),
        viz.kernel_matrices([rng.standard_normal((12, 9)), rng.standard_normal((12, 9))], [0, 50], tmp_path / "k.png",
                            row_boundaries=[4, 8], col_boundaries=[3]),
    ]
    sections = [viz.ReportSection(p.stem, "Some text.\n\nA second paragraph <b>escaped</b>.", [p], ["cap " + p.stem])
                for p in paths]
    sections.append(viz.ReportSection("Table", table=[{"rule": "midpoint", "agreement": 1.0, "kl": 1.5e-9}]))
    page = viz.write_report(tmp_path, sections, title="t <1>", meta={"p": 7})
    files = check_report_folder(tmp_path, {p.name for p in paths})
    assert len(files) == len(paths)
    html = page.read_text()
    assert "&lt;b&gt;escaped&lt;/b&gt;" in html and "<b>escaped" not in html
    assert "<td>1.5e-09</td>" in html and "t &lt;1&gt;" in html
    assert html.count("<figure>") == len(paths)


def test_check_png_rejects_broken_files(tmp_path, history):
    data = viz.training_curves(history, tmp_path / "c.png").read_bytes()
    check_png(data)
    corrupted = bytearray(data)
    corrupted[40] ^= 0xFF
    with pytest.raises(AssertionError):
        check_png(bytes(corrupted))
    with pytest.raises(AssertionError):
        check_png(data[:-30])


def test_report_refuses_missing_or_non_png_figures(tmp_path):
    with pytest.raises(ExplaindError, match="missing.png.*cannot be read"):
        viz.write_report(tmp_path, [viz.ReportSection("x", images=[tmp_path / "missing.png"])])
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a not a png")
    with pytest.raises(ExplaindError, match="fake.png.*not a PNG"):
        viz.write_report(tmp_path, [viz.ReportSection("x", images=[fake])])
    assert not (tmp_path / "index.html").exists()


def test_plot_shape_errors(tmp_path):
    with pytest.raises(ValueError, match=r"expected \(len\(steps\), len\(groups\)\) = \(3, 2\)"):
        viz.step_group_heatmap(np.arange(3), ["a", "b"], np.ones((2, 3)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="must both have shape"):
        viz.balance_plot(np.arange(3), ["a"], np.ones((3, 1)), np.ones((2, 1)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="one step per matrix"):
        viz.kernel_matrices([np.ones((2, 2))], [0, 1], tmp_path / "x.png")
    assert embedded_images("<p>no images</p>") == {}


def test_group_colours_are_pairwise_different():
    from explaind.viz.plots import group_colours

    for n in (1, 10, 11, 20, 21, 40):
        colours = [tuple(np.round(c, 6)) for c in group_colours(n)]
        assert len(colours) == n and len(set(colours)) == n, n


def test_notes_and_tables_in_the_html(tmp_path, history):
    png = viz.phase_influence(["a", "b"], ["memorisation", "cleanup"], np.array([[1.0, 2.0], [3.0, 4.0]]),
                              tmp_path / "ph.png", phase_steps=[10, 990])
    with pytest.raises(ValueError, match="2 phase lengths for 1 phases"):
        viz.phase_influence(["a"], ["x"], np.ones((1, 1)), tmp_path / "y.png", phase_steps=[1, 2])
    section = viz.ReportSection("S", "text", [png], ["cap"], table=[{"a": 1, "b": 2.5}, {"a": 3, "b": 4.0}],
                                notes=["read <me>"])
    html = viz.write_report(tmp_path, [section]).read_text()
    assert '<p class="howto"><strong>How to read this.</strong> read &lt;me&gt;</p>' in html
    assert "<thead><tr><th>a</th><th>b</th></tr></thead>" in html and html.count("<tr>") == 3


def test_rendered_page_check_catches_a_collapsed_table(tmp_path, history):
    from _browser import check_rendered, render

    png = viz.training_curves(history, tmp_path / "curves.png")
    rows = [{"sparsity": 0.5, "strategy": "magnitude", "accuracy": 0.9}, {"sparsity": 0.9, "strategy": "random",
                                                                          "accuracy": 0.1}]
    good = viz.write_report(tmp_path / "good", [viz.ReportSection("Pruning", "t", [png], ["c"], table=rows,
                                                                  notes=["n"])])
    measured = render(good, tmp_path / "render-good")
    check_rendered(measured, figures={"curves.png"}, tables={"Pruning": 3})
    # the old page: the table as plain text in a paragraph collapses to one line in a browser
    bad = viz.write_report(tmp_path / "bad", [viz.ReportSection("Pruning", "sparsity strategy accuracy\n0.5 "
                                                                "magnitude 0.9\n0.9 random 0.1", [png], ["c"],
                                                                notes=["n"])])
    with pytest.raises(AssertionError, match="no table under 'Pruning'"):
        check_rendered(render(bad, tmp_path / "render-bad"), figures={"curves.png"}, tables={"Pruning": 3})


def test_missing_chromium_fails_with_the_install_command(monkeypatch):
    import _browser

    monkeypatch.setattr(_browser.shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        _browser.chromium()


def _validation_result(activation):
    from explaind.validation import ValidationConfig, ValidationResult

    config = ValidationConfig.quick(activation=activation).as_dict()
    lds = {"counterfactual": {0.5: (0.8, 0.01), 0.9: (0.9, 0.02), 0.99: (0.95, 0.005)},
           "random": {0.5: (-0.01, 0.03), 0.9: (0.02, 0.03), 0.99: (0.0, 0.04)}}
    removal = {"counterfactual": {"fraction_lowered": 0.9, "fraction_lowered_std": 0.05, "mean_change": -1.5,
                                  "mean_predicted_change": -1.25}}
    return ValidationResult(config=config, lds=lds, lds_per_test={m: {f: [[v[0]]] for f, v in r.items()}
                                                                  for m, r in lds.items()},
                            removal=removal, seconds={"counterfactual": 3.5, "random": 0.0},
                            unavailable={"trak": "trak"})


def test_validation_section_shows_the_tables_and_the_bars(tmp_path):
    from explaind.studies.report_text import validation_section

    folder = tmp_path / "validation"
    folder.mkdir()
    tanh, relu = _validation_result("tanh"), _validation_result("relu")
    tanh.to_json(folder / "validation_tanh.json")
    tanh.plot(folder / "validation_tanh.png")
    relu.to_json(folder / "validation_relu.json")  # no PNG: drawn from the JSON
    out = tmp_path / "report"
    out.mkdir()
    section = validation_section(folder, out)
    page = viz.write_report(out, [section])
    html = page.read_text()
    assert "<td>+0.800 ± 0.010</td>" in html and "<td>+0.950 ± 0.005</td>" in html and "<td>-0.010 ± 0.030</td>" in html
    assert html.count("not installed (trak)") == 2 and html.count("<figure>") == 2
    assert "tanh, counterfactual: removing each test point&#x27;s top-5 proponents lowered its logit for 90.0%" in html
    assert [row["method"] for row in section.table] == ["counterfactual", "random", "trak"] * 2
    check_report_folder(out, {"validation_tanh.png", "validation_relu.png"})
    with pytest.raises(ExplaindError, match=r"No validation_\*.json.*explaind validate --out"):
        validation_section(tmp_path / "empty", out)
    (folder / "validation_bad.json").write_text('{"config": {}}')
    with pytest.raises(ExplaindError, match="not a validation result"):
        validation_section(folder, out)
