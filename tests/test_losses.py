"""Per-sample losses of the explaind_losses plugin and explaind.losses.resolve_loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import explaind
from explaind.exceptions import ConfigError, UnknownEntryError
from explaind.losses import CUSTOM_LOSS_PREFIX, resolve_loss


def torch_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _impl(name):
    return explaind.get_entry("loss", name).implementation


def _loop_cross_entropy(outputs, targets):
    values = []
    for row, y in zip(outputs.tolist(), targets.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        values.append(log_z - row[y])
    return torch.tensor(values, dtype=torch.float64)


def test_cross_entropy_matches_a_loop_and_torch():
    g = torch_gen(0)
    outputs = torch.randn(7, 4, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 4, (7,), generator=g)
    values = _impl("cross_entropy")(outputs, targets)
    assert values.shape == (7,)
    torch.testing.assert_close(values, _loop_cross_entropy(outputs, targets), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(values.mean(), F.cross_entropy(outputs, targets), rtol=1e-13, atol=0)


def test_cross_entropy_with_probabilities_and_extra_dims():
    g = torch_gen(1)
    outputs = torch.randn(5, 3, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    values = _impl("cross_entropy")(outputs, probs)
    expected = torch.tensor([-(probs[k] * torch.log_softmax(outputs[k], 0)).sum() for k in range(5)])
    torch.testing.assert_close(values, expected.double(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(values.mean(), F.cross_entropy(outputs, probs), rtol=1e-13, atol=0)
    seq = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)  # (n, C, length)
    seq_targets = torch.randint(0, 3, (4, 6), generator=g)
    values = _impl("cross_entropy")(seq, seq_targets)
    per_pos = torch.stack([_loop_cross_entropy(seq[:, :, j], seq_targets[:, j]) for j in range(6)], dim=1)
    torch.testing.assert_close(values, per_pos.mean(1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(values.mean(), F.cross_entropy(seq, seq_targets), rtol=1e-13, atol=0)


def test_nll_and_mse_match_loops_and_torch():
    g = torch_gen(2)
    log_probs = torch.log_softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), 1)
    targets = torch.randint(0, 5, (6,), generator=g)
    values = _impl("nll")(log_probs, targets)
    torch.testing.assert_close(values, torch.tensor([-log_probs[k, targets[k]].item() for k in range(6)],
                                                    dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(values.mean(), F.nll_loss(log_probs, targets), rtol=1e-14, atol=0)
    outputs = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    values = _impl("mse")(outputs, y)
    loop = [sum((a - b) ** 2 for a, b in zip(outputs[k].flatten().tolist(), y[k].flatten().tolist())) / 6
            for k in range(6)]
    torch.testing.assert_close(values, torch.tensor(loop, dtype=torch.float64), rtol=1e-13, atol=0)
    torch.testing.assert_close(values.mean(), F.mse_loss(outputs, y), rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", ["cross_entropy", "nll", "mse"])
def test_vmap_over_single_samples_and_per_sample_grad(name):
    record = explaind.get_entry("loss", name)
    outputs, targets = record.example(6, torch_gen(3))
    outputs = outputs.double()
    targets = targets.double() if targets.is_floating_point() else targets
    mapped = torch.func.vmap(record.implementation)(outputs.unsqueeze(1), targets.unsqueeze(1))
    assert mapped.shape == (6, 1)
    torch.testing.assert_close(mapped[:, 0], record.implementation(outputs, targets), rtol=1e-14, atol=1e-14)
    grads = torch.func.vmap(torch.func.grad(lambda o, t: record.implementation(o, t)[0]))(
        outputs.unsqueeze(1), targets.unsqueeze(1))
    for k in range(6):
        leaf = outputs[k : k + 1].clone().requires_grad_(True)
        record.implementation(leaf, targets[k : k + 1])[0].backward()
        torch.testing.assert_close(grads[k], leaf.grad, rtol=1e-13, atol=1e-14)


def test_loss_input_errors():
    with pytest.raises(ConfigError, match=r"mse loss: targets of shape \(4,\) do not match outputs of shape \(4, 1\)"):
        _impl("mse")(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ConfigError, match=r"class-index targets must have shape \(4,\) .* got \(4, 1\)"):
        _impl("cross_entropy")(torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"probability targets must have the shape of the outputs \(4, 3\)"):
        _impl("cross_entropy")(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ConfigError, match="nll loss: targets must be integer class indices; got dtype torch.float32"):
        _impl("nll")(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ConfigError, match=r"outputs must have shape \(n, C\) .* got shape \(4,\)"):
        _impl("cross_entropy")(torch.zeros(4), torch.zeros(4, dtype=torch.long))


def test_mse_accepts_integer_targets():
    values = _impl("mse")(torch.tensor([[1.0], [3.0]]), torch.tensor([[0], [1]]))
    torch.testing.assert_close(values, torch.tensor([1.0, 4.0]))


# ------------------------------------------------------------------------------ resolve_loss
def test_resolve_loss_names_and_records():
    record = resolve_loss("mse")
    assert record is explaind.get_entry("loss", "mse")
    assert resolve_loss(record) is record


def test_resolve_loss_unknown_name():
    with pytest.raises(UnknownEntryError) as info:
        resolve_loss("mse2")
    message = str(info.value)
    assert message.startswith(
        "Unknown loss 'mse2'. Choose one of: causal_lm, cross_entropy, mse, nll, token_cross_entropy")
    assert "Did you mean 'mse'?" in message
    assert message.endswith("A callable (outputs, targets) -> mean loss is accepted too.")


def test_resolve_loss_rejects_other_values():
    with pytest.raises(ConfigError, match="loss=42 is neither a registered loss name nor a callable"):
        resolve_loss(42)


def _huber(outputs, targets):
    return F.huber_loss(outputs, targets, delta=0.5)


def test_wrapped_callable_gives_per_sample_values():
    g = torch_gen(4)
    outputs = torch.randn(5, 3, generator=g, dtype=torch.float64)
    targets = torch.randn(5, 3, generator=g, dtype=torch.float64)
    record = resolve_loss(_huber, check=(outputs, targets))
    assert record.name == f"{CUSTOM_LOSS_PREFIX}_huber"
    values = record.implementation(outputs, targets)
    expected = torch.stack([F.huber_loss(outputs[k], targets[k], delta=0.5) for k in range(5)])
    torch.testing.assert_close(values, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(values.mean(), _huber(outputs, targets), rtol=1e-14, atol=0)
    # usable inside an outer vmap/grad over single samples, as the engine calls it
    grads = torch.func.vmap(torch.func.grad(lambda o, t: record.implementation(o, t)[0]))(
        outputs.unsqueeze(1), targets.unsqueeze(1))
    for k in range(5):
        leaf = outputs[k : k + 1].clone().requires_grad_(True)
        _huber(leaf, targets[k : k + 1]).backward()
        torch.testing.assert_close(grads[k], leaf.grad, rtol=1e-14, atol=0)


def test_wrapped_callable_falls_back_to_a_loop():
    calls = []

    def not_vmappable(outputs, targets):
        calls.append(outputs.shape)
        scale = float((targets.abs().sum() + 1).item())  # .item() fails under vmap
        return ((outputs - targets) ** 2).mean() * scale / scale

    outputs, targets = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    record = resolve_loss(not_vmappable)
    values = record.implementation(outputs, targets)
    torch.testing.assert_close(values, ((outputs - targets) ** 2).mean(1), rtol=1e-14, atol=0)
    assert calls[-4:] == [torch.Size([1, 2])] * 4


def test_wrapped_callable_errors():
    outputs, targets = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.raises(ConfigError, match="must return the mean loss of the batch as a scalar tensor; it returned"):
        resolve_loss(lambda o, t: F.cross_entropy(o, t, reduction="none")).implementation(outputs, targets)
    summed = resolve_loss(lambda o, t: F.cross_entropy(o, t, reduction="sum"))
    summed.implementation(outputs, targets)  # values are computed, but the check below exposes the reduction
    with pytest.raises(ConfigError, match="differs from the batch loss") as info:
        resolve_loss(lambda o, t: F.cross_entropy(o, t, reduction="sum"), check=(outputs, targets))
    assert "use reduction='mean'" in str(info.value)
    with pytest.raises(ConfigError, match="got 4 outputs but"):
        resolve_loss(_huber).implementation(outputs, torch.zeros(3, 3))


def test_check_against_registered_reference():
    outputs, targets = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    assert resolve_loss("cross_entropy", check=(outputs, targets)).name == "cross_entropy"


def test_check_needs_a_reference():
    from explaind.records import LossRecord

    record = LossRecord(name="plain", implementation=lambda o, t: (o - t).abs().mean(1), description="d")
    with pytest.raises(ConfigError, match="Loss 'plain' has no reference batch loss to check against"):
        resolve_loss(record, check=(torch.zeros(2, 1), torch.zeros(2, 1)))
