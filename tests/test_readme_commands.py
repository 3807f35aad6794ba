"""README.md's list of the ``explaind`` subcommands names every subcommand of the parser (it lacked ``validate``
and ``salvage``, which ``explaind --help`` lists)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from explaind.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _subcommands() -> list[str]:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(actions[0].choices)


def test_the_readme_names_every_subcommand_of_the_command_line():
    text = " ".join(ROOT.joinpath("README.md").read_text().split())
    listed = re.search(r"The `explaind` command line \(`explaind --help`\) has (.*?)\. Documentation", text)
    assert listed, "README.md no longer lists the subcommands after 'The `explaind` command line'"
    named = {name.split()[0] for name in re.findall(r"`([^`]+)`", listed.group(1))}
    assert set(_subcommands()) == named
