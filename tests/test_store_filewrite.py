"""The store's tensor files (explaind/trajectory/_filewrite.py): the safetensors library's layout, checksums,
O_DIRECT and its fallback to the page cache, atomic replacement and the reused buffer."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
import xxhash
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from explaind.trajectory import _filewrite
from explaind.trajectory._filewrite import TensorFileWriter
from explaind.trajectory._io import read_tensors
from explaind.trajectory._layout import TEMP_FILE


def _tensors(seed: int = 0, n: int = 1000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "param.w": torch.randn(n, 7, generator=g),
        "param.b": torch.randn(7, generator=g, dtype=torch.float64),
        "update.scalars": torch.randn(3, 7, generator=g, dtype=torch.float64),
        "t": torch.randn(5, 3, generator=g).t(),  # not contiguous
        "half": torch.randn(4, generator=g).half(),
        "bf": torch.randn(3, 2, generator=g).bfloat16(),
        "batch.indices": torch.randint(0, 100, (9,), generator=g),
        "i32": torch.randint(-5, 5, (2, 2), generator=g, dtype=torch.int32),
        "i16": torch.randint(-5, 5, (3,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-5, 5, (3,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "mask": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


def _xxh3(data: bytes) -> str:
    """The checksum a store records for ``data`` (XXH3-128), computed here with the xxhash package itself."""
    return "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


@pytest.mark.parametrize("direct", [True, False])
def test_files_have_the_safetensors_library_layout_and_checksum(tmp_path, direct):
    tensors, meta = _tensors(), {"step": "3", "record": '{"a": "b\\"c"}'}
    record = TensorFileWriter(direct=direct).write(tmp_path, "steps/000003.safetensors", tensors, meta)
    data = (tmp_path / "steps/000003.safetensors").read_bytes()
    ours, theirs = _split(data), _split(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    assert ours == theirs  # the same header (as JSON) and the same bytes after it
    assert (8 + len(data) - len(ours[1])) % 8 == 0 and data[8:].lstrip()[:1] == b"{"
    assert record.path == "steps/000003.safetensors" and record.nbytes == len(data)
    assert record.checksum == _xxh3(data)
    back = st_load(data)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    got, got_meta = read_tensors(tmp_path, record, step=3)  # the store's verified reader
    assert got_meta == meta and all(torch.equal(got[k], v) for k, v in tensors.items())


def test_without_metadata_the_header_has_none(tmp_path):
    record = TensorFileWriter().write(tmp_path, "a.safetensors", {"x": torch.arange(3.0)})
    header, _ = _split((tmp_path / record.path).read_bytes())
    assert header == {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}


def test_a_dtype_it_does_not_lay_out_goes_through_the_library(tmp_path):
    tensors = {"x": torch.arange(3.0), "u": torch.tensor([1, 2, 60000], dtype=torch.uint16)}
    assert torch.uint16 not in _filewrite.DTYPES
    record = TensorFileWriter().write(tmp_path, "u.safetensors", tensors, {"k": "v"})
    data = (tmp_path / record.path).read_bytes()
    assert data == st_save(tensors, metadata={"k": "v"}) and record.checksum == _xxh3(data)
    assert torch.equal(st_load(data)["u"], tensors["u"])


def test_the_reused_buffer_leaves_nothing_of_a_larger_file_in_a_smaller_one(tmp_path):
    writer = TensorFileWriter()
    big, small = _tensors(1, n=20000), {"x": torch.arange(5.0)}
    writer.write(tmp_path, "big.safetensors", big)
    record = writer.write(tmp_path, "small.safetensors", small, {"s": "1"})
    data = (tmp_path / "small.safetensors").read_bytes()
    assert data == st_save(small, metadata={"s": "1"}) and record.nbytes == len(data)
    again = writer.write(tmp_path, "big2.safetensors", big)  # and grows again
    assert again.checksum == _xxh3((tmp_path / "big.safetensors").read_bytes())


@pytest.mark.parametrize("direct", [True, False])
def test_a_file_larger_than_the_buffer_is_written_chunk_by_chunk(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(_filewrite, "CHUNK", 2 * _filewrite.BLOCK)  # the header, tensors and blocks straddle chunks
    tensors, meta = _tensors(3, n=1500), {"m": "x" * 5000}  # a header longer than one block
    writer = TensorFileWriter(direct=direct)
    record = writer.write(tmp_path, "big.safetensors", tensors, meta)
    data = (tmp_path / "big.safetensors").read_bytes()
    assert len(data) > 4 * _filewrite.CHUNK
    # O_DIRECT lays the file out in a buffer of one chunk; the page cache is written from the tensors themselves
    assert len(writer._buffer) == _filewrite.CHUNK if direct else writer._buffer is None
    assert _split(data) == _split(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    assert record.checksum == _xxh3(data) and record.nbytes == len(data)
    tensors["u16"] = torch.arange(3000, dtype=torch.int32).to(torch.uint16)  # the library's bytes, in chunks too
    record = writer.write(tmp_path, "lib.safetensors", tensors, {"m": "y"})
    data = (tmp_path / "lib.safetensors").read_bytes()
    assert data == st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"m": "y"})
    assert record.checksum == _xxh3(data) and len(data) > 2 * _filewrite.CHUNK


def test_a_file_is_replaced_atomically_and_leaves_no_temporary_file(tmp_path):
    writer = TensorFileWriter()
    writer.write(tmp_path, "state.safetensors", {"x": torch.zeros(3)})
    record = writer.write(tmp_path, "state.safetensors", {"x": torch.ones(2000)})
    assert record.nbytes == (tmp_path / "state.safetensors").stat().st_size
    assert torch.equal(read_tensors(tmp_path, record)[0]["x"], torch.ones(2000))
    assert not [p for p in tmp_path.iterdir() if TEMP_FILE.fullmatch(p.name)]


def _refusing(monkeypatch, where: str):
    """``O_DIRECT`` fails with EINVAL at ``where`` ("open" or "write"); returns the calls seen."""
    real_open, real_write, seen = os.open, os.write, {"direct": 0, "buffered": 0}
    direct_fds: set[int] = set()

    def fake_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            seen["direct"] += 1
            if where == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(path, flags, *args, **kwargs)
            direct_fds.add(fd)
            return fd
        if flags & os.O_WRONLY:
            seen["buffered"] += 1
        return real_open(path, flags, *args, **kwargs)

    def fake_write(fd, data):
        if fd in direct_fds and where == "write":
            direct_fds.discard(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(_filewrite.os, "open", fake_open)
    monkeypatch.setattr(_filewrite.os, "write", fake_write)
    return seen


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
@pytest.mark.parametrize("where", ["open", "write"])
def test_a_file_system_refusing_o_direct_gets_the_page_cache_from_then_on(tmp_path, monkeypatch, where):
    seen = _refusing(monkeypatch, where)
    writer, tensors = TensorFileWriter(), _tensors(2)
    for name in ("a.safetensors", "b.safetensors"):
        record = writer.write(tmp_path, name, tensors, {"n": name})
        assert (tmp_path / name).read_bytes() == st_save({k: v.contiguous() for k, v in tensors.items()},
                                                         metadata={"n": name})
        assert record.checksum == _xxh3((tmp_path / name).read_bytes())
    assert seen == {"direct": 1, "buffered": 2}  # tried once, then remembered for the directory
    assert not [p for p in tmp_path.iterdir() if TEMP_FILE.fullmatch(p.name)]


def test_other_write_errors_are_raised_and_leave_no_temporary_file(tmp_path, monkeypatch):
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_filewrite.os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        TensorFileWriter().write(tmp_path, "x.safetensors", {"x": torch.zeros(3)})
    monkeypatch.setattr(_filewrite.os, "write", real_write)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fsync", [True, False])
def test_fsync_flushes_the_file_and_its_directory_only_when_asked(tmp_path, monkeypatch, fsync):
    calls = []
    real = os.fsync
    monkeypatch.setattr(_filewrite.os, "fsync", lambda fd: (calls.append("file"), real(fd))[1])
    monkeypatch.setattr(_filewrite, "fsync_directory", lambda d: calls.append("dir"))
    TensorFileWriter().write(tmp_path, "x.safetensors", {"x": torch.zeros(3)}, fsync=fsync)
    assert calls == (["file", "dir"] if fsync else [])
    calls.clear()
    TensorFileWriter().write(tmp_path, "y.safetensors", {"x": torch.zeros(3)}, fsync=fsync, fsync_dir=False)
    assert calls == (["file"] if fsync else [])
