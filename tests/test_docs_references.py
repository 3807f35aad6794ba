"""Comments and docstrings cite pages of docs/ that exist, never a document outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SOURCES = ("explaind", "plugins", "tests", "benchmarks", "examples", "docs")

#: Folders whose citations are being rewritten by another change (remove an entry to check it).
PENDING: tuple[str, ...] = ()

_NUMBERED = re.compile(r"docs/([\w-]+)\.md §(\d+)(?:[–-](\d+))?")
_TITLED = re.compile(r'docs/([\w-]+)\.md, "([^"]+)"')
_PAGE = re.compile(r"docs/([\w-]+)\.md")
_OUTSIDE = re.compile(r"\bDESIGN\b")


def _files() -> list[Path]:
    found = [REPO / "README.md"]
    for folder in SOURCES:
        found += [p for p in sorted((REPO / folder).rglob("*")) if p.suffix in (".py", ".md")]
    return found


def _headings(page: str) -> list[str]:
    text = (DOCS / f"{page}.md").read_text(encoding="utf-8")
    return [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]


def test_citations_name_existing_pages_and_sections():
    problems = []
    for path in _files():
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(REPO)
        for page in _PAGE.findall(text):
            if not (DOCS / f"{page}.md").is_file():
                problems.append(f"{where}: docs/{page}.md does not exist")
        for page, first, last in _NUMBERED.findall(text):
            if not (DOCS / f"{page}.md").is_file():
                continue
            numbers = {h.split(".")[0] for h in _headings(page)}
            for number in range(int(first), int(last or first) + 1):
                if str(number) not in numbers:
                    problems.append(f"{where}: docs/{page}.md has no section {number}")
        for page, title in _TITLED.findall(text):
            if (DOCS / f"{page}.md").is_file() and title not in _headings(page):
                problems.append(f"{where}: docs/{page}.md has no section {title!r}")
    assert not problems, "\n".join(problems)


def test_no_citation_of_a_document_outside_the_repository():
    cited = []
    for path in _files():
        where = path.relative_to(REPO).as_posix()
        if where.startswith(PENDING):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _OUTSIDE.search(line) and path.name != Path(__file__).name:
                cited.append(f"{where}:{number}: {line.strip()}")
    assert not cited, "cite docs/<page>.md instead:\n" + "\n".join(cited)
