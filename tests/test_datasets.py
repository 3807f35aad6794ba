"""Built-in datasets: modular arithmetic, digits, CIFAR-10 binary reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explaind.datasets import (
    CIFAR10_RECORD_BYTES,
    DatasetError,
    digits,
    load_cifar10,
    load_dataset,
    modular_arithmetic,
    read_cifar10_binary,
)
from explaind.exceptions import ConfigError, ExplaindError


# ----------------------------------------------------------------------------- modular arithmetic
def test_modular_paper_sizes_and_tokens():
    ds = modular_arithmetic()  # paper: p=113, 4000 train / 2000 validation
    assert (ds.n_train, ds.n_val, ds.n_classes) == (4000, 2000, 113)
    assert ds.X_train.shape == (4000, 4) and ds.X_train.dtype == torch.int64
    for X, y in (ds.train, ds.val):
        a, plus, b, eq = X.unbind(1)
        assert torch.all(plus == 113) and torch.all(eq == 114)
        assert torch.all((a >= 0) & (a < 113) & (b >= 0) & (b < 113))
        assert torch.equal(y, (a + b) % 113)
    assert ds.meta["vocab_size"] == 115


def test_modular_split_disjoint_and_covers_all_pairs_when_val_is_rest():
    p = 7
    ds = modular_arithmetic(p, n_train=0.4, n_val=None, seed=3)
    pairs = {(int(x[0]), int(x[2])) for x in torch.cat([ds.X_train, ds.X_val])}
    assert len(pairs) == p * p == ds.n_train + ds.n_val
    train = {(int(x[0]), int(x[2])) for x in ds.X_train}
    val = {(int(x[0]), int(x[2])) for x in ds.X_val}
    assert not train & val
    assert ds.n_train == round(0.4 * 49)
    # pairs are enumerated independently of the implementation
    for a in range(p):
        for b in range(p):
            assert (a, b) in pairs


def test_modular_seeded_and_rebuildable():
    a = modular_arithmetic(11, n_train=30, n_val=20, seed=1)
    b = modular_arithmetic(11, n_train=30, n_val=20, seed=1)
    c = modular_arithmetic(11, n_train=30, n_val=20, seed=2)
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.X_val, b.X_val)
    assert not torch.equal(a.X_train, c.X_train)
    spec = a.spec()
    again = load_dataset(spec["name"], **spec["params"])
    assert torch.equal(again.X_train, a.X_train) and torch.equal(again.y_val, a.y_val)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"p": 1}, "at least 2"),
        ({"p": 5, "n_train": 20, "n_val": 10}, "exceeds the 25 pairs"),
        ({"p": 5, "n_train": 1.5}, "fraction outside"),
        ({"p": 5, "n_train": 0}, "at least 1"),
        ({"p": 5, "n_train": "ten"}, "must be a count"),
    ],
)
def test_modular_bad_input(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        modular_arithmetic(**kwargs)


# ----------------------------------------------------------------------------- digits
def test_digits_full_and_scaled():
    from sklearn.datasets import load_digits

    ds = digits(seed=0)
    n = len(load_digits().target)
    assert ds.n_train + ds.n_val == n
    assert ds.X_train.shape[1:] == (1, 8, 8)
    assert float(ds.X_train.min()) >= 0.0 and float(ds.X_train.max()) == 1.0
    assert ds.n_classes == 10
    assert abs(ds.n_val - round(0.25 * n)) <= 1


def test_digits_two_class_subset_relabels_in_given_order():
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = digits(classes=(8, 3), flatten=True, seed=5)
    assert ds.n_classes == 2 and ds.X_train.shape[1] == 64
    expected_total = int(np.sum(raw.target == 8) + np.sum(raw.target == 3))
    assert ds.n_train + ds.n_val == expected_total
    # every sample must equal a raw image of the digit its label names (8 -> 0, 3 -> 1)
    lookup = {tuple((raw.data[i] / 16.0).round(6)): int(raw.target[i]) for i in range(len(raw.target))}
    for x, y in zip(ds.X_train[:40], ds.y_train[:40]):
        digit = lookup[tuple(np.round(x.numpy().astype(np.float64), 6))]
        assert digit == (8 if int(y) == 0 else 3)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"classes": (3,)}, "at least two"),
        ({"classes": (3, 11)}, "contains \\[11\\]"),
        ({"classes": (3, 3)}, "repeats"),
        ({"val_fraction": 1.0}, "strictly between"),
    ],
)
def test_digits_bad_input(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        digits(**kwargs)


# ----------------------------------------------------------------------------- CIFAR-10 binary
def _write_records(path, labels, seed):
    """Write CIFAR-10 binary records byte by byte (label, then R, G, B planes row-major)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    out = bytearray()
    for label, img in zip(labels, images):
        out.append(int(label))
        for channel in range(3):
            for row in range(32):
                for col in range(32):
                    out.append(int(img[channel, row, col]))
    path.write_bytes(bytes(out))
    return images


def test_read_cifar10_binary_roundtrip(tmp_path):
    labels = [3, 0, 9, 5]
    images = _write_records(tmp_path / "data_batch_1.bin", labels, seed=0)
    got_images, got_labels = read_cifar10_binary(tmp_path / "data_batch_1.bin")
    assert got_images.dtype == np.uint8 and got_images.shape == (4, 3, 32, 32)
    assert got_labels.tolist() == labels
    assert np.array_equal(got_images, images)
    # pixel (channel 1, row 2, col 5) of record 2 sits at byte 1 + 1024 + 2*32 + 5 of that record
    raw = (tmp_path / "data_batch_1.bin").read_bytes()
    assert raw[2 * CIFAR10_RECORD_BYTES + 1 + 1024 + 2 * 32 + 5] == got_images[2, 1, 2, 5]


def test_load_cifar10_two_class(tmp_path):
    _write_records(tmp_path / "data_batch_1.bin", [3, 5, 1, 5], seed=1)
    _write_records(tmp_path / "data_batch_2.bin", [3, 2], seed=2)
    test_images = _write_records(tmp_path / "test_batch.bin", [5, 3, 7], seed=3)
    ds = load_cifar10(tmp_path, classes=(3, 5))
    assert ds.n_train == 4 and ds.n_val == 2 and ds.n_classes == 2
    assert ds.y_train.tolist() == [0, 1, 1, 0]
    assert ds.y_val.tolist() == [1, 0]
    assert torch.allclose(ds.X_val[0], torch.as_tensor(test_images[0], dtype=torch.float32) / 255.0)
    assert ds.meta["class_names"] == ["cat", "dog"]
    flat = load_cifar10(tmp_path, flatten=True, max_train=3)
    assert flat.X_train.shape == (3, 3072) and flat.n_classes == 10


def test_cifar10_errors_name_the_file(tmp_path):
    bad = tmp_path / "data_batch_1.bin"
    bad.write_bytes(b"\x01" * (CIFAR10_RECORD_BYTES + 7))
    with pytest.raises(DatasetError, match="data_batch_1.bin.*not a positive multiple"):
        read_cifar10_binary(bad)
    bad.write_bytes(bytes([12]) + b"\x00" * (CIFAR10_RECORD_BYTES - 1))
    with pytest.raises(DatasetError, match="record 0 has label 12"):
        read_cifar10_binary(bad)
    with pytest.raises(DatasetError, match="does not exist"):
        read_cifar10_binary(tmp_path / "missing.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="No CIFAR-10 files"):
        load_cifar10(empty)
    assert issubclass(DatasetError, ExplaindError)


def test_load_dataset_unknown_name_and_param():
    with pytest.raises(ConfigError, match="Unknown dataset 'digit'.*Choose one of: modular, digits, cifar10.*'digits'"):
        load_dataset("digit")
    with pytest.raises(ConfigError, match="invalid parameters.*Allowed: p, n_train"):
        load_dataset("modular", q=3)
