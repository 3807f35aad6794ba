"""explaind.build_model and the first-party architectures (checked against loop references in float64)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from explaind_architectures import MLPConfig, modular_arithmetic_dataset

import explaind
from explaind.exceptions import ConfigError, UnknownEntryError
from explaind.models import model_from_spec


def test_build_model_tags_a_json_spec():
    model = explaind.build_model("mlp", {"hidden_sizes": [5], "activation": "tanh"}, seed=3)
    assert model.explaind_spec == {
        "name": "mlp",
        "config": {"in_features": 4, "hidden_sizes": [5], "out_features": 3, "activation": "tanh", "bias": True},
        "seed": 3,
    }
    assert json.loads(json.dumps(model.explaind_spec)) == model.explaind_spec
    assert [n for n, _ in model.named_parameters()] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert type(model).__name__ == "MLP" and model.training


def test_rebuild_from_spec_is_identical_and_global_rng_is_untouched():
    state = torch.get_rng_state()
    model = explaind.build_model("modular_transformer", {"p": 7, "d_model": 16, "d_mlp": 32}, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    rebuilt = model_from_spec(json.loads(json.dumps(model.explaind_spec)))
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name
    other = explaind.build_model("modular_transformer", {"p": 7, "d_model": 16, "d_mlp": 32}, seed=6)
    assert not torch.equal(model.embed.weight, other.embed.weight)


def test_dtype_and_config_instances():
    m32 = explaind.build_model("cnn", seed=1)
    m64 = explaind.build_model("cnn", seed=1, dtype="float64")
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    for a, b in zip(m32.parameters(), m64.parameters()):
        assert torch.equal(a.double(), b)
    m = explaind.build_model("mlp", MLPConfig(in_features=2, hidden_sizes=(), out_features=1), dtype=torch.float64)
    assert m.explaind_spec["config"]["hidden_sizes"] == []
    assert m(torch.zeros(3, 2, dtype=torch.float64)).shape == (3, 1)


def test_default_init_scale_matches_torch_convention():
    model = explaind.build_model("mlp", {"in_features": 400, "hidden_sizes": [300], "out_features": 2})
    weight = model.net[0].weight
    bound = 1 / math.sqrt(400)
    assert weight.abs().max() <= bound and weight.abs().max() > 0.99 * bound
    assert abs(weight.std().item() - bound / math.sqrt(3)) < 0.01 * bound


@pytest.mark.parametrize(
    ("name", "config", "fragments"),
    [
        ("mlp", {"activation": "sigmoid"}, ["'activation'", "'sigmoid'", "'relu', 'tanh' or 'gelu'"]),
        ("mlp", {"widht": 3}, ["'widht'", "Extra inputs are not permitted"]),
        ("mlp", {"hidden_sizes": [4, 0]}, ["'hidden_sizes.1'", "greater than 0"]),
        ("cnn", {"image_size": 12, "channels": [4, 4, 4]}, ["image_size=12 is not divisible by 2**len(channels)=8"]),
        ("modular_transformer", {"d_model": 30}, ["d_model=30 is not divisible by n_heads=4"]),
        ("modular_transformer", {"p": 1}, ["'p'", "greater than or equal to 2"]),
        ("modular_transformer", {"activation": "tanh"}, ["'activation'", "'relu' or 'gelu'"]),
    ],
)
def test_invalid_configs_name_the_field(name, config, fragments):
    with pytest.raises(ConfigError) as info:
        explaind.build_model(name, config)
    message = str(info.value)
    assert message.startswith(f"architecture {name!r}: invalid value for ")
    for fragment in fragments:
        assert fragment in message


def test_other_bad_arguments():
    with pytest.raises(UnknownEntryError, match="Unknown architecture 'mpl'. Choose one of: .*Did you mean 'mlp'"):
        explaind.build_model("mpl")
    with pytest.raises(ConfigError, match=r"config must be a dict or a MLPConfig instance; got list\. Pass e\.g\."):
        explaind.build_model("mlp", [4, 3])
    for seed in (-1, True, "0", 1.5):
        with pytest.raises(ConfigError, match="seed must be a non-negative int"):
            explaind.build_model("mlp", seed=seed)
    with pytest.raises(ConfigError, match="Unsupported dtype 'float16'. Choose one of: float32, float64."):
        explaind.build_model("mlp", dtype="float16")
    with pytest.raises(ConfigError, match="invalid value for 'in_features'"):
        explaind.build_model("cnn", MLPConfig())  # a config of another architecture
    with pytest.raises(ConfigError, match="keys 'name', 'config' and 'seed'"):
        model_from_spec({"name": "mlp"})


def test_cnn_shapes_for_digits_and_cifar():
    digits = explaind.build_model("cnn")
    assert digits(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    cifar = explaind.build_model("cnn", {"in_channels": 3, "image_size": 32, "channels": [8, 8, 16]})
    assert cifar(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert cifar.head.in_features == 16 * 4 * 4
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in cifar.modules())


def test_modular_dataset_rows():
    inputs, targets = modular_arithmetic_dataset(5)
    assert inputs.shape == (25, 4) and inputs.dtype == torch.int64
    rows = [tuple(r) for r in inputs.tolist()]
    assert rows == [(a, 5, b, 6) for a in range(5) for b in range(5)]
    assert targets.tolist() == [(a + b) % 5 for a in range(5) for b in range(5)]


def _layer_norm(v, weight, bias):
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return [(x - mean) / math.sqrt(var + 1e-5) * w + b for x, w, b in zip(v, weight, bias)]


def _matvec(weight, v):  # y = W v for a (out, in) nested list
    return [sum(w * x for w, x in zip(row, v)) for row in weight]


def _gelu(v):
    return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


def _reference_transformer(model, tokens, layer_norm, activation="relu"):
    """The forward pass written as scalar loops over positions, heads and dimensions."""
    sd = {k: v.tolist() for k, v in model.state_dict().items()}
    d, heads = len(sd["pos_embed.weight"][0]), model.n_heads
    dh = d // heads

    def ln(name, v):
        return _layer_norm(v, sd[f"{name}.weight"], sd[f"{name}.bias"]) if layer_norm else v

    out = []
    for seq in tokens.tolist():
        x = [[e + p for e, p in zip(sd["embed.weight"][t], sd["pos_embed.weight"][i])] for i, t in enumerate(seq)]
        h = [ln("ln_attn", v) for v in x]
        q = [_matvec(sd["W_Q.weight"], v) for v in h]
        k = [_matvec(sd["W_K.weight"], v) for v in h]
        val = [_matvec(sd["W_V.weight"], v) for v in h]
        for i in range(len(seq)):
            z = []
            for head in range(heads):
                sl = slice(head * dh, (head + 1) * dh)
                scores = [sum(a * b for a, b in zip(q[i][sl], k[j][sl])) / math.sqrt(dh) for j in range(i + 1)]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                z += [sum(weights[j] / total * val[j][sl][c] for j in range(i + 1)) for c in range(dh)]
            x[i] = [a + b for a, b in zip(x[i], _matvec(sd["W_O.weight"], z))]
        last = x[-1]
        act = (lambda v: max(0.0, v)) if activation == "relu" else _gelu
        hidden = [act(a + b) for a, b in zip(_matvec(sd["mlp_in.weight"], ln("ln_mlp", last)), sd["mlp_in.bias"])]
        last = [a + b + c for a, b, c in zip(last, _matvec(sd["mlp_out.weight"], hidden), sd["mlp_out.bias"])]
        out.append(_matvec(sd["unembed.weight"], ln("ln_final", last)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("layer_norm, activation", [(False, "relu"), (True, "relu"), (False, "gelu")])
def test_transformer_matches_a_loop_reference(layer_norm, activation):
    config = {"p": 7, "d_model": 8, "n_heads": 4, "d_mlp": 12, "layer_norm": layer_norm, "activation": activation}
    model = explaind.build_model("modular_transformer", config, seed=2, dtype="float64")
    if layer_norm:
        with torch.no_grad():  # non-trivial norm parameters
            for m in (model.ln_attn, model.ln_mlp, model.ln_final):
                m.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
                m.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    else:
        assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    inputs, _ = modular_arithmetic_dataset(7)
    chosen = inputs[torch.tensor([0, 5, 13, 30, 48])]
    with torch.no_grad():
        got = model(chosen)
    assert got.shape == (5, 7)
    want = _reference_transformer(model, chosen, layer_norm, activation)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_transformer_learns_modular_addition():
    p = 5
    model = explaind.build_model("modular_transformer", {"p": p, "d_model": 16, "d_mlp": 32}, seed=0)
    inputs, targets = modular_arithmetic_dataset(p)
    loss_fn = explaind.get_entry("loss", "cross_entropy").implementation
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):  # reaches 100% after about 50 steps
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).mean().backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(inputs).argmax(1) == targets).double().mean().item()
    assert accuracy == 1.0
