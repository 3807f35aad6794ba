r"""Checksums of the store's files (docs/recording.md, "The store" and "Recording overhead").

Every file a store writes is recorded in the manifest with its size and a checksum of its bytes,
and every read recomputes both before a byte is parsed. A checksum is written as
``"<algorithm>:<hex digest>"``:

* ``"xxh3-128"`` (the default since manifest schema 2): XXH3 with a 128-bit result, from the
  ``xxhash`` package. It runs at tens of GB/s on one core (about 20x SHA-256 here, measured by
  ``benchmarks/bench_store_writer.py``), so a dense store of a large model is not paced by hashing.
* ``"sha256"``: SHA-256 (``hashlib``). Stores of schema 1 carry it in the record's ``sha256``
  field; a writer can still be asked for it (``StoreWriter(checksum="sha256")``).

What the checksum is for: a file that changed after it was written — a torn or lost write after a
crash or a power loss, a bit flipped on the device or in transit, a file truncated, swapped with
another or edited by hand. XXH3-128 detects any such accident with probability :math:`1 - 2^{-128}`
for a random change and is designed so that structured changes (a flipped bit, a zeroed block) do
not collide. It is not a cryptographic hash: someone who *wants* a modified store to pass can
compute a matching XXH3 (they could equally rewrite a SHA-256 in the manifest, which no key
protects). A store is data from whoever wrote it, and reading one never runs code from it
(docs/recording.md, "The store"), so the checksum guards
against accidents, not adversaries, as SHA-256 did here.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import xxhash

from ..exceptions import ConfigError

__all__ = ["ALGORITHMS", "DEFAULT", "Hasher", "hasher", "checksum", "parse", "validate_algorithm"]

#: Checksum algorithms the store writes and reads, by the name written before the colon.
ALGORITHMS: dict[str, Any] = {"xxh3-128": xxhash.xxh3_128, "sha256": hashlib.sha256}
#: The algorithm new files are checksummed with.
DEFAULT = "xxh3-128"
_HEX_LENGTH = {"xxh3-128": 32, "sha256": 64}


class Hasher(Protocol):
    """What :func:`hasher` returns: ``update(bytes-like)`` and ``hexdigest()`` (as ``hashlib``'s objects)."""

    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


def validate_algorithm(algorithm: str) -> str:
    """``algorithm`` if it is one of :data:`ALGORITHMS`, else a :class:`~explaind.exceptions.ConfigError`."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"checksum={algorithm!r} is not allowed. Choose one of {sorted(ALGORITHMS)} "
                          f"(default {DEFAULT!r}).")
    return algorithm


def hasher(algorithm: str = DEFAULT) -> Hasher:
    """A new incremental hasher of ``algorithm`` (``update`` it with the file's bytes in order)."""
    return ALGORITHMS[validate_algorithm(algorithm)]()


def checksum(data: Any, algorithm: str = DEFAULT) -> str:
    """``"<algorithm>:<hex digest>"`` of the bytes-like ``data``."""
    h = hasher(algorithm)
    h.update(data)
    return f"{algorithm}:{h.hexdigest()}"


def parse(text: str) -> tuple[str, str]:
    """Split a checksum into ``(algorithm, hex digest)``.

    Raises
    ------
    ValueError
        When the algorithm is unknown or the digest is not lowercase hex of the algorithm's length
        (pydantic turns it into a validation error of the manifest).
    """
    algorithm, sep, digest = text.partition(":")
    if not sep or algorithm not in ALGORITHMS:
        raise ValueError(f"checksum {text[:40]!r} does not start with one of {sorted(ALGORITHMS)} and a colon")
    if len(digest) != _HEX_LENGTH[algorithm] or digest.strip("0123456789abcdef"):
        raise ValueError(f"checksum {text[:80]!r} does not end with {_HEX_LENGTH[algorithm]} lowercase hex digits")
    return algorithm, digest
