"""A store written through the page cache (``O_DIRECT`` refused), from the tensors themselves, holds the bytes of
one written with ``O_DIRECT`` from the writer's buffer: explaind/trajectory/_filewrite.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import explaind
from explaind.trajectory import _filewrite, store


def _record(root, direct: bool, opt_name: str, monkeypatch) -> list[int]:
    """Record 5 seeded steps into ``root`` (``direct=False``: as where O_DIRECT is refused); returns the flags of
    every file the writer opened."""
    flags: list[int] = []
    real_open, real_writer = os.open, store.TensorFileWriter

    def opening(path, how, *args, **kwargs):
        flags.append(how)
        return real_open(path, how, *args, **kwargs)

    monkeypatch.setattr(_filewrite.os, "open", opening)
    monkeypatch.setattr(store, "TensorFileWriter", lambda **kw: real_writer(direct=direct, **kw))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 3))
    opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if opt_name == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    X, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=root) as rec:
        for s in range(5):
            idx = torch.arange(8 * s, 8 * s + 8) % 32
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    monkeypatch.setattr(_filewrite.os, "open", real_open)
    monkeypatch.setattr(store, "TensorFileWriter", real_writer)
    return flags


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_a_store_written_through_the_page_cache_holds_the_bytes_of_an_o_direct_one(tmp_path, monkeypatch,
                                                                                   opt_name):
    durable, cached = tmp_path / "direct", tmp_path / "cached"
    monkeypatch.setattr(store, "new_run_id", lambda: "7" * 32)  # one identity for both: each store draws its own
    _record(durable, True, opt_name, monkeypatch)
    _record(cached, False, opt_name, monkeypatch)
    # which steps' optimizer states the two slots hold depends on how many steps the writer found queued at
    # once (it writes the newest of them), so those are compared through the final state only
    files, other = _files(durable), _files(cached)
    assert any(name.startswith("steps/") for name in files)
    assert {k: v for k, v in other.items() if not k.startswith("optimizer/")} == {
        k: v for k, v in files.items() if not k.startswith("optimizer/")}  # byte for byte
    journal, journal_cached = _journal(durable), _journal(cached)
    assert [{k: v for k, v in r.items() if k != "optimizer_state"} for r in journal] == [
        {k: v for k, v in r.items() if k != "optimizer_state"} for r in journal_cached]  # checksums too
    last, last_cached = journal[-1]["optimizer_state"], journal_cached[-1]["optimizer_state"]
    assert last["checksum"] == last_cached["checksum"]
    assert files[last["path"]] == other[last_cached["path"]]
    for name, data in files.items():  # both hold the safetensors library's header and bytes for their tensors
        header, body = _split(data)
        assert _split(st_save(st_load(data), metadata=header.get("__metadata__"))) == (header, body), name


def _journal(root) -> list[dict]:
    return [json.loads(line) for line in (root / "journal.jsonl").read_text().splitlines()]


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
def test_the_page_cache_path_opens_no_file_with_o_direct_and_copies_into_no_buffer(tmp_path, monkeypatch):
    direct = _record(tmp_path / "direct", True, "sgd", monkeypatch)
    copies: list[int] = []
    real_chunks = _filewrite.TensorFileWriter._chunks
    monkeypatch.setattr(_filewrite.TensorFileWriter, "_chunks",
                        lambda self, *a: (copies.append(1), real_chunks(self, *a))[1])
    cached = _record(tmp_path / "cached", False, "sgd", monkeypatch)
    assert any(f & os.O_DIRECT for f in direct)  # tried at least (a file system may refuse it)
    assert cached and not any(f & os.O_DIRECT for f in cached) and not copies


@pytest.mark.parametrize("direct", [True, False])
def test_a_lazily_negated_tensor_is_written_with_its_values(tmp_path, direct):
    # the page cache is written from the tensor's own memory: a negative-bit view must be resolved first
    x = torch.randn(5, 3, dtype=torch.float64)
    lazy = torch._neg_view(x)
    assert lazy.is_neg()
    record = _filewrite.TensorFileWriter(direct=direct).write(tmp_path, "neg.safetensors", {"n": lazy})
    stored = st_load((tmp_path / "neg.safetensors").read_bytes())["n"]
    assert torch.equal(stored, -x) and record.nbytes == (tmp_path / "neg.safetensors").stat().st_size
