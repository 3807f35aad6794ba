"""An independent PNG checker for the report tests (chunk CRCs, IHDR, decompressed size)."""

from __future__ import annotations

import base64
import re
import struct
import zlib
from pathlib import Path

_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def check_png(data: bytes, min_bytes: int = 2000, min_side: int = 100) -> tuple[int, int]:
    """Assert ``data`` is a well-formed PNG of non-trivial size; return ``(width, height)``."""
    assert len(data) >= min_bytes, f"PNG of only {len(data)} bytes"
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "bad PNG signature"
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        assert pos + 12 <= len(data), "truncated chunk"
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        assert pos + 12 + length <= len(data), f"truncated chunk {kind!r}"
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"bad CRC in chunk {kind!r}"
        chunks.append(kind)
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND", f"chunk order {chunks[:2]}...{chunks[-1:]}"
    assert width >= min_side and height >= min_side, f"image only {width}x{height}"
    raw = zlib.decompress(idat)
    row = 1 + (width * _CHANNELS[colour] * depth + 7) // 8
    assert len(raw) == height * row, "decompressed image data has the wrong size"
    return width, height


def embedded_images(html: str) -> dict[str, bytes]:
    """``data-file`` name -> decoded bytes of every base64 image in a report page."""
    found = re.findall(r'<img alt="[^"]*" data-file="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return {name: base64.b64decode(payload) for name, payload in found}


def check_report_folder(folder: Path, expected: set[str] | None = None) -> dict[str, bytes]:
    """Check the page and every PNG of a report folder; the page must embed each PNG byte for byte."""
    page = (folder / "index.html").read_text(encoding="utf-8")
    images = embedded_images(page)
    files = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    assert files, "no PNG written"
    assert set(images) == set(files), f"embedded {sorted(images)} but folder has {sorted(files)}"
    for name, data in files.items():
        check_png(data)
        assert images[name] == data, f"{name} embedded differs from the file"
    if expected is not None:
        assert expected <= set(files), f"missing figures: {sorted(expected - set(files))}"
    return files
