"""Render a report page in headless Chromium and measure what a reader would see.

The page is copied with a small script appended; after the ``load`` event (all embedded images
decoded) the script writes, as JSON into a ``<pre id="render-check">``, the rendered box of
every image and table and where each table's cells landed. ``chromium --dump-dom`` returns the
DOM after rendering, so the measurements are those of a real layout, not of the HTML source.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

INSTALL_HINT = ("Headless Chromium is needed for the rendered-page tests and was not found on the PATH. Install it "
                "with 'apt-get update && apt-get install -y chromium' (Debian/Ubuntu; .ci/run does this before "
                "'make test').")

_MEASURE = """
<script>
window.addEventListener("load", () => {
  const box = (el) => { const r = el.getBoundingClientRect(); return {w: r.width, h: r.height, top: r.top}; };
  const section = (el) => { let e = el; while (e && e.tagName !== "H2") { e = e.previousElementSibling
      || (e.parentElement && e.parentElement.previousElementSibling); } return e ? e.textContent : null; };
  const shown = (el) => { const s = getComputedStyle(el); return s.display !== "none" && s.visibility !== "hidden"; };
  const out = {images: [], tables: [], notes: []};
  document.querySelectorAll("img").forEach((img) => out.images.push({file: img.dataset.file,
      decoded: img.complete && img.naturalWidth > 0, natural: [img.naturalWidth, img.naturalHeight],
      shown: shown(img), section: section(img.closest("figure") || img), ...box(img)}));
  document.querySelectorAll("table").forEach((t) => {
    const rows = Array.from(t.rows);
    const first = rows.length ? Array.from(rows[rows.length - 1].cells).map((c) => c.getBoundingClientRect()) : [];
    out.tables.push({section: section(t), display: getComputedStyle(t).display, shown: shown(t),
        n_rows: rows.length, n_cols: first.length,
        row_tops: new Set(rows.map((r) => Math.round(r.getBoundingClientRect().top))).size,
        cells_in_a_row: first.every((c) => Math.abs(c.top - first[0].top) < 1),
        left_to_right: first.every((c, i) => i === 0 || c.left >= first[i - 1].right - 1), ...box(t)});
  });
  document.querySelectorAll(".howto").forEach((n) => out.notes.push({shown: shown(n), ...box(n)}));
  const pre = document.createElement("pre");
  pre.id = "render-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def chromium() -> str:
    """Path of the Chromium binary; fails the test (never skips) with the install command when absent."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(INSTALL_HINT)


def _flags(profile: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", "--window-size=1200,900",
            "--virtual-time-budget=10000"]


def render(page: Path, work: Path) -> dict[str, Any]:
    """Lay ``page`` out in headless Chromium and return the measurements of its images and tables."""
    binary = chromium()
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "measured.html"
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
    done = subprocess.run([binary, *_flags(work / "profile"), "--dump-dom", copy.as_uri()], capture_output=True,
                          text=True, timeout=120, check=False)
    found = re.search(r'<pre id="render-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"Chromium rendered no measurements (exit {done.returncode}): {done.stderr[-2000:]}"
    text = found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return json.loads(text)


def screenshot(page: Path, work: Path) -> bytes:
    """A PNG screenshot of the top of ``page`` as headless Chromium draws it."""
    binary = chromium()
    target = work / "screenshot.png"
    done = subprocess.run([binary, *_flags(work / "profile-shot"), f"--screenshot={target}", page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert target.is_file(), f"Chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    return target.read_bytes()


def check_rendered(measured: dict[str, Any], *, figures: set[str], tables: dict[str, int]) -> None:
    """Every figure decoded and visible with a visible note; each named section's table laid out as a grid.

    Parameters
    ----------
    measured : dict
        What :func:`render` returned.
    figures : set of str
        File names of the figures the page must show.
    tables : dict
        Section title -> least number of columns its table must have.
    """
    shown = {img["file"]: img for img in measured["images"]}
    assert figures <= set(shown), f"figures missing from the page: {sorted(figures - set(shown))}"
    for name, img in shown.items():
        assert img["decoded"], f"{name} did not decode in the browser"
        assert img["shown"] and img["w"] >= 300 and img["h"] >= 100, f"{name} is not visible: {img}"
    assert len(measured["notes"]) >= len(shown), "a figure lacks its 'how to read this' note"
    for note in measured["notes"]:
        assert note["shown"] and note["h"] > 0, f"a 'how to read this' note is hidden: {note}"
    by_section = {t["section"]: t for t in measured["tables"]}
    for title, columns in tables.items():
        assert title in by_section, f"no table under '{title}' (tables under {sorted(map(str, by_section))})"
        table = by_section[title]
        assert table["display"] == "table" and table["shown"], f"'{title}' table is not displayed as a table: {table}"
        assert table["n_cols"] >= columns, f"'{title}' table has {table['n_cols']} columns, expected >= {columns}"
        assert table["row_tops"] == table["n_rows"] >= 2, f"'{title}' table rows collapse onto each other: {table}"
        assert table["cells_in_a_row"] and table["left_to_right"], f"'{title}' table cells are not in a row: {table}"
