"""docs/hooks.md documents every hook of explaind/hookspecs.py under its exact signature."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from explaind import hookspecs

HOOKS_MD = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"
HEADING = re.compile(r"^## (?P<name>\w+)\((?P<params>[^)]*)\)(?P<rest>.*)$")


def _specs() -> dict[str, list[str]]:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {
        name: list(inspect.signature(obj).parameters)
        for name, obj in vars(hookspecs).items()
        if inspect.isfunction(obj) and hasattr(obj, marker)
    }


def _documented(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = HEADING.match(line)
        if match:
            params = [p.split(":")[0].strip() for p in match["params"].split(",") if p.strip()]
            assert match["name"] not in sections, f"hooks.md documents {match['name']} twice"
            assert match["rest"].startswith(" -> "), f"hooks.md heading {line!r} lacks the return type"
            sections[match["name"]] = params
    return sections


def _missing(specs: dict[str, list[str]], documented: dict[str, list[str]]) -> list[str]:
    problems = []
    for name, params in specs.items():
        if name not in documented:
            problems.append(f"{name}({', '.join(params)}) has no section in docs/hooks.md")
        elif documented[name] != params:
            problems.append(f"{name}: docs/hooks.md lists parameters {documented[name]}, the spec has {params}")
    for name in documented.keys() - specs.keys():
        problems.append(f"docs/hooks.md documents {name}, which is not a hook in explaind/hookspecs.py")
    return problems


def test_every_hookspec_is_documented_with_its_exact_signature():
    specs = _specs()
    assert "explaind_losses" in specs and specs["explaind_resolve_optimizer_adapter"] == ["optimizer"]
    assert _missing(specs, _documented(HOOKS_MD.read_text())) == []


def test_the_doc_check_detects_missing_renamed_and_stale_sections():
    specs = {"explaind_a": [], "explaind_b": ["optimizer"], "explaind_c": []}
    text = "## explaind_a() -> list[X]\n## explaind_b(opt) -> X | None\n## explaind_gone() -> list[X]\n"
    assert _missing(specs, _documented(text)) == [
        "explaind_b: docs/hooks.md lists parameters ['opt'], the spec has ['optimizer']",
        "explaind_c() has no section in docs/hooks.md",
        "docs/hooks.md documents explaind_gone, which is not a hook in explaind/hookspecs.py",
    ]
