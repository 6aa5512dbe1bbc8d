"""Core of ``tlpipe predict``: classify image files with a logged pyfunc model.

The model is any :class:`tlpipe.serving.classifier.ImageClassifier`: by default the
``@champion`` of the project's current task (:func:`identify_champion`; a model of
another task answers only when named), else a ``models:/`` or ``runs:/`` URI or a
local MLflow model folder. The caller points MLflow at the tracking store first
(:func:`tlpipe.tracking.connection.connect`) when the URI is not a local folder.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.core.errors import UserError

CLASSES_TAG = "tlpipe.classes"
"""Model-version tag: the JSON list of class names the model outputs, in label order."""

BATCH_SIZE = 32
EAGER_MAX_FILES = 8
"""Up to this many files, the model's networks run eagerly (no graph tracing: faster for a few images)."""
DEFAULT_ALIAS = "champion"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
URI_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


class ModelNotFoundError(UserError, LookupError):
    """The model asked for (registered name, alias, version, run or folder) does not exist."""


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answers: what ``--model`` named and what it resolved to."""

    uri: str
    load_uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    classes: list[str] | None = None

    def describe(self) -> str:
        """One line, e.g. ``elpv-defect v3 (@champion), classes: [defective, functional], run 0a1b2c3d...``."""
        if self.name:
            text = f"{self.name} v{self.version}" + (f" (@{self.alias})" if self.alias else "")
        else:
            text = self.uri
        if self.classes:
            text += f", classes: [{', '.join(self.classes)}]"
        return text + (f", run {self.run_id}" if self.run_id else "")

    def with_classes(self, classes: list[str] | None) -> ModelIdentity:
        """The identity with the model's class names, when they were not known yet."""
        return self if self.classes or not classes else replace(self, classes=list(classes))

    def as_dict(self) -> dict:
        """The identity as a JSON-ready dict."""
        return asdict(self)


MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/")


def identify_model(uri: str, client=None) -> ModelIdentity:
    """Resolve a model URI to the registered version / run that answers, checking that it exists.

    ``models:/NAME@ALIAS`` is pinned to the version the alias points at now (so
    the model loaded is the one named). Local folders report the run recorded
    in their ``MLmodel`` file, if any.

    Args:
        uri: From :func:`resolve_model_uri`.
        client: An ``MlflowClient`` on the project store (needed for ``models:/`` and ``runs:/``).

    Raises:
        ModelNotFoundError: Naming what is missing and what exists instead.
    """
    if match := MODELS_URI.match(uri):
        return identify_registered(uri, match["name"], match["alias"], match["version"], client)
    if match := RUNS_URI.match(uri):
        from mlflow.exceptions import MlflowException

        try:
            client.get_run(match["run_id"])
        except MlflowException:
            raise ModelNotFoundError(f"no MLflow run {match['run_id']!r} in {client.tracking_uri}") from None
        return ModelIdentity(uri=uri, load_uri=uri, run_id=match["run_id"])
    folder = Path(uri)
    if (folder / "MLmodel").is_file():
        import yaml

        run_id = (yaml.safe_load((folder / "MLmodel").read_text()) or {}).get("run_id")
        return ModelIdentity(uri=uri, load_uri=uri, run_id=run_id)
    return ModelIdentity(uri=uri, load_uri=uri)


def identify_registered(uri: str, name: str, alias: str | None, version: str | None, client) -> ModelIdentity:
    """The registered model version behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise ModelNotFoundError(
            f"no registered model {name!r} in {client.tracking_uri} (registered: {', '.join(names) or 'none'}); "
            "run the pipeline first (tlpipe repro) or pass --model") from None
    try:
        found = (client.get_model_version_by_alias(name, alias) if alias
                 else client.get_model_version(name, version))
    except MlflowException:
        aliases = ", ".join(f"@{a} -> v{v}" for a, v in sorted((registered.aliases or {}).items())) or "none"
        missing = f"alias @{alias}" if alias else f"version {version}"
        raise ModelNotFoundError(f"registered model {name!r} has no {missing} (aliases: {aliases}); "
                                 f"pick one with --model models:/{name}@ALIAS or models:/{name}/VERSION") from None
    return ModelIdentity(uri=uri, load_uri=f"models:/{name}/{found.version}", name=name,
                         version=str(found.version), alias=alias, run_id=found.run_id,
                         classes=read_classes_tag(found.tags or {}))


def identify_champion(task: str, name: str, client) -> ModelIdentity:
    """The ``@champion`` of the registered model ``name`` of the current ``task``.

    Raises:
        ModelNotFoundError: When the task has no champion yet: the message lists the
            champions of other tasks and how to name one (``--model``).
    """
    try:
        return identify_registered(f"models:/{name}@{DEFAULT_ALIAS}", name, DEFAULT_ALIAS, None, client)
    except ModelNotFoundError:
        others = describe_champions(client, exclude=name)
        listed = (f"champions of other tasks: {'; '.join(others)}; name one with --model models:/NAME@{DEFAULT_ALIAS}"
                  if others else "no other task has a champion")
        raise ModelNotFoundError(
            f"task '{task}' has no champion yet (registered model '{name}' in {client.tracking_uri}): run the "
            f"pipeline on this data set (tlpipe repro); {listed}") from None


def describe_champions(client, exclude: str | None = None, limit: int = 50) -> list[str]:
    """``NAME vN [class, ...]`` for each registered model with a ``@champion`` (but ``exclude``), by name."""
    from mlflow.exceptions import MlflowException

    found = []
    for model in sorted(client.search_registered_models(max_results=limit), key=lambda m: m.name):
        version = (model.aliases or {}).get(DEFAULT_ALIAS)
        if model.name == exclude or version is None:
            continue
        try:
            classes = read_classes_tag(client.get_model_version(model.name, str(version)).tags or {})
        except MlflowException:
            classes = None
        found.append(f"{model.name} v{version}" + (f" [{', '.join(classes)}]" if classes else ""))
    return found


def resolve_model_uri(model: str | None, root: Path, registered_name: str | None = None) -> str:
    """Turn the ``--model`` option into a URI ``mlflow.pyfunc.load_model`` accepts.

    Args:
        model: None (the registered model's champion), a URI (``models:/...``,
            ``runs:/...``, ``file:/...``) or a local MLflow model folder, absolute,
            relative to the working directory, or relative to ``root``.
        root: Project root.
        registered_name: The registered model name (needed when ``model`` is None).

    Raises:
        ModelNotFoundError: If ``model`` is a path with no ``MLmodel`` file (also a ``LookupError``).
    """
    if model is None:
        if not registered_name:
            raise ValueError("resolve_model_uri: no model and no registered name")
        return f"models:/{registered_name}@{DEFAULT_ALIAS}"
    if URI_PATTERN.match(model):
        return model
    candidates = [Path(model)] if Path(model).is_absolute() else [Path(model), Path(root) / model]
    for folder in candidates:
        if (folder / "MLmodel").is_file():
            return str(folder.resolve())
    raise ModelNotFoundError(
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


def read_base64(path: Path) -> tuple[str | None, str | None]:
    """``(the file's bytes as base64 text, None)``, or ``(None, why it cannot be read)``."""
    try:
        return base64.b64encode(path.read_bytes()).decode("ascii"), None
    except OSError as error:
        return None, f"unreadable file: {error.strerror or error}"


def classify_files(model, files: list[Path], top: int) -> list[dict]:
    """One result dict per file, in order; the model gets the files' bytes, never their paths.

    A served model refuses paths (:func:`tlpipe.serving.classifier.paths_allowed`), and the
    same model answers here: this process reads its own files and sends the bytes.
    """
    read = [read_base64(path) for path in files]
    readable = [path for path, (cell, _) in zip(files, read) if cell is not None]
    rows = iter(())
    if readable:
        cells = pd.Series([cell for cell, _ in read if cell is not None], dtype=object)
        rows = iter(rows_from_output(readable, model.predict(pd.DataFrame({"image": cells})), top))
    return [next(rows) if cell is not None else error_row(str(path), reason)
            for path, (cell, reason) in zip(files, read)]


def load_image_model(model_uri: str):
    """Load a pyfunc model to predict with.

    Skips MLflow's comparison of the installed packages with the model's
    requirements (about a second; the project's own environment made the model).
    """
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(model_uri, suppress_warnings=True)


def run_eagerly(model) -> None:
    """Have a tlpipe image model run its Keras networks eagerly
    (:attr:`tlpipe.serving.classifier.ImageClassifier.eager`): for a few images that skips tracing their
    graphs, 1-3 s. Other pyfunc models are left as they are."""
    try:
        inner = model.unwrap_python_model()
    except Exception:  # noqa: BLE001 - not a Python model: nothing to choose
        return
    if hasattr(inner, "use_eager"):
        inner.use_eager()


def model_classes(model) -> list[str]:
    """The class names of a loaded pyfunc image model: its ``p_<class>`` output columns (signature)."""
    schema = model.metadata.get_output_schema() if model.metadata is not None else None
    return [name[2:] for name in (schema.input_names() if schema is not None else []) if str(name).startswith("p_")]


def classify_images(model_uri: str, inputs: list[str], top: int = 1) -> tuple[list[dict], list[str]]:
    """Classify image files and folders with a pyfunc image model; also return its class names.

    The model is loaded once (only when there is a file to classify) and fed
    batches of :data:`BATCH_SIZE` files (their bytes, :func:`classify_files`); a
    file that cannot be read or decoded is reported in its own row and the others go on.

    Args:
        model_uri: See :func:`resolve_model_uri`.
        inputs: Files and folders.
        top: How many classes to list per file in ``top``.

    Returns:
        One dict per file (inputs that do not exist last): ``path``, ``class``,
        ``probability``, ``top`` (list of ``(class, probability)``), ``error``
        (None when classified); and the model's classes (empty when no model was loaded).
    """
    files, missing = collect_images(inputs)
    rows: list[dict] = []
    classes: list[str] = []
    if files:
        model = load_image_model(model_uri)
        classes = model_classes(model)
        if len(files) <= EAGER_MAX_FILES:
            run_eagerly(model)
        for start in range(0, len(files), BATCH_SIZE):
            rows.extend(classify_files(model, files[start:start + BATCH_SIZE], top))
    return rows + [error_row(item, reason) for item, reason in missing], classes


def predict_images(model_uri: str, inputs: list[str], top: int = 1) -> list[dict]:
    """The rows of :func:`classify_images`."""
    return classify_images(model_uri, inputs, top)[0]


def predict_imagenet_rows(inputs: list[str], backbone: str, weights: str, top: int = 1) -> list[dict]:
    """Top ImageNet classes of a pretrained backbone for image files and folders.

    Rows have the shape of :func:`predict_images`' rows; a file that does not
    exist or cannot be decoded gets an error row and the others go on.

    Raises:
        ModelNotFoundError: If the backbone's weights cannot be used (the message says why).
    """
    from PIL import Image

    from tlpipe.features.backbones import build_backbone, get_spec
    from tlpipe.features.imagenet import decode_top, load_image_for_imagenet, predict_probs

    size = get_spec(backbone).default_size
    files, missing = collect_images(inputs)
    images, good, bad = [], [], []
    for path in files:
        try:
            images.append(load_image_for_imagenet(path, size))
            good.append(path)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            bad.append(error_row(str(path), f"not a readable image: {error}"))
    rows: list[dict] = []
    if good:
        try:
            model = build_backbone(backbone, weights=weights, image_size=size, include_top=True)
        except ValueError as error:
            raise ModelNotFoundError(f"{backbone} with weights {weights!r}: {error}") from None
        for start in range(0, len(good), BATCH_SIZE):
            batch = np.stack(images[start:start + BATCH_SIZE])
            for path, pairs in zip(good[start:start + BATCH_SIZE], decode_top(predict_probs(model, batch), top)):
                rows.append({"path": str(path), "class": pairs[0][0], "probability": pairs[0][1],
                             "top": pairs, "error": None})
    return rows + bad + [error_row(item, reason) for item, reason in missing]


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



def read_classes_tag(tags: Mapping[str, str]) -> list[str] | None:
    """The class names recorded on a model version, or None when absent or unreadable."""
    try:
        classes = json.loads(tags[CLASSES_TAG])
    except (KeyError, ValueError):
        return None
    return [str(c) for c in classes] if isinstance(classes, list) else None
