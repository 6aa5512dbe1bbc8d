"""The evaluation report: one self-contained HTML page.

:func:`render_html` is pure (a :class:`ReportData` in, an HTML string out): every
image is embedded as a base64 ``data:`` URI and the styles are inline, so the
page needs no server, no network and no other file. :func:`write_report` writes
it atomically. The evaluate stage builds the data (``tlpipe.evaluation.report.build_report``)
after the champion gate, so the page carries the promotion decision.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tlpipe.core.files import write_atomic
from tlpipe.render.formats import format_score

STYLE = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 0 auto; max-width: 1300px; padding: 0 24px 48px;
       color: #1f2328; background: #fff; }
header { border-bottom: 2px solid #d0d7de; padding: 12px 0 8px; }
h1 { margin: 8px 0 4px; font-size: 26px; }
h2 { margin-top: 32px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; font-size: 20px; }
nav a { margin-right: 14px; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 8px 0; }
dl.facts dt { font-weight: bold; color: #57606a; }
dl.facts dd { margin: 0; font-family: "DejaVu Sans Mono", monospace; font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; }
th { background: #f6f8fa; }
td.num { text-align: right; font-family: "DejaVu Sans Mono", monospace; }
tr.selected td { background: #fff8c5; font-weight: bold; }
.decision { border-radius: 6px; padding: 10px 16px; margin: 12px 0; border: 2px solid; }
.decision.promoted { border-color: #1a7f37; background: #dafbe1; }
.decision.kept { border-color: #9a6700; background: #fff8c5; }
.decision.none { border-color: #57606a; background: #f6f8fa; }
.decision .verdict { font-size: 18px; font-weight: bold; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-size: 13px; color: #57606a; margin-top: 4px; max-width: 640px; }
.note { color: #57606a; font-size: 13px; }
.wrong { color: #cf222e; font-weight: bold; }
"""


@dataclass(frozen=True)
class Picture:
    """A PNG to embed, with a title and caption."""

    title: str
    png: bytes
    caption: str = ""


@dataclass(frozen=True)
class Table:
    """A table: column keys with their headings, rows of values; ``highlight`` marks rows by their first value."""

    columns: Mapping[str, str]
    rows: Sequence[Mapping[str, object]]
    highlight: Sequence[object] = ()


@dataclass(frozen=True)
class DataSet:
    """The data set the models were trained and tested on: its name, where it came from, images per class and split."""

    name: str
    source: str
    counts: Table
    task: str | None = None


@dataclass(frozen=True)
class TableSection:
    """An extra section holding one table (e.g. a stage's candidate table), shown after the model comparison."""

    anchor: str
    title: str
    table: Table
    note: str = ""


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows. Sections with no content are left out (with a note where useful)."""

    title: str
    facts: Sequence[tuple[str, str]] = ()
    dataset: DataSet | None = None
    decision: Mapping[str, object] | None = None
    comparison: Table | None = None
    sections: Sequence[TableSection] = ()
    """Extra table sections, in order, after the comparison (their anchors join the navigation)."""
    comparison_chart: Picture | None = None
    confusions: Sequence[Picture] = ()
    curves: Picture | None = None
    grid: Picture | None = None
    imagenet: Table | None = None
    skipped: Mapping[str, str] = field(default_factory=dict)
    links: Sequence[tuple[str, str]] = ()
    notes: Mapping[str, str] = field(default_factory=dict)
    """Per-section notes shown under a heading (keys: section ids)."""


def escape(value: object) -> str:
    """HTML-escape any value (quotes too)."""
    return html.escape(str(value), quote=True)


def format_cell(value: object) -> tuple[str, bool]:
    """A table cell's text and whether it is numeric (right-aligned)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–", False
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, float):
        return format_score(value), True
    if isinstance(value, int):
        return str(value), True
    return str(value), False


def render_table(table: Table) -> str:
    """An HTML table."""
    head = "".join(f"<th>{escape(title)}</th>" for title in table.columns.values())
    body = []
    for row in table.rows:
        cells = []
        for key in table.columns:
            text, numeric = format_cell(row.get(key))
            cells.append(f'<td class="num">{escape(text)}</td>' if numeric else f"<td>{escape(text)}</td>")
        first = row.get(next(iter(table.columns))) if table.columns else None
        marked = ' class="selected"' if first in set(table.highlight) else ""
        body.append(f"<tr{marked}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("only PNG images can be embedded (the bytes do not start with the PNG signature)")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_image(image: Picture) -> str:
    """A figure with an embedded PNG."""
    caption = f"<figcaption><b>{escape(image.title)}</b>"
    caption += f" – {escape(image.caption)}</figcaption>" if image.caption else "</figcaption>"
    return f'<figure><img alt="{escape(image.title)}" src="{data_uri(image.png)}">{caption}</figure>'


def render_decision(decision: Mapping[str, object] | None) -> str:
    """The promotion decision box."""
    if not decision:
        return ('<div class="decision none"><div class="verdict">No gate decision</div>'
                "<p>The champion gate did not run for this report.</p></div>")
    promoted = bool(decision.get("promoted"))
    verdict = (f"Promoted: {decision.get('model')} is the new champion (v{decision.get('version')})" if promoted
               else f"Not promoted: {decision.get('model')} (v{decision.get('version')}); the champion is kept")
    rows = [("Registered model", decision.get("registered_model")), ("Candidate", decision.get("model")),
            ("Candidate version", decision.get("version")), ("Candidate test accuracy", decision.get("test_accuracy")),
            ("Champion before", decision.get("champion_version")),
            ("Champion accuracy on this test split", decision.get("champion_accuracy"))]
    facts = "".join(f"<dt>{escape(label)}</dt><dd>{escape(format_cell(value)[0])}</dd>" for label, value in rows)
    css = "promoted" if promoted else "kept"
    return (f'<div class="decision {css}"><div class="verdict">{escape(verdict)}</div>'
            f"<p>{escape(decision.get('reason', ''))}</p><dl class=\"facts\">{facts}</dl></div>")


def render_link(value: str) -> str:
    """An http(s) address as a link (navigation only: the page loads nothing), anything else as text."""
    if str(value).startswith(("http://", "https://")):
        return f'<a href="{escape(value)}">{escape(value)}</a>'
    return escape(value)


def section(anchor: str, title: str, body: str, note: str | None = None) -> str:
    """One titled section."""
    note_html = f'<p class="note">{escape(note)}</p>' if note else ""
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>{note_html}{body}</section>'


def render_dataset(dataset: DataSet) -> str:
    """The data set's name, source (and task, when named) and its images per class and split."""
    rows = [("Data set", dataset.name), ("Source", dataset.source)]
    rows += [("Task", dataset.task)] if dataset.task else []
    facts = "".join(f"<dt>{escape(label)}</dt><dd>{escape(value)}</dd>" for label, value in rows)
    return f'<dl class="facts">{facts}</dl>{render_table(dataset.counts)}'


def render_html(data: ReportData) -> str:
    """The whole report as one self-contained HTML page (pure: no I/O)."""
    notes = data.notes
    parts = [section("data", "Data set", render_dataset(data.dataset), notes.get("data"))] if data.dataset else []
    parts.append(section("decision", "Promotion decision", render_decision(data.decision), notes.get("decision")))
    if data.comparison is not None:
        body = render_table(data.comparison)
        if data.skipped:
            body += "<p class=\"note\">Not evaluated: " + "; ".join(
                f"{escape(name)} ({escape(reason)})" for name, reason in data.skipped.items()) + "</p>"
        if data.comparison_chart is not None:
            body += f'<div class="figures">{render_image(data.comparison_chart)}</div>'
        parts.append(section("comparison", "Models on the test split", body, notes.get("comparison")))
    parts += [section(extra.anchor, extra.title, render_table(extra.table), extra.note) for extra in data.sections]
    if data.confusions:
        body = '<div class="figures">' + "".join(render_image(image) for image in data.confusions) + "</div>"
        parts.append(section("confusion", "Confusion matrices", body, notes.get("confusion")))
    if data.curves is not None:
        parts.append(section("curves", "Training curves", f'<div class="figures">{render_image(data.curves)}</div>',
                             notes.get("curves")))
    if data.grid is not None:
        parts.append(section("predictions", "Predictions on test images",
                             f'<div class="figures">{render_image(data.grid)}</div>', notes.get("predictions")))
    if data.imagenet is not None:
        parts.append(section("imagenet", "What the ImageNet network sees (top-1 class per test image)",
                             render_table(data.imagenet), notes.get("imagenet")))
    if data.links:
        items = "".join(f"<dt>{escape(label)}</dt><dd>{render_link(value)}</dd>" for label, value in data.links)
        parts.append(section("tracking", "Where to look next", f'<dl class="facts">{items}</dl>',
                             notes.get("tracking")))
    ids = [("data", "Data set"), ("decision", "Decision"), ("comparison", "Comparison"),
           *((extra.anchor, extra.title) for extra in data.sections), ("confusion", "Confusion"),
           ("curves", "Curves"), ("predictions", "Predictions"), ("imagenet", "ImageNet"), ("tracking", "Links")]
    present = "".join(parts)
    nav = "".join(f'<a href="#{escape(anchor)}">{escape(label)}</a>' for anchor, label in ids
                  if f'id="{escape(anchor)}"' in present)
    facts = "".join(f"<dt>{escape(label)}</dt><dd>{escape(value)}</dd>" for label, value in data.facts)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(data.title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<header><h1>{escape(data.title)}</h1><dl class=\"facts\">{facts}</dl><nav>{nav}</nav></header>\n"
            f"{present}\n</body>\n</html>\n")


def write_report(path: Path, data: ReportData) -> Path:
    """Render the report and write it atomically; return its path."""
    path = Path(path)
    write_atomic(path, render_html(data))
    return path
