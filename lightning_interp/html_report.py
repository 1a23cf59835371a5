"""A self-contained HTML report: one page, PNG figures beside it, tables inline.

Plain data in, files out — no Trainer needed: :class:`~lightning_interp.callbacks.InterpReport`
fills it at fit end and ``lightning-interp scan`` after a one-off scan.

    directory/index.html
    directory/figures/<section>-<key>.png

The page works from the file system (no server, no scripts from the network). A small inline
script counts the figures the browser decoded into ``<body data-figures-loaded="N">`` so a
headless browser can check that the page really renders its pictures.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Figure", "Table", "Section", "write_html_report"]


@dataclass
class Figure:
    """A picture: ``image`` is ``H x W x 3`` uint8."""

    key: str
    image: np.ndarray
    caption: str = ""


@dataclass
class Table:
    """A table; more than ``collapse_after`` rows are folded into a ``<details>`` element (click to open)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    collapse_after: int | None = 15


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
.meta { color: #555; font-size: .9em; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #ddd; image-rendering: pixelated; }
figcaption { font-size: .85em; color: #444; max-width: 640px; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .2em .6em; text-align: right; }
th { background: #f3f3f3; }
details > summary { cursor: pointer; font-weight: 600; margin: .8em 0 .3em; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll("figure img"));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-figures-loaded", String(ok));
  document.body.setAttribute("data-figures-total", String(imgs.length));
  // Layout checks a headless browser can read from the DOM: figures that overlap each other, and
  // the shape each figure is drawn with (data-rendered="W x H" on the <img>).
  var boxes = Array.prototype.slice.call(document.querySelectorAll("figure")).map(function (f) {
    return f.getBoundingClientRect();
  });
  var overlaps = 0;
  for (var a = 0; a < boxes.length; a++) {
    for (var b = a + 1; b < boxes.length; b++) {
      var p = boxes[a], q = boxes[b];
      if (p.left < q.right - 1 && q.left < p.right - 1 && p.top < q.bottom - 1 && q.top < p.bottom - 1) overlaps++;
    }
  }
  document.body.setAttribute("data-figures-overlapping", String(overlaps));
  imgs.forEach(function (i) {
    var r = i.getBoundingClientRect();
    i.setAttribute("data-rendered", Math.round(r.width) + "x" + Math.round(r.height));
  });
});
"""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "figure"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def write_html_report(
    directory: str,
    sections: Sequence[Section],
    *,
    title: str = "lightning_interp report",
    meta: dict[str, Any] | None = None,
) -> str:
    """Write ``directory/index.html`` and its PNG figures; return the page's path.

    Args:
        directory: created if missing; an existing report there is overwritten.
        sections: rendered in order; empty sections are left out.
        meta: key/value lines shown under the title (run directory, epochs, ...).
    """
    import matplotlib.image

    fig_dir = os.path.join(directory, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if meta:
        items = " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in meta.items())
        parts.append(f'<p class="meta">{items}</p>')
    used: set[str] = set()
    for section in sections:
        if not (section.paragraphs or section.figures or section.tables):
            continue
        parts.append(f'<section><h2 id="{_slug(section.title)}">{html.escape(section.title)}</h2>')
        parts.extend(f"<p>{html.escape(p)}</p>" for p in section.paragraphs)
        if section.figures:
            parts.append('<div class="figures">')
            for fig in section.figures:
                image = np.asarray(fig.image)
                if image.ndim != 3 or image.shape[-1] != 3:
                    raise ValueError(f"Expected figure {fig.key!r} as an H x W x 3 image but got shape {image.shape}.")
                name = _slug(f"{section.title}-{fig.key}")
                while name in used:
                    name += "_"
                used.add(name)
                matplotlib.image.imsave(os.path.join(fig_dir, f"{name}.png"), image)
                parts.append(
                    f'<figure><img src="figures/{name}.png" alt="{html.escape(fig.key)}" '
                    f'width="{image.shape[1]}" height="{image.shape[0]}">'
                    f"<figcaption><b>{html.escape(fig.key)}</b> {html.escape(fig.caption)}</figcaption></figure>"
                )
            parts.append("</div>")
        for table in section.tables:
            folded = table.collapse_after is not None and len(table.rows) > table.collapse_after
            if folded:
                parts.append(f"<details><summary>{html.escape(table.title)} ({len(table.rows)} rows)</summary><table><thead><tr>")
            else:
                parts.append(f"<h3>{html.escape(table.title)}</h3><table><thead><tr>")
            parts.extend(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
            parts.append("</tr></thead><tbody>")
            for row in table.rows:
                parts.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
            parts.append("</tbody></table>" + ("</details>" if folded else ""))
        parts.append("</section>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    path = os.path.join(directory, "index.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts))
    return path
