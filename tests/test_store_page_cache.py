"""A store recorded without ``fsync`` is written through the page cache, from the tensors themselves, and holds
the same bytes as a durable one (``O_DIRECT`` from the writer's buffer): explaind/trajectory/_filewrite.py."""

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
from explaind.trajectory import _filewrite


def _record(root, fsync: bool, opt_name: str, monkeypatch) -> list[int]:
    """Record 5 seeded steps into ``root``; returns the flags of every file the writer opened."""
    flags: list[int] = []
    real_open = os.open

    def opening(path, how, *args, **kwargs):
        flags.append(how)
        return real_open(path, how, *args, **kwargs)

    monkeypatch.setattr(_filewrite.os, "open", opening)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 3))
    opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if opt_name == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    X, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=root,
                                     fsync=fsync) as rec:
        for s in range(5):
            idx = torch.arange(8 * s, 8 * s + 8) % 32
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    monkeypatch.setattr(_filewrite.os, "open", real_open)
    return flags


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_a_store_without_fsync_holds_the_bytes_of_a_durable_one(tmp_path, monkeypatch, opt_name):
    durable, cached = tmp_path / "durable", tmp_path / "cached"
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
def test_only_a_durable_store_opens_its_files_with_o_direct(tmp_path, monkeypatch):
    durable = _record(tmp_path / "durable", True, "sgd", monkeypatch)
    cached = _record(tmp_path / "cached", False, "sgd", monkeypatch)
    assert any(f & os.O_DIRECT for f in durable)  # tried at least (a file system may refuse it)
    assert cached and not any(f & os.O_DIRECT for f in cached)
