"""The evaluate stage's HTML report: its content gathered from an evaluation and its output folder
(rendered by :mod:`tlpipe.render.html`)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from tlpipe.data import store
from tlpipe.evaluation.outputs import build_comparison, read_imagenet_table
from tlpipe.render import html as report
from tlpipe.render.formats import format_score


def describe_sizes(sizes: dict[str, int] | None) -> str:
    """' (CV over N train images, validation on M)' for the report, or '' when unknown."""
    if not sizes:
        return ""
    return f" (CV over {sizes.get('train', '?')} train images, validation on {sizes.get('val', '?')})"


def read_png(path: Path) -> bytes | None:
    """A PNG's bytes, or None when the file is absent."""
    return Path(path).read_bytes() if Path(path).is_file() else None


def dataset_section(dataset: dict | None) -> report.DataSet | None:
    """The report's data-set section from :func:`tlpipe.evaluation.evaluate.describe_dataset`'s dict
    (None: no section)."""
    if not dataset:
        return None
    columns = {"class": "class", **{split: split for split in store.SPLITS}, "total": "total"}
    return report.DataSet(dataset["name"], dataset["source"], report.Table(columns, dataset["counts"]),
                          dataset.get("task"))


def build_report(out_dir: Path, result: dict, decision: dict | None, features_dir: Path | None,
                 facts: list[tuple[str, str]] | None = None, links: list[tuple[str, str]] | None = None,
                 max_imagenet_rows: int = 200, sections: list[report.TableSection] | None = None,
                 ) -> report.ReportData:
    """Gather the report's content from an :func:`tlpipe.evaluation.evaluate.evaluate_models` result and its
    output folder.

    The data-set section comes from ``result["dataset"]``
    (:func:`tlpipe.evaluation.evaluate.describe_dataset`, added by the
    evaluate task), the grid's caption from ``result["grid"]``.

    Args:
        out_dir: The folder :func:`tlpipe.evaluation.evaluate.evaluate_models` wrote.
        result: Its return value.
        decision: The gate's decision (``promotion.json``), or None.
        features_dir: Where ``imagenet_top1.csv`` is (None: no ImageNet table).
        facts: Extra header facts (label, value), e.g. data hash and run ids.
        links: (label, where) pairs for the "Where to look next" section.
        max_imagenet_rows: Rows of the ImageNet table shown (the rest is counted).
        sections: Extra table sections, shown after the model comparison.
    """
    out_dir = Path(out_dir)
    metrics, candidate = result["metrics"], result["candidate"]
    comparison = build_comparison(metrics, result.get("selection", {}))
    columns = {"model": "model", "family": "family", "selected_by": "selected by",
               "selection_score": "selection score", "accuracy": "test accuracy",
               "balanced_accuracy": "balanced accuracy", "f1_macro": "macro F1", "roc_auc": "ROC AUC"}
    table = report.Table(columns, comparison.to_dict(orient="records"), highlight=[candidate])
    chart = read_png(out_dir / "comparison.png")
    confusions = [report.Picture(model, png, f"test accuracy {format_score(metrics[model]['accuracy'])}")
                  for model in metrics if (png := read_png(out_dir / f"confusion_{model}.png"))]
    curves = read_png(out_dir / "curves.png")
    grid = read_png(out_dir / "grid.png")
    imagenet, notes = None, {}
    frame = read_imagenet_table(features_dir) if features_dir is not None else None
    if frame is not None:
        shown = frame.head(max_imagenet_rows)
        imagenet = report.Table({"index": "index", "relpath": "image", "class_name": "true class",
                                 "imagenet_top1": "ImageNet top-1", "imagenet_probability": "probability"},
                                shown.to_dict(orient="records"))
        if len(frame) > len(shown):
            notes["imagenet"] = f"First {len(shown)} of {len(frame)} test images (all in imagenet_top1.md)."
    notes["comparison"] = (f"{result.get('test_images', '?')} test images. The highlighted row is the model put "
                           "forward to the champion gate: chosen by CV accuracy (SVMs) or best validation accuracy "
                           "(networks), never by test accuracy, ranked by the lower end of its 95 % Wilson "
                           "interval, so an accuracy measured on few images counts for less"
                           f"{describe_sizes(result.get('selection_sizes'))}.")
    notes["predictions"] = ("Each image is titled with its true and predicted class; mistakes come first, in red "
                            "with a ✗ and a red frame, then correctly classified images.")
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    dataset = dataset_section(result.get("dataset"))
    header = [("Generated", now), *([("Data set", dataset.name)] if dataset else []),
              ("Classes", ", ".join(result.get("classes", []))), *(facts or [])]
    return report.ReportData(
        title="tlpipe: model comparison and promotion", facts=header, dataset=dataset, decision=decision,
        comparison=table, sections=sections or [],
        comparison_chart=report.Picture("Test accuracy per model", chart, "dotted line: always predicting the "
                                        "majority class") if chart else None,
        confusions=confusions,
        curves=report.Picture("Training curves", curves, "colour = network, line style = split") if curves else None,
        grid=report.Picture(f"Test images as {candidate} sees them", grid,
                            result.get("grid", {}).get("caption", "")) if grid else None,
        imagenet=imagenet, skipped=result.get("skipped", {}), links=links or [], notes=notes)
