"""The position-sensitive value checksum of plain tensor attributes (explaind/trajectory/_tensor_watch.py).

Before, the checksum was 16 block sums of the elements' bit patterns: two elements of one block swapped through
``.data``, or moved by +d and -d, kept every sum, so the recorder accepted the edit and the engine replayed every
earlier step with a tensor the loop never ran (silently inexact). The checksum is now the digest of the row and
column sums of the bit patterns laid out in rows; the tests below check it against a slow Python loop over the bit
patterns (independent of the vectorised code), and that such edits are seen, refused while recording and warned
about at ``fit`` after it. A record kept in format 1 (the block sums) is still compared.
"""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
from test_attribute_changes import DT, Model, record
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError
from explaind.trajectory import _tensor_watch

pytestmark = pytest.mark.usefixtures("one_thread")

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _wrap(value: int, bits: int) -> int:
    """``value`` as a signed integer of ``bits`` bits (two's complement)."""
    value %= 1 << bits
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _loop_block_sums(t: torch.Tensor) -> list[int]:
    """The 16 block sums and the tail's (format 1), wrapped in int32 (int64 for 8-byte elements), by a loop."""
    ints, size = _ints(t)
    width = 64 if size == 8 else 32
    n = len(ints)
    blocks = max(1, min(16, n))
    per = n // blocks
    sums = [_wrap(sum(ints[b * per:(b + 1) * per]), width) for b in range(blocks)]
    return [*sums, _wrap(sum(ints[blocks * per:]), width)]


def _ints(t: torch.Tensor) -> tuple[list[int], int]:
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    size = flat.element_size()
    return [int(v) for v in flat.view(_INT[size]).tolist()], size


def _loop_checksum(t: torch.Tensor) -> tuple[int, int]:
    """``(L, digest)``: rows of L elements (the power of two at or above sqrt(n), at least 64), the row sums and
    the column sums wrapped in the elements' width, little-endian, their BLAKE2b-128 digest, by a loop."""
    ints, size = _ints(t)
    n = len(ints)
    row = 64
    while row * row < n:
        row *= 2
    signed = size > 1  # bytes (uint8, bool) are unsigned
    rows = [sum(ints[i:i + row]) for i in range(0, n - n % row, row)] + [sum(ints[n - n % row:])]
    columns = [sum(ints[q::row]) for q in range(row)]

    def pack(v: int) -> bytes:
        v = _wrap(v, 8 * size) if signed else v % (1 << 8 * size)
        return v.to_bytes(size, "little", signed=signed)

    digest = hashlib.blake2b(b"".join(pack(v) for v in rows + columns), digest_size=16).digest()
    return row, int.from_bytes(digest, "little")


CASES = {
    "float32": lambda g: torch.randn(3000, generator=g),
    "float32 of 4096 (whole rows)": lambda g: torch.randn(64, 64, generator=g),
    "float64": lambda g: torch.randn(2500, generator=g, dtype=torch.float64),
    "float16": lambda g: torch.randn(1100, generator=g).half(),
    "int64": lambda g: torch.randint(-2**40, 2**40, (1500,), generator=g),
    "uint8": lambda g: torch.randint(0, 256, (2100,), generator=g, dtype=torch.uint8),
    "bool": lambda g: torch.rand(1800, generator=g) > 0.5,
    "complex128": lambda g: torch.randn(700, generator=g, dtype=torch.complex128),
    "float32 of 5": lambda g: torch.randn(5, generator=g),
    "empty": lambda g: torch.zeros(0),
}


@pytest.mark.parametrize("chunk", [4 << 20, 256], ids=["one chunk", "chunks of 256 bytes"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_checksum_is_the_loop_references_digest_of_row_and_column_sums(case, chunk, monkeypatch):
    monkeypatch.setattr(_tensor_watch, "_CHUNK_BYTES", chunk)
    t = CASES[case](torch.Generator().manual_seed(3))
    assert _tensor_watch.checksum(t) == _loop_checksum(t)
    assert _tensor_watch.checksum(t.clone()) == _tensor_watch.checksum(t)  # the same values: the same checksum
    assert list(_tensor_watch.block_sums(t)) == _loop_block_sums(t)


def _swap(t: torch.Tensor, a: int, b: int) -> None:
    flat = t.data.view(-1)
    flat[a], flat[b] = flat[b].clone(), flat[a].clone()


EDITS = {
    "two elements of one block swapped": lambda t: _swap(t, 10, 700),
    "doubled and halved in one block (float bits +2**k and -2**k, 512 apart)": lambda t: (
        t.data.view(-1)[0].mul_(2.0), t.data.view(-1)[512].div_(2.0)),
    "+d and -d in one block": lambda t: (t.data.view(-1)[7].add_(3), t.data.view(-1)[300].sub_(3)),
}
DTYPES = {"two elements of one block swapped": (torch.float32, torch.float64, torch.int32),
          "doubled and halved in one block (float bits +2**k and -2**k, 512 apart)": (torch.float32, torch.float64),
          "+d and -d in one block": (torch.int32, torch.int64, torch.int16)}


@pytest.mark.parametrize(("edit", "dtype"), [(e, d) for e, ds in DTYPES.items() for d in ds])
def test_edits_that_keep_every_block_sum_change_the_checksum(edit, dtype):
    t = torch.arange(16384) % 97 + 1  # blocks of 1024 elements
    t = t.to(dtype) / 7 if dtype.is_floating_point else t.to(dtype)
    before, blocks = _tensor_watch.checksum(t), _tensor_watch.block_sums(t)
    version = t._version
    EDITS[edit](t)
    assert t._version == version  # through .data: torch's version counter does not see it
    after = _tensor_watch.checksum(t)
    assert _tensor_watch.block_sums(t) == blocks  # the checksum before (16 block sums) misses it
    assert after != before


def test_a_swap_of_two_bools_and_of_two_int64_words_is_seen():
    flags = torch.zeros(64, dtype=torch.bool)
    flags[3] = True
    other = flags.clone()
    _swap(other, 3, 1)  # blocks of 4 elements: both in the first
    assert _tensor_watch.checksum(other) != _tensor_watch.checksum(flags)
    big = torch.tensor([1 << 40, 0, 5, 7] * 8)
    other = big.clone()
    _swap(other, 0, 1)
    assert _tensor_watch.checksum(other) != _tensor_watch.checksum(big)


class Mixing(Model):
    """``Model`` whose first layer's output is mixed by ``mix``, a plain (8, 8) tensor attribute (not a buffer):
    16 blocks of 4 elements, so ``mix[0, 0]`` and ``mix[0, 1]`` share a block."""

    def __init__(self):
        super().__init__()
        self.mix = torch.linspace(0.5, 2.0, 64, dtype=DT).reshape(8, 8)

    def forward(self, x):
        return self.l2(torch.tanh(torch.tanh(self.l1(x)) @ self.mix))


def _swap_in_block(m: nn.Module) -> None:
    _swap(m.mix, 0, 1)


def test_two_elements_of_one_block_swapped_through_data_between_steps_are_refused():
    with pytest.raises(TrajectoryError, match=r"Step 1: .*mix \(Mixing\): a Tensor of shape \(8, 8\) float64 -> a "
                                              r"Tensor of shape \(8, 8\) float64 \(values changed; a plain tensor"):
        record(Mixing(), lambda m, s: _swap_in_block(m) if s == 0 else None)


def test_two_elements_of_one_block_swapped_after_recording_are_warned_about_at_fit():
    model = Mixing()
    rec = record(model)
    _swap_in_block(model)
    with pytest.warns(ExplaindWarning, match=r"KernelReplica\.fit: .*differs from the recording's last step: mix: "
                                             r"<tensor \(8, 8\) float64 [0-9a-f]{12}> -> <tensor \(8, 8\) float64"):
        explaind.KernelReplica().fit(rec.trajectory)


def test_a_format_1_record_is_compared_by_its_block_sums():
    """A record kept before (format 1: the digest of the block sums only, computed here by the loop) matches the
    unchanged model without a warning and names a later edit the block sums see."""
    model = Mixing()
    rec = record(model)
    kept = rec.trajectory.attribute_record
    assert kept["format"] == 2
    sums = _loop_block_sums(model.mix)
    digest = hashlib.blake2b(repr(tuple(sums)).encode(), digest_size=6).hexdigest()
    rec.trajectory.attribute_record = {**kept, "format": 1,
                                       "entries": {**kept["entries"], "mix": f"<tensor (8, 8) float64 {digest}>"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        explaind.KernelReplica().fit(rec.trajectory)
    model.mix.data.mul_(2.0)
    with pytest.warns(ExplaindWarning, match=r"differs from the recording's last step: mix: <tensor \(8, 8\) float64 "
                                             + digest):
        explaind.KernelReplica().fit(rec.trajectory)
