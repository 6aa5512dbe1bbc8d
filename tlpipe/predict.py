"""Core of ``tlpipe predict``: classify image files with a logged pyfunc model.

The model is any :class:`tlpipe.pyfunc.ImageClassifier`: by default the
registered model's ``@champion`` alias, else a ``models:/`` or ``runs:/`` URI
or a local MLflow model folder. The caller points MLflow at the tracking store
first (:func:`tlpipe.tracking.connect`) when the URI is not a local folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

BATCH_SIZE = 32
DEFAULT_ALIAS = "champion"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
URI_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def resolve_model_uri(model: str | None, root: Path, registered_name: str) -> str:
    """Turn the ``--model`` option into a URI ``mlflow.pyfunc.load_model`` accepts.

    Args:
        model: None (the registered model's champion), a URI (``models:/...``,
            ``runs:/...``, ``file:/...``) or a local MLflow model folder, absolute,
            relative to the working directory, or relative to ``root``.
        root: Project root.
        registered_name: The registered model name.

    Raises:
        FileNotFoundError: If ``model`` is a path with no ``MLmodel`` file.
    """
    if model is None:
        return f"models:/{registered_name}@{DEFAULT_ALIAS}"
    if URI_PATTERN.match(model):
        return model
    candidates = [Path(model)] if Path(model).is_absolute() else [Path(model), Path(root) / model]
    for folder in candidates:
        if (folder / "MLmodel").is_file():
            return str(folder.resolve())
    raise FileNotFoundError(
        f"--model {model!r} is neither a URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/NAME) "
        "nor a folder with an MLmodel file")


def list_folder_images(folder: Path) -> list[Path]:
    """Image-looking files under ``folder``, recursively, sorted; hidden files skipped."""
    return sorted(path for path in folder.rglob("*")
                  if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def collect_images(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand the inputs into files to classify.

    A folder contributes its image-looking files (by suffix, recursively,
    sorted); a file named explicitly is always taken, whatever its suffix.
    Duplicates are dropped, first occurrence kept.

    Returns:
        The files, and ``(input, reason)`` for every input that does not exist
        or is an empty folder.
    """
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = list_folder_images(path)
            files.extend(found)
            if not found:
                errors.append((item, "no image files in this folder"))
        elif path.is_file():
            files.append(path)
        else:
            errors.append((item, "no such file or directory"))
    return list(dict.fromkeys(files)), errors


def top_classes(row: pd.Series, classes: list[str], top: int) -> list[tuple[str, float]]:
    """The ``top`` most probable classes of one output row, most probable first."""
    pairs = [(name, float(row[f"p_{name}"])) for name in classes]
    return sorted(pairs, key=lambda pair: -pair[1])[:max(top, 1)]


def output_classes(frame: pd.DataFrame) -> list[str]:
    """Class names from the ``p_<class>`` columns of a model output."""
    return [column[2:] for column in frame.columns if column.startswith("p_")]


def rows_from_output(files: list[Path], frame: pd.DataFrame, top: int) -> list[dict]:
    """One result dict per file from a model output DataFrame."""
    classes = output_classes(frame)
    rows = []
    for path, (_, row) in zip(files, frame.iterrows()):
        if row["error"] is not None and not pd.isna(row["error"]):
            rows.append(error_row(str(path), str(row["error"])))
            continue
        rows.append({"path": str(path), "class": row["class"], "probability": float(row["probability"]),
                     "top": top_classes(row, classes, top), "error": None})
    return rows


def error_row(path: str, reason: str) -> dict:
    """A result dict for a file that could not be classified."""
    return {"path": path, "class": None, "probability": None, "top": [], "error": reason}


def predict_images(model_uri: str, inputs: list[str], top: int = 1) -> list[dict]:
    """Classify image files and folders with a pyfunc image model.

    The model is loaded once and fed batches of :data:`BATCH_SIZE` paths; a
    file that cannot be read or decoded is reported in its own row and the
    others go on.

    Args:
        model_uri: See :func:`resolve_model_uri`.
        inputs: Files and folders.
        top: How many classes to list per file in ``top``.

    Returns:
        One dict per file (inputs that do not exist last): ``path``, ``class``,
        ``probability``, ``top`` (list of ``(class, probability)``), ``error``
        (None when classified).
    """
    import mlflow

    files, missing = collect_images(inputs)
    rows: list[dict] = []
    if files:
        model = mlflow.pyfunc.load_model(model_uri)
        for start in range(0, len(files), BATCH_SIZE):
            batch = files[start:start + BATCH_SIZE]
            frame = model.predict(pd.DataFrame({"image": pd.Series([str(p) for p in batch], dtype=object)}))
            rows.extend(rows_from_output(batch, frame, top))
    return rows + [error_row(item, reason) for item, reason in missing]


def format_predictions(rows: list[dict], as_json: bool) -> str:
    """Render prediction rows as JSON (a list of objects) or as aligned text lines."""
    if as_json:
        return json.dumps([{**row, "top": [list(pair) for pair in row["top"]]} for row in rows], indent=2)
    width = max((len(row["path"]) for row in rows), default=0)
    lines = []
    for row in rows:
        if row["error"] is not None:
            lines.append(f"{row['path']:<{width}}  ERROR  {row['error']}")
            continue
        line = f"{row['path']:<{width}}  {row['class']}  {row['probability']:.4f}"
        if len(row["top"]) > 1:
            line += "  [" + ", ".join(f"{name} {prob:.4f}" for name, prob in row["top"]) + "]"
        lines.append(line)
    return "\n".join(lines)
