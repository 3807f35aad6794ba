"""scores_to_masks: global and per-layer thresholds, ties, exclusion, neuron granularity, errors."""

from __future__ import annotations

import pytest
import torch

from explaind.exceptions import ConfigError
from explaind.pruning import kept_fraction, mask_sparsity, prunable_names, scores_to_masks


def _scores():
    # two weight matrices and a bias, with distinct hand-chosen values
    return {
        "a.weight": torch.tensor([[5.0, 1.0, 9.0], [2.0, 8.0, 3.0]]),
        "a.bias": torch.tensor([0.1, 0.2]),
        "b.weight": torch.tensor([[4.0, 7.0], [6.0, 0.5]]),
    }


def test_global_threshold_removes_the_lowest_scores_across_tensors():
    masks = scores_to_masks(_scores(), 0.5)  # 10 prunable weights -> remove 5: 0.5, 1, 2, 3, 4
    assert masks["a.weight"].tolist() == [[True, False, True], [False, True, False]]
    assert masks["b.weight"].tolist() == [[False, True], [True, False]]
    assert masks["a.bias"].all()  # biases are not prunable by default
    assert all(m.dtype == torch.bool for m in masks.values())


def test_layer_threshold_prunes_each_tensor_to_the_same_sparsity():
    masks = scores_to_masks(_scores(), 0.5, scope="layer")
    # a.weight: 6 -> remove 3 lowest (1, 2, 3); b.weight: 4 -> remove 2 lowest (0.5, 4)
    assert masks["a.weight"].tolist() == [[True, False, True], [False, True, False]]
    assert masks["b.weight"].tolist() == [[False, True], [True, False]]


def test_rounding_and_sparsity_zero():
    scores = {"w": torch.arange(7.0).reshape(7, 1)}
    assert int((~scores_to_masks(scores, 0.5)["w"]).sum()) == 4  # 3.5 rounds half up
    assert int((~scores_to_masks(scores, 0.2)["w"]).sum()) == 1  # 1.4 -> 1
    assert scores_to_masks(scores, 0.0)["w"].all()


def test_ties_are_broken_by_position_and_scores_are_not_modified():
    scores = {"x.weight": torch.zeros(2, 2), "y.weight": torch.zeros(1, 2)}
    before = {k: v.clone() for k, v in scores.items()}
    masks = scores_to_masks(scores, 0.5)  # 6 equal scores -> the first 3 in order are removed
    assert masks["x.weight"].tolist() == [[False, False], [False, True]]
    assert masks["y.weight"].tolist() == [[True, True]]
    assert all(torch.equal(before[k], scores[k]) for k in scores)


def test_signed_scores_rank_by_value():
    masks = scores_to_masks({"w": torch.tensor([[-5.0, 1.0, -0.1, 3.0]])}, 0.5)
    assert masks["w"].tolist() == [[False, True, False, True]]


def test_exclusion_by_name_prefix_and_pattern():
    s = _scores()
    by_prefix = scores_to_masks(s, 0.5, exclude=("b",))
    assert by_prefix["b.weight"].all()
    assert int((~by_prefix["a.weight"]).sum()) == 3
    by_pattern = scores_to_masks(s, 0.5, exclude=("*.weight",), prune_biases=True)
    assert by_pattern["a.weight"].all() and by_pattern["b.weight"].all()
    assert by_pattern["a.bias"].tolist() == [False, True]
    assert prunable_names({k: tuple(v.shape) for k, v in s.items()}, ("a.weight",), True) == ["a.bias", "b.weight"]


def test_prune_biases_includes_one_dimensional_tensors():
    masks = scores_to_masks(_scores(), 0.25, prune_biases=True)  # 12 coordinates -> remove 3: 0.1, 0.2, 0.5
    assert masks["a.bias"].tolist() == [False, False]
    assert masks["b.weight"].tolist() == [[True, True], [True, False]]


def test_neuron_granularity_removes_whole_rows_and_their_biases():
    s = _scores()  # row means: a: [5, 4.333]; b: [5.5, 3.25]
    masks = scores_to_masks(s, 0.5, granularity="neuron")
    # target 5 of 10 weight coordinates; units sorted 3.25 (2), 4.33 (3), 5 (3), 5.5 (2): 2+3 = 5
    assert masks["b.weight"].tolist() == [[True, True], [False, False]]
    assert masks["a.weight"].tolist() == [[True, True, True], [False, False, False]]
    assert masks["a.bias"].tolist() == [True, False]
    per_layer = scores_to_masks(s, 0.5, granularity="neuron", scope="layer")
    assert per_layer["a.weight"].tolist() == [[True, True, True], [False, False, False]]
    assert per_layer["b.weight"].tolist() == [[True, True], [False, False]]


def test_neuron_granularity_keeps_an_excluded_bias():
    masks = scores_to_masks(_scores(), 0.5, granularity="neuron", exclude=("a.bias",))
    assert masks["a.bias"].all()
    assert not masks["a.weight"][1].any()


def test_mask_sparsity_and_kept_fraction():
    masks = {"w": torch.tensor([True, False, False, True]), "b": torch.tensor([True, True])}
    assert mask_sparsity(masks) == pytest.approx(2 / 6)
    assert mask_sparsity(masks, ["w"]) == pytest.approx(0.5)
    assert kept_fraction(masks, ["w"]) == pytest.approx(0.5)


def test_unknown_exclude_entry_names_it_and_the_parameters():
    with pytest.raises(ConfigError) as info:
        scores_to_masks(_scores(), 0.5, exclude=("fc3",))
    msg = str(info.value)
    assert "'fc3'" in msg and "a.weight" in msg and "module prefix" in msg


def test_a_single_string_exclude_is_rejected_with_the_fix():
    with pytest.raises(ConfigError, match=r"exclude=\('b',\)"):
        scores_to_masks(_scores(), 0.5, exclude="b")


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.5"])
def test_invalid_sparsity_is_explained(bad):
    with pytest.raises(ConfigError, match="0 <= sparsity < 1"):
        scores_to_masks(_scores(), bad)


def test_invalid_scope_and_granularity_list_the_choices():
    with pytest.raises(ConfigError, match="Choose one of: global, layer"):
        scores_to_masks(_scores(), 0.5, scope="model")
    with pytest.raises(ConfigError, match="Choose one of: unstructured, neuron"):
        scores_to_masks(_scores(), 0.5, granularity="channel")


def test_nan_scores_are_an_error_naming_the_tensor():
    s = _scores()
    s["b.weight"][0, 0] = float("nan")
    with pytest.raises(ConfigError, match="'b.weight' contain NaN"):
        scores_to_masks(s, 0.5)
