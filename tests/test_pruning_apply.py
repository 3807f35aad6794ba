"""Applying masks: copies, torch.nn.utils.prune export, global pruning by scores, safetensors files."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from explaind.exceptions import ConfigError
from explaind.pruning import (
    apply_masks,
    export_to_torch_prune,
    load_pruned,
    masks_from_torch_prune,
    prune_global_by_scores,
    remove_torch_prune,
    save_pruned,
    scores_to_masks,
)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def _masks(model, sparsity=0.6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    return scores, scores_to_masks(scores, sparsity)


def test_apply_masks_zeroes_removed_coordinates_on_a_copy():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, masks = _masks(model)
    pruned = apply_masks(model, masks)
    for name, p in pruned.named_parameters():
        expected = torch.where(masks[name], before[name], torch.zeros_like(before[name]))
        assert torch.equal(p, expected)
        assert torch.equal(model.get_parameter(name), before[name])  # original untouched
    assert pruned is not model


def test_apply_masks_inplace_returns_the_same_model():
    model = _model()
    _, masks = _masks(model)
    out = apply_masks(model, masks, inplace=True)
    assert out is model
    assert int((model[0].weight == 0).sum()) == int((~masks["0.weight"]).sum())


def test_torch_prune_export_matches_apply_and_keeps_zeros_while_training():
    model = _model()
    _, masks = _masks(model)
    X = torch.randn(5, 4, dtype=torch.float64)
    reference = apply_masks(model, masks)(X)
    exported = export_to_torch_prune(model, masks, inplace=False)
    assert prune.is_pruned(exported[0]) and prune.is_pruned(exported[2])
    assert torch.allclose(exported(X), reference, rtol=0, atol=1e-15)
    back = masks_from_torch_prune(exported)
    assert all(torch.equal(back[n], masks[n]) for n in masks)
    # one SGD step: removed coordinates stay zero through the re-parametrisation
    opt = torch.optim.SGD(exported.parameters(), lr=0.5)
    exported(X).sum().backward()
    opt.step()
    assert torch.all(exported[0].weight[~masks["0.weight"]] == 0)
    remove_torch_prune(exported)
    assert not prune.is_pruned(exported[0])
    assert torch.all(exported[0].weight[~masks["0.weight"]] == 0)


def test_prune_global_by_scores_matches_scores_to_masks():
    model = _model()
    scores, _ = _masks(model)
    weights = ["0.weight", "2.weight"]
    expected = scores_to_masks({n: scores[n] for n in weights}, 0.7)
    prune_global_by_scores(model, scores, 0.7, names=weights)
    got = masks_from_torch_prune(model)
    for n in weights:
        assert torch.equal(got[n], expected[n])
    assert got["0.bias"].all()


def test_prune_global_by_scores_ranks_signed_scores_by_value():
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).double()
    scores = {"0.weight": torch.tensor([[-3.0, 1.0], [0.5, -0.1]], dtype=torch.float64)}
    prune_global_by_scores(model, scores, 0.5)
    assert masks_from_torch_prune(model)["0.weight"].tolist() == [[False, True], [True, False]]


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    _, masks = _masks(model)
    pruned = apply_masks(model, masks)
    path = save_pruned(pruned, tmp_path / "m.safetensors", masks, metadata={"strategy": "magnitude", "sparsity": 0.6})
    fresh = _model(seed=5)
    loaded, got_masks, meta = load_pruned(path, fresh)
    assert meta == {"strategy": "magnitude", "sparsity": 0.6}
    for name, p in pruned.named_parameters():
        assert torch.equal(loaded.get_parameter(name), p)
        assert torch.equal(got_masks[name], masks[name])
    X = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(loaded(X), pruned(X))


def test_save_a_torch_pruned_model_and_reattach(tmp_path):
    model = _model()
    _, masks = _masks(model)
    export_to_torch_prune(model, masks)
    path = save_pruned(model, tmp_path / "t.safetensors")  # masks read from the torch re-parametrisation
    loaded, got_masks, _ = load_pruned(path, _model(seed=3), torch_prune=True)
    assert prune.is_pruned(loaded[0])
    X = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(loaded(X), model(X), rtol=0, atol=1e-15)
    assert all(torch.equal(got_masks[n], masks[n]) for n in masks)


def test_load_into_a_different_architecture_is_explained(tmp_path):
    model = _model()
    _, masks = _masks(model)
    path = save_pruned(apply_masks(model, masks), tmp_path / "m.safetensors", masks)
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.Linear(3, 2)).double()
    with pytest.raises(ConfigError, match=r"does not fit the model \(missing: \['3.bias', '3.weight'\]"):
        load_pruned(path, other)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ConfigError, match="expected 'explaind.pruned-model'"):
        load_pruned(tmp_path / "plain.safetensors", _model())
    with pytest.raises(ConfigError, match="no file at"):
        load_pruned(tmp_path / "missing.safetensors", _model())


def test_mask_errors_name_the_parameter():
    model = _model()
    with pytest.raises(ConfigError, match=r"masks name parameters the model does not have: \['fc.weight'\]"):
        apply_masks(model, {"fc.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ConfigError, match=r"mask '0.weight' has shape \(4, 6\)"):
        apply_masks(model, {"0.weight": torch.ones(4, 6, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="masks are boolean"):
        apply_masks(model, {"0.weight": torch.ones(6, 4)})


def test_metadata_must_be_json(tmp_path):
    model = _model()
    _, masks = _masks(model)
    with pytest.raises(ConfigError, match="JSON-serialisable"):
        save_pruned(model, tmp_path / "m.safetensors", masks, metadata={"bad": object()})
