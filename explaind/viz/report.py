"""A self-contained HTML report: every figure is embedded as a base64 PNG.

The page opens from disk or as an e-mail attachment without its folder; the PNGs are also kept
next to it for papers and slides.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_write
from ..exceptions import ExplaindError

__all__ = ["ReportSection", "write_report", "PNG_SIGNATURE"]

#: The eight bytes every PNG file starts with.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; font-size: 0.9em; }
figure { margin: 0.8em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85em; }
.howto { color: #333; font-size: 0.85em; background: #f7f7f9; border-left: 3px solid #c8c8d0; margin: 0.3em 0;
         padding: 0.3em 0.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f5f5f7; }
td:first-child, th:first-child { text-align: left; }
nav a { margin-right: 1em; }
"""


@dataclass
class ReportSection:
    """One section of the report.

    Attributes
    ----------
    title : str
        Heading.
    text : str
        Paragraph(s) of plain text (blank lines separate paragraphs; HTML is escaped).
    images : sequence of Path
        PNG files shown in order (embedded as base64).
    captions : sequence of str
        One caption per image (optional).
    table : sequence of mapping, optional
        Rows of a table; the keys of the first row are the columns. Rendered as an HTML
        ``<table>`` before the images.
    notes : sequence of str
        One "how to read this" note per image (optional), shown under its caption.
    """

    title: str
    text: str = ""
    images: Sequence[Path] = field(default_factory=list)
    captions: Sequence[str] = field(default_factory=list)
    table: Sequence[Mapping[str, Any]] | None = None
    notes: Sequence[str] = field(default_factory=list)


def _anchor(title: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in title.lower()).strip("-")


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{html.escape(part.strip())}</p>\n" for part in text.split("\n\n") if part.strip())


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    return html.escape(str(value))


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c, ''))}</td>" for c in columns) + "</tr>\n"
                   for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody></table>\n"


def _embed(path: Path, caption: str, note: str = "") -> str:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExplaindError(f"Report figure {str(path)!r} cannot be read ({exc}); the plot was not written.") from None
    if not data.startswith(PNG_SIGNATURE):
        raise ExplaindError(f"Report figure {str(path)!r} is not a PNG file; only PNG figures can be embedded.")
    encoded = base64.b64encode(data).decode("ascii")
    alt = html.escape(caption or path.stem)
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    how = f'<p class="howto"><strong>How to read this.</strong> {html.escape(note)}</p>' if note else ""
    return (f'<figure><img alt="{alt}" data-file="{html.escape(path.name)}" '
            f'src="data:image/png;base64,{encoded}">{cap}{how}</figure>\n')


def write_report(
    out_dir: str | Path,
    sections: Sequence[ReportSection],
    *,
    title: str = "explaind report",
    meta: Mapping[str, Any] | None = None,
    filename: str = "index.html",
) -> Path:
    """Write the HTML page of a report.

    Parameters
    ----------
    out_dir : str or Path
        Folder of the report (created if needed); the figures usually live there too.
    sections : sequence of ReportSection
        Shown in order, with a navigation bar on top.
    title : str
        Page title.
    meta : mapping, optional
        Facts shown under the title (run settings, timings).
    filename : str
        Name of the page inside ``out_dir``.

    Returns
    -------
    Path
        The written page.

    Raises
    ------
    ExplaindError
        When a figure is missing or not a PNG (named in the message).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    facts = dict(meta or {})
    meta_html = " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in facts.items())
    nav = "".join(f'<a href="#{_anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n",
        f"<h1>{html.escape(title)}</h1>\n<div class=\"meta\">generated {stamp}",
        f" · {meta_html}" if meta_html else "",
        f"</div>\n<nav>{nav}</nav>\n",
    ]
    for section in sections:
        parts.append(f'<h2 id="{_anchor(section.title)}">{html.escape(section.title)}</h2>\n')
        parts.append(_paragraphs(section.text))
        if section.table:
            parts.append(_table(section.table))
        captions = list(section.captions) + [""] * (len(section.images) - len(section.captions))
        notes = list(section.notes) + [""] * (len(section.images) - len(section.notes))
        for image, caption, note in zip(section.images, captions, notes):
            parts.append(_embed(Path(image), caption, note))
    parts.append("</body>\n</html>\n")
    return atomic_write(out_dir / filename, "".join(parts))
