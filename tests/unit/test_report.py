"""The HTML report: self-contained (embedded images, inline styles, no network), escaped, sections as given."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlpipe.render import plots
from tlpipe.render.formats import format_score, round_score
from tlpipe.render.html import (
    DataSet,
    Picture,
    ReportData,
    Table,
    TableSection,
    data_uri,
    render_html,
    write_report,
)


class Collector(HTMLParser):
    """Every tag, and the attributes that could load something."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.sources: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        if tag == "img":
            self.sources.append(values.get("src") or "")
        if "href" in values:
            self.links.append(values["href"] or "")


def parse(page: str) -> Collector:
    collector = Collector()
    collector.feed(page)
    return collector


@pytest.fixture(scope="module")
def pngs() -> dict[str, bytes]:
    """Real figures from tlpipe.render.plots (returned as bytes, not written)."""
    return {"confusion": plots.plot_confusion(np.array([[3, 1], [0, 4]]), ["ants", "bees"], "svm: 0.875"),
            "chart": plots.plot_comparison(["svm", "net"], [0.875, 0.75], baseline=0.5),
            "grid": plots.plot_image_grid(np.zeros((2, 8, 8, 3), np.uint8), ["ants (true: bees)", "bees (true: bees)"],
                                          [True, False])}


def full_report(pngs: dict[str, bytes]) -> ReportData:
    return ReportData(
        title="tlpipe report",
        facts=[("Classes", "ants, bees"), ("Data hash", "abc123")],
        decision={"promoted": False, "model": "svm", "version": "3", "test_accuracy": 0.875,
                  "champion_version": "2", "champion_accuracy": 0.9, "registered_model": "tlpipe-classifier",
                  "reason": "svm not promoted: test accuracy 0.8750 does not beat champion v2 (0.9000)"},
        comparison=Table({"model": "model", "accuracy": "test accuracy", "roc_auc": "ROC AUC"},
                         [{"model": "svm", "accuracy": 0.875, "roc_auc": None},
                          {"model": "<script>alert(1)</script>", "accuracy": 0.75, "roc_auc": 0.8}],
                         highlight=["svm"]),
        comparison_chart=Picture("Test accuracy", pngs["chart"]),
        confusions=[Picture("svm", pngs["confusion"], "test accuracy 0.875")],
        grid=Picture("Test images", pngs["grid"]),
        imagenet=Table({"relpath": "image", "imagenet_top1": "ImageNet top-1"},
                       [{"relpath": "ants/1.jpg", "imagenet_top1": "ant, emmet & pismire"}]),
        skipped={"concat": "no model file models/finetune/concat.keras"},
        links=[("evaluate stage run", "http://127.0.0.1:5000/#/experiments/1/runs/abc")])


def test_report_is_self_contained(pngs: dict[str, bytes]) -> None:
    page = render_html(full_report(pngs))
    parsed = parse(page)
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert not {"script", "link", "iframe", "object"} & set(parsed.tags)
    assert len(parsed.sources) == 3 and all(src.startswith("data:image/png;base64,") for src in parsed.sources)
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in parsed.sources}
    assert embedded == set(pngs.values())
    # links only navigate: in-page anchors and the MLflow run (nothing is loaded by the page)
    assert [link for link in parsed.links if not link.startswith("#")] == ["http://127.0.0.1:5000/#/experiments/1/runs/abc"]
    assert not re.search(r"url\(|@import", page)  # nothing fetched by the styles either


def test_report_shows_the_decision_tables_and_escapes_text(pngs: dict[str, bytes]) -> None:
    page = render_html(full_report(pngs))
    assert 'class="decision kept"' in page and "Not promoted: svm (v3); the champion is kept" in page
    assert "does not beat champion v2 (0.9000)" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert '<tr class="selected"><td>svm</td><td class="num">0.8750</td><td>–</td></tr>' in page
    assert "ant, emmet &amp; pismire" in page
    assert "concat (no model file models/finetune/concat.keras)" in page
    assert page.index('id="decision"') < page.index('id="comparison"') < page.index('id="imagenet"')

    promoted = render_html(ReportData("r", decision={"promoted": True, "model": "net", "version": "4",
                                                     "reason": "net promoted: no champion yet"}))
    assert 'class="decision promoted"' in promoted and "Promoted: net is the new champion (v4)" in promoted


def test_sections_without_content_are_left_out() -> None:
    page = render_html(ReportData("empty"))
    assert "No gate decision" in page
    for anchor in ("comparison", "confusion", "curves", "predictions", "imagenet", "tracking"):
        assert f'id="{anchor}"' not in page and f'href="#{anchor}"' not in page
    assert 'href="#decision"' in page


def test_only_png_bytes_are_embedded() -> None:
    with pytest.raises(ValueError, match="PNG signature"):
        data_uri(b"GIF89a...")


def test_write_report_is_atomic(tmp_path: Path, pngs: dict[str, bytes]) -> None:
    path = write_report(tmp_path / "out" / "report.html", full_report(pngs))
    assert path.read_text(encoding="utf-8") == render_html(full_report(pngs))
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]


def test_scores_have_four_decimals_in_tables_and_figures() -> None:
    assert [format_score(x) for x in (0.6375, 1, 0.5, None, float("nan"))] == ["0.6375", "1.0000", "0.5000", "–",
                                                                              "–"]
    assert round_score(0.63749999) == 0.6375
    page = render_html(ReportData("r", comparison=Table({"model": "model", "accuracy": "test accuracy"},
                                                        [{"model": "svm", "accuracy": 0.6375}])))
    assert '<td class="num">0.6375</td>' in page
    chart = plots.plot_comparison(["svm", "net"], [0.6375, 0.5], baseline=0.6375, balanced=[0.6125, 0.5])
    confusion = plots.plot_confusion(np.array([[3, 1], [0, 4]]), ["ants", "bees"], "svm: test accuracy 0.6375")
    labels = Image.open(io.BytesIO(chart)).text[plots.TEXT_KEY].splitlines()
    assert {"0.6375", "0.6125", "0.5000", "majority class (0.6375)"} <= set(labels) and "0.637" not in labels
    assert "svm: test accuracy 0.6375" in Image.open(io.BytesIO(confusion)).text[plots.TEXT_KEY].splitlines()


def test_data_set_section_comes_first_and_extra_sections_follow_the_comparison() -> None:
    counts = Table({"class": "class", "train": "train", "val": "val", "test": "test", "total": "total"},
                   [{"class": "ants", "train": 9, "val": 2, "test": 5, "total": 16},
                    {"class": "all classes", "train": 18, "val": 4, "test": 10, "total": 32}])
    candidates = Table({"model": "model", "score": "selection score"}, [{"model": "svm", "score": 0.9}])
    page = render_html(ReportData(
        "r", dataset=DataSet("hymenoptera_data", "image folder data/raw/hymenoptera_data", counts, task="ants-vs-bees"),
        comparison=Table({"model": "model"}, [{"model": "svm"}]),
        sections=[TableSection("select", "Candidates <by selection>", candidates, "ranked by the lower bound")],
        grid=Picture("grid", plots.plot_image_grid(np.zeros((1, 8, 8, 3), np.uint8), ["a"], [False]))))
    order = [page.index(f'id="{anchor}"') for anchor in ("data", "decision", "comparison", "select", "predictions")]
    assert order == sorted(order)
    data = page[order[0]:order[1]]
    assert "<dd>hymenoptera_data</dd>" in data and "<dd>image folder data/raw/hymenoptera_data</dd>" in data
    assert "<dt>Task</dt><dd>ants-vs-bees</dd>" in data
    assert ('<tr><td>ants</td><td class="num">9</td><td class="num">2</td><td class="num">5</td>'
            '<td class="num">16</td></tr>') in data
    assert '<a href="#data">Data set</a>' in page and '<a href="#select">Candidates &lt;by selection&gt;</a>' in page
    assert '<td class="num">0.9000</td>' in page[order[3]:] and "ranked by the lower bound" in page
    assert "<dt>Task</dt>" not in render_html(ReportData("r", dataset=DataSet("d", "s", counts)))
