"""What the ``explaind`` command reads and writes: ``KEY=VALUE`` options in, results out.

Shared by the parser (:mod:`explaind.cli`) and the subcommand handlers
(:mod:`explaind.cli_commands`), so neither has to import the other for them. Importing it is
cheap: it needs nothing beyond the standard library.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["Output", "parse_assignments"]


class Output:
    """Where the command's results go: human text, JSON or nothing.

    Parameters
    ----------
    quiet : bool
        Suppress progress bars and informational lines (results are still printed).
    as_json : bool
        Print one JSON document with the results instead of text.
    silent : bool
        Print nothing at all (the processes other than rank 0 under ``--nproc``).
    """

    def __init__(self, quiet: bool = False, as_json: bool = False, silent: bool = False):
        self.quiet = quiet or silent
        self.as_json = as_json
        self.silent = silent

    @property
    def progress(self) -> bool:
        """Whether long loops should show progress bars."""
        return not (self.quiet or self.as_json)

    def info(self, message: str) -> None:
        """A line of chatter (stderr; hidden by ``-q`` and ``--json``)."""
        if not (self.quiet or self.as_json):
            _line(sys.stderr, message)

    def result(self, text: str, data: Any) -> None:
        """The command's result: ``text`` for humans, ``data`` as JSON with ``--json`` (stdout)."""
        if self.silent:
            return
        _line(sys.stdout, json.dumps(data, indent=2, default=_json_default) if self.as_json else text)


def _line(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def parse_assignments(items: Sequence[str] | None, option: str) -> dict[str, Any]:
    """Parse ``key=value`` pairs; values are read as JSON when possible (``3``, ``0.5``, ``[8,16]``, ``true``).

    Parameters
    ----------
    items : sequence of str or None
        The option's values as given, e.g. ``["p=23", "classes=[3,8]"]`` (``None``: none given).
    option : str
        The option's name for error messages, e.g. ``"--data"``.

    Returns
    -------
    dict
        ``key -> value``; JSON lists become tuples, text that is not JSON stays a string.

    Raises
    ------
    ValueError
        For an item without ``=`` (the message names the option and shows the expected form).
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} {item!r} is not of the form KEY=VALUE (e.g. {option} p=23).")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, list):
            value = tuple(value)
        out[key.strip()] = value
    return out
