"""Tests for the evaluate core: metrics by hand, Keras prediction, and the whole report folder."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from tests.tiny_data import CLASSES, SIZE, write_separable_features, write_tiny_store
from tlpipe.core.params import CGrid, DataParams, EvaluateParams, SvmParams
from tlpipe.data import store
from tlpipe.evaluation.choice import choose_candidate, selection_bounds, wilson_lower
from tlpipe.evaluation.evaluate import (
    MODEL_NAMES,
    NoModelsError,
    describe_dataset,
    evaluate_models,
    name_source,
    predict_keras,
)
from tlpipe.evaluation.metrics import compute_metrics, dvc_metrics, read_test_accuracies
from tlpipe.evaluation.outputs import choose_grid_rows, curves_frame, describe_grid
from tlpipe.evaluation.report import build_report
from tlpipe.render import plots
from tlpipe.train.svm import train_svms

COUNTS = {"train": 9, "val": 2, "test": 5}  # per class
SVM_PARAMS = SvmParams(c_grid=CGrid(start=-1, stop=1, num=3), cv_folds=3, n_jobs=1, pixel_size=SIZE)
GRID = EvaluateParams(grid_images=4)


def write_features(root: Path, store_dir: Path, seed: int = 0) -> Path:
    """Separable final/mid features aligned with the store, plus an imagenet_top1.csv."""
    write_separable_features(root, store_dir, seed)
    manifest = store.load_manifest(store_dir)
    test = manifest[manifest["split"] == "test"].sort_values("index")
    table = test[["index", "relpath", "class_name"]].assign(imagenet_top1="ant | formicid", imagenet_probability=0.5)
    store.write_csv(root / "imagenet_top1.csv", table)
    return root


def write_keras_model(path: Path) -> Path:
    """A tiny real network: uint8 -> cast -> mean colour -> softmax; 'bees' when bright."""
    inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    pixels = keras.layers.Rescaling(1 / 255)(keras.ops.cast(inputs, "float32"))
    pooled = keras.layers.GlobalAveragePooling2D()(pixels)
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(pooled))
    dense.set_weights([np.tile([[-10.0, 10.0]], (3, 1)), np.array([14.1, -14.1])])
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def write_history(folder: Path, name: str, best_epoch: int) -> None:
    """A 3-epoch training history and the metrics file naming the best epoch, as the finetune stage writes them."""
    history = pd.DataFrame({"epoch": [1, 2, 3], "phase": [1, 1, 1], "loss": [0.9, 0.6, 0.5],
                            "accuracy": [0.5, 0.7, 0.8], "val_loss": [0.8, 0.55, 0.6],
                            "val_accuracy": [0.5, 0.75, 0.7], "seconds": [0.1, 0.1, 0.1]})
    store.write_csv(folder / f"{name}_history.csv", history)
    store.write_json(folder / f"{name}_metrics.json", {"best_epoch": best_epoch, "best_val_accuracy": 0.75})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A store, features, two SVMs (svm_concat missing) and one network (concat missing)."""
    root = tmp_path_factory.mktemp("world")
    store_dir = write_tiny_store(root / "store", COUNTS)
    features_dir = write_features(root / "features", store_dir)
    train_svms(store_dir, features_dir, root / "svm", SVM_PARAMS, names=("svm_features", "svm_pixels"))
    write_keras_model(root / "finetune" / "frozen.keras")
    write_history(root / "finetune", "frozen", best_epoch=2)
    return {"store": store_dir, "features": features_dir, "svm": root / "svm", "finetune": root / "finetune",
            "root": root}


@pytest.fixture(scope="module")
def evaluated(world: dict[str, Path]) -> tuple[Path, dict]:
    """evaluate_models run once over ``world``, into a folder holding stale outputs."""
    out = world["root"] / "evaluate"
    (out / "confusion").mkdir(parents=True)
    (out / "grid_concat.png").write_bytes(b"stale")
    (out / "confusion" / "concat.csv").write_text("stale\n")  # per-model layout of older versions
    (out / "report.html").write_text("stale")  # the gate's outputs of an earlier run
    (out / "promotion.json").write_text("{}")
    result = evaluate_models(world["store"], world["features"], world["svm"], world["finetune"], out, GRID, SIZE)
    return out, result


def test_compute_metrics_by_hand() -> None:
    y_true = np.array([0, 0, 1, 1, 1])
    y_pred = np.array([0, 1, 1, 1, 0])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    metrics = compute_metrics(y_true, y_pred, proba, CLASSES)
    assert metrics["accuracy"] == 0.6
    assert metrics["balanced_accuracy"] == round((1 / 2 + 2 / 3) / 2, 4)
    assert metrics["per_class"]["ants"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert metrics["per_class"]["bees"] == {"precision": 0.6667, "recall": 0.6667, "f1": 0.6667, "support": 3}
    assert metrics["f1_macro"] == round((0.5 + 2 / 3) / 2, 4)
    assert metrics["confusion_matrix"] == [[1, 1], [1, 2]]
    assert metrics["roc_auc"] == round(5 / 6, 4)  # 5 of 6 (bee, ant) pairs ordered right
    assert json.loads(json.dumps(metrics)) == metrics


def test_roc_auc_is_none_when_undefined() -> None:
    classes = ["a", "b", "c"]
    y_true = np.array([0, 1, 0, 1])
    proba = np.full((4, 3), 1 / 3)
    metrics = compute_metrics(y_true, np.array([0, 1, 2, 1]), proba, classes)
    assert metrics["roc_auc"] is None
    assert metrics["per_class"]["c"]["support"] == 0
    assert compute_metrics(y_true, y_true, None, classes)["roc_auc"] is None


def test_compute_metrics_multiclass() -> None:
    rng = np.random.default_rng(0)
    y_true = np.repeat([0, 1, 2], 6)
    proba = rng.dirichlet([1, 1, 1], size=len(y_true))
    proba[np.arange(len(y_true)), y_true] += 0.5
    proba /= proba.sum(axis=1, keepdims=True)
    metrics = compute_metrics(y_true, proba.argmax(1), proba, ["a", "b", "c"])
    expected = roc_auc_score(y_true, proba, multi_class="ovr", average="macro")
    assert metrics["roc_auc"] == round(expected, 4)
    assert np.asarray(metrics["confusion_matrix"]).shape == (3, 3)
    assert sum(c["support"] for c in metrics["per_class"].values()) == len(y_true)
    assert isinstance(metrics["accuracy"], float)


def test_wilson_lower_bound_by_hand() -> None:
    # p = 0.5, n = 100, z = 1.96: (0.5 + 0.019208 - 1.96 * sqrt(0.0025 + 0.00009604)) / 1.038416
    assert wilson_lower(0.5, 100) == pytest.approx(0.403830, abs=1e-6)
    assert wilson_lower(1.0, 24) == pytest.approx(0.862, abs=1e-3)
    assert wilson_lower(0.9, 0) == 0.0
    assert wilson_lower(0.9, 1000) > wilson_lower(0.9, 100) > wilson_lower(0.9, 10)


def test_candidate_ranks_by_the_lower_bound_so_a_few_validation_images_count_for_less() -> None:
    # hymenoptera, Lite0: finetuned hit 1.0 on 24 val images, the feature SVM 0.96 CV over 221 train images
    scores = {"svm_features": 0.96, "frozen": 0.9583, "finetuned": 1.0}
    metrics = {name: {"accuracy": 0.9, "balanced_accuracy": 0.9} for name in scores}
    assert choose_candidate(scores, metrics) == "finetuned"  # the plain scores
    sizes = {"train": 221, "val": 24}
    bounds = selection_bounds(scores, sizes)
    assert bounds["finetuned"] == pytest.approx(0.862, abs=1e-3) and bounds["svm_features"] > 0.92
    assert choose_candidate(scores, metrics, sizes) == "svm_features"
    # the same sizes keep the plain order; ties still go to the first in MODEL_NAMES order
    assert choose_candidate(scores, metrics, {"train": 100, "val": 100}) == "finetuned"
    tied = {"frozen": 0.9, "svm_concat": 0.9}
    assert choose_candidate(tied, {name: metrics["frozen"] for name in tied}, {"train": 50, "val": 50}) == "svm_concat"


def mistakes_world() -> tuple[np.ndarray, np.ndarray]:
    """80 test images of 3 classes in row order; 30 mistakes: 18 of class 0 (rows 0-17), 12 of class 1 (last rows)."""
    y_true = np.repeat([0, 1, 2], [30, 30, 20])
    y_pred = y_true.copy()
    y_pred[:18] = 1
    y_pred[48:60] = 2
    return y_true, y_pred


def test_grid_samples_mistakes_from_every_class_and_some_correct_images() -> None:
    y_true, y_pred = mistakes_world()
    sample = choose_grid_rows(y_true, y_pred, 16)
    rows = np.asarray(sample.rows)
    assert len(rows) == 16 and len(set(rows.tolist())) == 16
    assert (y_true[list(sample.mistakes)] != y_pred[list(sample.mistakes)]).all()
    assert (y_true[list(sample.correct)] == y_pred[list(sample.correct)]).all()
    assert len(sample.mistakes) == 12 and len(sample.correct) == 4  # a quarter of the grid is correct
    assert sorted(set(y_true[list(sample.mistakes)])) == [0, 1]  # the old grid (mistakes in row order) missed class 1
    assert sample.mistakes_per_class == {0: (6, 18), 1: (6, 12)}
    assert set(y_true[list(sample.correct)]) == {0, 1, 2}  # correct images spread over the classes too
    assert sample.total_mistakes == 30 and sample.total_correct == 50
    assert choose_grid_rows(y_true, y_pred, 16) == sample  # same seed, same images
    assert choose_grid_rows(y_true, y_pred, 16, seed=1).rows != sample.rows
    # mistakes first, each kind grouped by true class
    assert list(sample.rows[:12]) == sorted(sample.mistakes, key=lambda r: (y_true[r], r))


def test_grid_gives_unused_places_to_the_other_kind() -> None:
    y_true, y_pred = np.repeat([0, 1], 10), np.repeat([0, 1], 10)
    y_pred[[3, 15]] = [1, 0]
    few_mistakes = choose_grid_rows(y_true, y_pred, 8)
    assert sorted(few_mistakes.mistakes) == [3, 15] and len(few_mistakes.correct) == 6
    perfect = choose_grid_rows(y_true, y_true, 8)
    assert perfect.mistakes == () and len(perfect.correct) == 8 and perfect.mistakes_per_class == {}
    all_wrong = choose_grid_rows(y_true, 1 - y_true, 8)
    assert len(all_wrong.mistakes) == 8 and all_wrong.correct == ()
    assert len(choose_grid_rows(y_true, y_pred, 100).rows) == 20  # never more than the split


def test_grid_caption_counts_what_is_shown() -> None:
    y_true, y_pred = mistakes_world()
    classes = ["a", "b", "c"]
    sample = choose_grid_rows(y_true, y_pred, 16)
    assert describe_grid(sample, classes) == ("12 of 30 mistakes, from every class with mistakes (a: 6 of 18, "
                                              "b: 6 of 12), and 4 of 50 correct images")
    y_many = np.repeat(np.arange(5), 4)  # 5 classes with mistakes, only 3 places for mistakes
    tight = choose_grid_rows(y_many, (y_many + 1) % 5, 4)
    caption = describe_grid(tight, list("vwxyz"))
    assert caption == ("4 of 20 mistakes, from 4 of 5 classes with mistakes (v: 1 of 4, w: 1 of 4, x: 1 of 4, "
                       "y: 1 of 4), and no correct images (the model has none)")
    assert describe_grid(choose_grid_rows(y_true, y_true, 4), classes) == "no mistakes; 4 of 80 correct images"


def test_grid_png_and_report_carry_the_caption(evaluated: tuple[Path, dict], world: dict[str, Path]) -> None:
    out, result = evaluated
    y_true = store.split_labels(world["store"], "test")
    predicted = pd.read_csv(out / "predictions.csv")[result["candidate"]]
    y_pred = np.array([CLASSES.index(name) for name in predicted])
    caption = describe_grid(choose_grid_rows(y_true, y_pred, GRID.grid_images), CLASSES)
    assert result["grid"] == {"model": result["candidate"], "caption": caption}
    with Image.open(out / "grid.png") as image:
        text = image.text[plots.TEXT_KEY]
    assert " ".join(text.split()).endswith(f"{result['candidate']} on {len(y_true)} test images: {caption}")
    assert text.count("true: ") == GRID.grid_images and text.count("predicted: ") == GRID.grid_images


def test_dataset_section_names_the_source_and_counts_every_class_and_split(world: dict[str, Path]) -> None:
    folder = describe_dataset(world["store"], DataParams(source=str(world["root"] / "hymenoptera_data")))
    assert folder["name"] == "hymenoptera_data" and folder["source"] == f"image folder {world['root']}/hymenoptera_data"
    per_class = {"train": COUNTS["train"], "val": COUNTS["val"], "test": COUNTS["test"], "total": sum(COUNTS.values())}
    assert folder["counts"] == [{"class": name, **per_class} for name in CLASSES] + [
        {"class": "all classes", **{key: 2 * value for key, value in per_class.items()}}]
    assert json.loads(json.dumps(folder)) == folder  # travels between Prefect tasks
    elpv = describe_dataset(world["store"], DataParams(source="elpv", elpv_label="defect", elpv_threshold=0.5))
    assert elpv["name"] == "elpv (defect labels, defect probability >= 0.5)"
    assert elpv["source"].startswith("Python package elpv-dataset ")
    assert name_source(DataParams(source="elpv", elpv_label="type"))[0] == "elpv (module-type labels)"


def test_predict_keras_streams_batches(world: dict[str, Path]) -> None:
    path = world["finetune"] / "frozen.keras"
    y_pred, proba = predict_keras(path, world["store"], "test", batch_size=3)
    images = np.load(store.split_path(world["store"], "test"))
    expected = keras.saving.load_model(path).predict(images, verbose=0)
    np.testing.assert_allclose(proba, expected, rtol=1e-5, atol=1e-6)
    assert y_pred.tolist() == expected.argmax(1).tolist()


def test_evaluate_reports_existing_models_only(evaluated: tuple[Path, dict]) -> None:
    out, result = evaluated
    found = ["svm_features", "svm_pixels", "frozen"]
    assert list(result["metrics"]) == found
    assert set(result["skipped"]) == {"svm_concat", "concat", "finetuned"}
    assert set(result["metrics"]) | set(result["skipped"]) == set(MODEL_NAMES)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result["metrics"]
    assert metrics["svm_features"]["accuracy"] == 1.0
    for values in metrics.values():
        assert {"accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "per_class", "confusion_matrix"} <= set(values)


def test_evaluate_writes_tables(evaluated: tuple[Path, dict], world: dict[str, Path]) -> None:
    out, result = evaluated
    n_test = 2 * COUNTS["test"]
    comparison = pd.read_csv(out / "comparison.csv")
    assert list(comparison.columns) == ["model", "family", "selected_by", "selection_score", "accuracy",
                                        "balanced_accuracy", "f1_macro", "roc_auc"]
    assert comparison["model"].tolist() == list(result["metrics"])
    assert comparison["family"].tolist() == ["svm", "svm", "network"]
    assert comparison["accuracy"].tolist() == [result["metrics"][m]["accuracy"] for m in result["metrics"]]
    assert comparison.loc[2, "selection_score"] == 0.75  # frozen: best validation accuracy
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == n_test
    assert list(predictions.columns[:3]) == ["index", "relpath", "class_name"]
    confusion = pd.read_csv(out / "confusion.csv")
    assert list(confusion.columns) == ["model", "actual", "predicted"]
    assert confusion["model"].unique().tolist() == list(result["metrics"])
    for model in result["metrics"]:
        assert set(predictions[model]) <= set(CLASSES)
        assert predictions[f"{model}_probability"].between(0, 1).all()
        rows = confusion[confusion["model"] == model]
        assert len(rows) == n_test and rows["actual"].tolist() == predictions["class_name"].tolist()
        assert rows["predicted"].tolist() == predictions[model].tolist()
        matrix = pd.crosstab(rows["actual"], rows["predicted"]).reindex(index=CLASSES, columns=CLASSES, fill_value=0)
        assert matrix.to_numpy().tolist() == result["metrics"][model]["confusion_matrix"]
    table = (out / "imagenet_top1.md").read_text()
    assert table.count("\n| ") == n_test + 1 and "ant \\| formicid" in table


def test_evaluate_draws_valid_pngs_and_drops_stale_ones(evaluated: tuple[Path, dict]) -> None:
    out, result = evaluated
    best = result["best"]["model"]
    assert best == "svm_features"  # perfect on separable features; ties go to the first model
    # put forward by selection score (CV 1.0 on separable features beats frozen's val 0.75), never by test
    assert result["candidate"] == "svm_features" and result["selection"]["frozen"] == 0.75
    pngs = ["comparison.png", "curves.png", "grid.png"] + [f"confusion_{m}.png" for m in result["metrics"]]
    for name in pngs:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG"
    assert not list(out.glob("grid_*.png"))  # the per-model names of older versions
    assert not (out / "confusion").exists()
    assert not (out / "report.html").exists() and not (out / "promotion.json").exists()
    assert not list(out.rglob(".*tmp-*"))


def test_training_curves_table_marks_the_best_epoch(evaluated: tuple[Path, dict]) -> None:
    out, _ = evaluated
    curves = pd.read_csv(out / "curves.csv")
    assert list(curves.columns) == ["model", "epoch", "split", "accuracy", "loss", "best"]
    assert curves["model"].unique().tolist() == ["frozen"]  # the only network with a history
    assert len(curves) == 3 * 2
    val = curves[curves["split"] == "val"]
    assert val["accuracy"].tolist() == [0.5, 0.75, 0.7]
    assert curves.loc[curves["best"] == 1, ["split", "epoch"]].to_numpy().tolist() == [["val", 2]]
    assert curves_frame({}, {}).empty


def test_dvc_metrics_are_numbers_with_short_keys(evaluated: tuple[Path, dict], tmp_path: Path) -> None:
    _, result = evaluated
    accuracies, details = dvc_metrics(result["metrics"])
    assert list(accuracies) == list(result["metrics"])
    assert all(list(v) == ["acc"] for v in accuracies.values())
    assert accuracies["svm_features"]["acc"] == result["metrics"]["svm_features"]["accuracy"]
    for model, values in details.items():
        assert set(values) <= {"bal_acc", "f1", "auc"} and {"bal_acc", "f1"} <= set(values)
        assert values["f1"] == result["metrics"][model]["f1_macro"]

    def leaves(value):
        return [x for v in value.values() for x in leaves(v)] if isinstance(value, dict) else [value]

    assert all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in leaves(accuracies) + leaves(details))
    store.write_json(tmp_path / "evaluate.json", accuracies)
    assert read_test_accuracies(tmp_path / "evaluate.json") == {m: v["acc"] for m, v in accuracies.items()}
    assert read_test_accuracies(tmp_path / "absent.json") == {}


def test_evaluate_without_models_fails_clearly(world: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(NoModelsError, match="no model to evaluate"):
        evaluate_models(world["store"], world["features"], tmp_path / "none", None, tmp_path / "out", GRID, SIZE)


def test_report_holds_every_figure_and_the_decision(evaluated: tuple[Path, dict], world: dict[str, Path]) -> None:
    from tlpipe.evaluation.report import build_report
    from tlpipe.render.html import render_html

    out, result = evaluated
    decision = {"promoted": True, "model": result["candidate"], "version": "1", "test_accuracy": 1.0,
                "reason": f"{result['candidate']} promoted: no champion yet (test accuracy 1.0000)"}
    data = build_report(out, result, decision, world["features"], [("Data hash", "abc")], [("run", "x")])
    assert [p.title for p in data.confusions] == list(result["metrics"])
    assert data.curves is not None and data.grid is not None and data.comparison_chart is not None
    assert [row["model"] for row in data.comparison.rows] == list(result["metrics"])
    assert list(data.comparison.highlight) == [result["candidate"]]
    assert len(data.imagenet.rows) == 2 * COUNTS["test"]
    page = render_html(data)
    assert page.count("data:image/png;base64,") == len(result["metrics"]) + 3
    assert "svm_features promoted: no champion yet" in page and "ant | formicid" in page
    assert "svm_concat (no model file" in page  # the skipped models are named


def test_report_names_the_data_set_and_shows_the_same_numbers_everywhere(evaluated: tuple[Path, dict],
                                                                         world: dict[str, Path]) -> None:
    """Data-set section first; every accuracy reads the same (4 decimals) in figures, captions and tables."""
    from tlpipe.render.formats import format_score
    from tlpipe.render.html import render_html

    out, result = evaluated
    dataset = describe_dataset(world["store"], DataParams(source=str(world["root"] / "bugs")))
    page = render_html(build_report(out, {**result, "dataset": dataset}, None, None))
    data = page[page.index('<section id="data">'):page.index('<section id="decision">')]
    assert "<dd>bugs</dd>" in data and f"image folder {world['root']}/bugs" in data
    for row in dataset["counts"]:
        cells = "".join(f'<td class="num">{row[key]}</td>' for key in ("train", "val", "test", "total"))
        assert f"<tr><td>{row['class']}</td>{cells}</tr>" in data
    assert result["grid"]["caption"] in page
    with Image.open(out / "comparison.png") as image:
        chart = image.text[plots.TEXT_KEY].splitlines()
    for model, values in result["metrics"].items():
        shown = format_score(values["accuracy"])
        with Image.open(out / f"confusion_{model}.png") as image:
            assert f"{model}: test accuracy {shown}" in image.text[plots.TEXT_KEY].splitlines()
        assert f"<b>{model}</b> – test accuracy {shown}</figcaption>" in page
        row = page[page.index(f"<td>{model}</td>"):]
        assert f'<td class="num">{shown}</td>' in row[:row.index("</tr>")]
        assert shown in chart and format_score(values["balanced_accuracy"]) in chart


def test_dvc_plots_render_with_labels_counts_and_colours(evaluated: tuple[Path, dict], tmp_path: Path) -> None:
    """``dvc plots show`` on the real dvc.yaml and templates over this stage's outputs."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    out, _ = evaluated
    for name in ("dvc.yaml", "params.yaml"):  # dvc.yaml interpolates params
        shutil.copy2(REPO / name, tmp_path / name)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    shutil.copytree(REPO / ".dvc" / "plots", tmp_path / ".dvc" / "plots")
    shutil.copytree(out, tmp_path / "reports" / "evaluate")
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    plots = json.loads(shown.stdout)["data"]
    assert not json.loads(shown.stdout).get("errors")
    vega = {name: entries[0]["content"] for name, entries in plots.items() if entries[0]["type"] == "vega"}
    assert set(vega) == {"test accuracy per model", "confusion matrices", "training accuracy", "training loss"}
    assert {"reports/evaluate/comparison.png", "reports/evaluate/curves.png", "reports/evaluate/grid.png"} <= set(plots)

    confusion = vega["confusion matrices"]
    layers = confusion["spec"]["layer"]
    assert layers[1]["mark"]["type"] == "text" and layers[1]["encoding"]["text"] == {"field": "images",
                                                                                      "type": "quantitative"}
    assert confusion["spec"]["encoding"]["x"]["title"] == "predicted class"
    assert confusion["spec"]["encoding"]["y"]["title"] == "true class"
    assert {row["model"] for row in confusion["data"]["values"]} == set(evaluated[1]["metrics"])

    curves = vega["training accuracy"]
    assert curves["spec"]["encoding"]["color"]["field"] == "model"
    assert curves["spec"]["layer"][0]["encoding"]["strokeDash"]["field"] == "split_name"
    assert curves["spec"]["encoding"]["y"]["title"] == "accuracy" and vega["training loss"]["spec"]["encoding"][
        "y"]["title"] == "loss (cross-entropy)"
    assert [row["epoch"] for row in curves["data"]["values"] if row["best"] == "1"] == ["2"]
    bars = vega["test accuracy per model"]
    assert bars["spec"]["encoding"]["x"]["title"] == "test accuracy"
    assert bars["spec"]["encoding"]["x"]["scale"]["domain"] == [0, 1]
    assert "<DVC_METRIC" not in json.dumps(vega)  # every anchor filled
