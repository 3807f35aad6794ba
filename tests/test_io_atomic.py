"""explaind._io.atomic_write: the one function that replaces files on disk, and its callers."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from torch import nn

from explaind import _io
from explaind._io import atomic_write


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def test_writes_bytes_and_text_and_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"
    assert atomic_write(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    atomic_write(str(target), "héllo")  # str paths too; text as UTF-8
    assert target.read_bytes() == "héllo".encode()
    assert _leftovers(target.parent) == []


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    atomic_write(target, "old")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fsync, fsync_dir, calls", [(True, None, 2), (True, False, 1), (False, None, 0),
                                                     (False, True, 1)])
def test_fsync_of_file_and_directory(tmp_path, monkeypatch, fsync, fsync_dir, calls):
    seen = []
    monkeypatch.setattr(_io.os, "fsync", seen.append)
    atomic_write(tmp_path / "f", b"x", fsync=fsync, fsync_dir=fsync_dir)
    assert len(seen) == calls


def test_concurrent_writers_never_mix(tmp_path):
    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write, args=(target, p), kwargs={"fsync": False}) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_bytes() in payloads
    assert _leftovers(tmp_path) == []


def test_callers_write_through_it(tmp_path, monkeypatch):
    from explaind.pruning import load_pruned, save_pruned
    from explaind.viz.report import ReportSection, write_report

    written = []
    real = atomic_write

    def spy(path, data, **kwargs):
        written.append(os.fspath(path))
        return real(path, data, **kwargs)

    monkeypatch.setattr("explaind.pruning.apply.atomic_write", spy)
    monkeypatch.setattr("explaind.viz.report.atomic_write", spy)
    model = nn.Linear(3, 2)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    path = save_pruned(model, tmp_path / "pruned.safetensors", masks, {"sparsity": 0.0})
    load_pruned(path, nn.Linear(3, 2))
    page = write_report(tmp_path / "report", [ReportSection("S", "text")], title="T")
    assert written == [os.fspath(path), os.fspath(page)]
    assert _leftovers(tmp_path) == []
