"""Reductions behind the report and the CLI: parsing, step/group scores, proponents, kernel ordering."""

from __future__ import annotations

import csv
import io
import itertools

import numpy as np
import pytest
import torch

from explaind.exceptions import ConfigError
from explaind.kernel.attribution import Attribution
from explaind.kernel.layout import ParamLayout
from explaind.studies import analysis, fidelity, report
from explaind.studies.phases import Phase

LAYOUT = ParamLayout(("w", "b"), ((2, 3), (2,)))


def _attribution(axes, values, side_shape):
    T, O = values.shape[0], values.shape[-1]
    coords = {"test": np.arange(T), "output": np.arange(O)}
    if "step" in axes:
        coords["step"] = np.arange(10, 10 + values.shape[axes.index("step")])
    if "group" in axes:
        coords["group"] = ["w", "b"]
    if "train" in axes:
        coords["train"] = np.arange(values.shape[axes.index("train")])
    zeros = torch.zeros(T, O, dtype=torch.float64)
    quadrature = [n for a, n in zip(axes, values.shape) if a in ("test", "step", "output")]  # its quadrature_axes
    return Attribution(axes=axes, values=values, initial=zeros, final=zeros.clone(),
                       regularization=torch.zeros(side_shape, dtype=torch.float64),
                       residual=torch.zeros(side_shape, dtype=torch.float64),
                       quadrature_error=torch.zeros(quadrature, dtype=torch.float64), coords=coords, layout=LAYOUT)


def test_parse_keep_steps_and_target():
    assert analysis.parse_keep("step, group") == ("step", "group")
    assert analysis.parse_keep("") == ()
    with pytest.raises(ConfigError, match="unknown axis 'layer'.*step, group, param, train"):
        analysis.parse_keep("step,layer")
    with pytest.raises(ConfigError, match="repeats"):
        analysis.parse_keep("train,train")
    assert analysis.parse_steps("3:9") == (3, 9)
    assert analysis.parse_steps(":9") == (0, 9)
    assert analysis.parse_steps("4:") == (4, None)
    assert analysis.parse_steps(None) is None
    for bad in ("4", "a:b", "1:2:3"):
        with pytest.raises(ConfigError, match="START:STOP"):
            analysis.parse_steps(bad)
    with pytest.raises(ConfigError, match="Unknown target 'logit'.*label, predicted, all, loss"):
        analysis.check_target("logit")


def test_resolve_target_names():
    model = torch.nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model.bias.zero_()
    X = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])
    y = torch.tensor([1, 1, 0])
    assert analysis.resolve_target("label", model, X, y) == [1, 1, 0]
    assert analysis.resolve_target("predicted", model, X, y) == [0, 1, 2]
    assert analysis.resolve_target("all", model, X, y) is None
    assert analysis.resolve_target("loss", model, X, y) == "loss"


def test_step_group_scores_by_hand():
    values = torch.tensor([[[[1.0], [-2.0]], [[3.0], [0.5]]],      # test 0: steps 10, 11; groups w, b
                           [[[-1.0], [2.0]], [[1.0], [0.5]]]], dtype=torch.float64)
    att = _attribution(("test", "step", "group", "output"), values, (2, 2, 2, 1))
    att.regularization[:] = torch.tensor([[[[0.5], [0.0]], [[-1.0], [0.0]]]] * 2, dtype=torch.float64)
    s = analysis.step_group_scores(att)
    assert s.steps.tolist() == [10, 11] and s.groups == ["w", "b"]
    np.testing.assert_allclose(s.kernel, [[2.0, 4.0], [4.0, 1.0]])          # sum over tests of |value|
    np.testing.assert_array_equal(s.influence, s.kernel)
    np.testing.assert_allclose(s.regularization, [[1.0, 0.0], [2.0, 0.0]])
    again = analysis.StepGroupScores.from_dict(s.to_dict())
    np.testing.assert_array_equal(again.influence, s.influence)
    totals = report.phase_totals(s, [Phase("a", 0, 11), Phase("b", 11, 12)])
    np.testing.assert_allclose(totals, [[2.0, 4.0], [4.0, 1.0]])
    with pytest.raises(ConfigError, match="kept axes \\('step', 'group'\\)"):
        analysis.step_group_scores(_attribution(("test", "train", "output"), torch.zeros(1, 3, 1), (1, 1)))


def test_top_train_samples_and_kernel_ordering():
    values = torch.tensor([[[0.5], [-0.2], [0.0], [0.9], [-0.7]]], dtype=torch.float64)
    att = _attribution(("test", "train", "output"), values, (1, 1))
    top = analysis.top_train_samples(att, k=2)[0]
    assert top["proponents"] == [(3, 0.9), (0, 0.5)]
    assert top["opponents"] == [(4, -0.7), (1, -0.2)]
    scores = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])   # (T=2, M=3)
    matrix, rows, cols = analysis.train_val_kernel(scores, np.array([2, 0, 1]), np.array([1, 0]))
    # rows ordered by train key (sample 1, 2, 0); columns by validation key (input 1, 0)
    np.testing.assert_array_equal(matrix, [[5.0, 2.0], [6.0, 3.0], [4.0, 1.0]])
    assert rows == [1, 2] and cols == [1]


def test_save_attribution_csv_matches_tensor(tmp_path):
    values = torch.arange(8, dtype=torch.float64).reshape(1, 2, 2, 2) / 7
    att = _attribution(("test", "step", "group", "output"), values, (1, 2, 2, 2))
    written = analysis.save_attribution(att, tmp_path)
    assert [p.name for p in written] == ["attribution.safetensors", "attribution.json", "scores.csv"]
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert len(rows) == 8
    for row in rows:
        s, g, o = int(row["step"]) - 10, ["w", "b"].index(row["group"]), int(row["output"])
        assert float(row["value"]) == float(values[0, s, g, o])
    assert Attribution.load(tmp_path).values.equal(values)


def test_save_attribution_csv_is_what_csv_writer_writes_row_by_row(tmp_path, monkeypatch):
    # a param axis (labels like "w[0,1]" need quoting), side columns, values of every magnitude, and blocks of 5 rows
    gen = torch.Generator().manual_seed(0)
    D = sum(int(np.prod(s)) for s in LAYOUT.shapes)
    magnitudes = torch.logspace(-20, 20, 2 * 3 * D * 2, dtype=torch.float64).reshape(2, 3, D, 2)
    values = torch.randn(2, 3, D, 2, generator=gen, dtype=torch.float64) * magnitudes
    att = _attribution(("test", "step", "param", "output"), values, (2, 3, D, 2))
    att.regularization.copy_(torch.randn(2, 3, D, 2, generator=gen, dtype=torch.float64))
    att.residual.copy_(torch.randn(2, 3, D, 2, generator=gen, dtype=torch.float64) * 1e-17)
    monkeypatch.setattr(analysis, "_CSV_ROWS", 5)
    analysis.save_attribution(att, tmp_path)
    # the reference: one csv.writer row per cell, in C order
    reference = io.StringIO(newline="")
    writer = csv.writer(reference)
    writer.writerow(["test", "step", "param", "output", "value", "regularization", "residual"])
    labels = [list(att.coords["test"]), list(att.coords["step"]), [att.param_label(i) for i in range(D)],
              list(att.coords["output"])]
    for t, s, p, o in itertools.product(*(range(n) for n in values.shape)):
        writer.writerow([labels[0][t], labels[1][s], labels[2][p], labels[3][o]]
                        + [repr(float(x[t, s, p, o])) for x in (values, att.regularization, att.residual)])
    assert any("," in label for label in labels[2])
    assert (tmp_path / "scores.csv").read_bytes() == reference.getvalue().encode()


def test_pick_kernel_inputs_spreads_classes():
    y = np.array([2, 2, 2, 0, 1, 1, 0])
    assert report.pick_kernel_inputs(y, 3).tolist() == [3, 4, 0]
    assert report.pick_kernel_inputs(y, 5).tolist() == [3, 6, 4, 5, 0]
    assert report.pick_kernel_inputs(y, 100).tolist() == [3, 6, 4, 5, 0, 1, 2]


def test_fidelity_rules_and_table_text():
    assert [r.label for r in fidelity.all_rules()] == ["midpoint-10", "midpoint-100", "gauss-legendre-4", "adaptive"]
    assert fidelity.rule_from("midpoint", 7).label == "midpoint-7"
    with pytest.raises(ConfigError, match="Unknown quadrature 'trapezoid'"):
        fidelity.rule_from("trapezoid")
    text = fidelity.format_table([{"rule": "a", "KL": 1.23456e-9}, {"rule": "bbb", "KL": 2.0}])
    lines = text.splitlines()
    assert lines[0].split() == ["rule", "KL"] and "1.235e-09" in lines[2] and lines[3].startswith("bbb")
    with pytest.raises(ConfigError, match="Unknown size 'huge'"):
        fidelity.reference_setups("huge")
