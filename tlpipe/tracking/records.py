"""What runs record: params, metrics and tags in batches, datasets, a trained model's run and its test metrics."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tlpipe.core.hashing import file_sha256
from tlpipe.core.names import TEST_METRICS
from tlpipe.tracking.tags import MODEL_ID_TAG, MODEL_SHA_TAG, MODEL_TAG

DATASET_CONTEXT_TAG = "mlflow.data.context"


DATASET_CONTEXTS = {"train": "train", "val": "validation", "test": "test"}
"""Store split -> the MLflow dataset input context it is logged with."""




def log_params(client, run_id: str, params: Mapping[str, object]) -> None:
    """Log params on a run in batches of 100 (MLflow's limit per call)."""
    from mlflow.entities import Param

    items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def log_metrics(client, run_id: str, metrics: Mapping[str, float], step: int = 0, model_id: str | None = None,
                dataset=None) -> None:
    """Log numeric metrics on a run in one batch (also on a logged model, and linked to a dataset, when given)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(str(k), float(v), now, int(step), model_id=model_id, run_id=run_id,
                    dataset_name=dataset.name if dataset is not None else None,
                    dataset_digest=dataset.digest if dataset is not None else None)
             for k, v in metrics.items() if v is not None]
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start:start + 1000])


def set_tags(client, run_id: str, tags: Mapping[str, object]) -> None:
    """Set tags on a run in one batch."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(str(k), str(v)[:5000]) for k, v in tags.items()])


def model_id_from_uri(uri: str) -> str | None:
    """The logged-model id of a ``models:/<model id>`` URI (None for other URIs)."""
    if uri.startswith("models:/") and "/" not in uri[len("models:/"):]:
        return uri[len("models:/"):]
    return None


def dataset_prefix(source: str) -> str:
    """Short name of a data source for dataset names: the folder name, or ``elpv``."""
    text = str(source).rstrip("/\\")
    return (Path(text).name or text) if text else "data"


def split_dataset(store_dir: Path, split: str, source: str):
    """One store split as an MLflow dataset (``mlflow.data.from_pandas`` of its manifest rows).

    Name ``<source>-<split>``; digest: the first 12 hex digits of the SHA-256 of the
    split's (class, file hash) rows, so it names exactly these images; profile: the
    row count. Rows: ``relpath``, ``class_name`` (the targets), ``sha256``.
    """
    import mlflow.data

    from tlpipe.data import store

    manifest = store.load_manifest(Path(store_dir))
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    rows = rows[["relpath", "class_name", "sha256"]].astype(str)  # text only: no integer-schema hints
    digest = hashlib.sha256("".join(f"{c},{s}\n" for c, s in zip(rows["class_name"], rows["sha256"]))
                            .encode()).hexdigest()[:12]
    with warnings.catch_warnings():  # MLflow registers two local-file source classes; either is right
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
        return mlflow.data.from_pandas(rows, source=str(Path(store_dir).resolve() / store.MANIFEST),
                                       targets="class_name", name=f"{dataset_prefix(source)}-{split}",
                                       digest=digest)


def log_datasets(client, run_id: str, store_dir: Path, source: str, splits: tuple[str, ...]) -> dict:
    """Log store splits as dataset inputs of a run (context train/validation/test, class counts as tags).

    Returns:
        ``{split: dataset}``.
    """
    from mlflow.entities import DatasetInput, InputTag

    datasets, inputs = {}, []
    for split in splits:
        dataset = split_dataset(store_dir, split, source)
        counts = dataset.df["class_name"].value_counts().sort_index()
        tags = [InputTag(DATASET_CONTEXT_TAG, DATASET_CONTEXTS[split]), InputTag("tlpipe.images", str(len(dataset.df))),
                *[InputTag(f"tlpipe.count.{name}", str(int(n))) for name, n in counts.items()]]
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags))
        datasets[split] = dataset
    client.log_inputs(run_id, datasets=inputs)
    return datasets


@dataclass(frozen=True)
class ModelRunRef:
    """Where a trained model lives in MLflow: its model run and its logged model."""

    name: str
    run_id: str
    model_id: str | None

    @property
    def model_uri(self) -> str | None:
        """``models:/<model id>`` (loads the image-taking pyfunc), or None."""
        return f"models:/{self.model_id}" if self.model_id else None


def find_model_run(client, experiment_id: str, model_path: Path) -> ModelRunRef | None:
    """The latest FINISHED model run that logged exactly this model file (matched by SHA-256), or None."""
    sha = file_sha256(Path(model_path))
    runs = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`{MODEL_SHA_TAG}` = '{sha}' and attributes.status = 'FINISHED'")
    if not runs:
        return None
    run = runs[0]
    outputs = run.outputs.model_outputs if run.outputs else []
    model_id = outputs[-1].model_id if outputs else run.data.tags.get(MODEL_ID_TAG)
    return ModelRunRef(run.data.tags.get(MODEL_TAG, Path(model_path).stem), run.info.run_id, model_id)


def log_test_metrics(client, experiment_id: str, model_path: Path, metrics: Mapping[str, float | None],
                     store_dir: Path, source: str) -> ModelRunRef | None:
    """Log a model's test metrics onto its model run and its logged model, linked to the test dataset.

    The test split is logged as a dataset input (context ``test``) of the model run;
    each metric ``m`` of :data:`TEST_METRICS` present in ``metrics`` is logged as
    ``test_<m>`` on the run and on its logged model, with the test dataset's name and
    digest; all of ``metrics`` (per-class values too) goes to the run's
    ``test/metrics.json``. Idempotent: a metric the logged model already holds with the same value on
    the same dataset is not logged again (an evaluate rerun adds nothing).

    Args:
        client: An ``MlflowClient``.
        experiment_id: The project's experiment.
        model_path: The model file (``.joblib``/``.keras``) the run logged.
        metrics: ``{"accuracy": ..., ...}`` as computed by the evaluate stage.
        store_dir: The image store (for the test dataset).
        source: ``data.source`` (for the dataset name).

    Returns:
        The model run reference, or None when no run logged this file (nothing logged).
    """
    ref = find_model_run(client, experiment_id, model_path)
    if ref is None:
        return None
    dataset = log_datasets(client, ref.run_id, store_dir, source, ("test",))["test"]
    held: set[tuple[str, float, str | None]] = set()
    if ref.model_id:
        logged = client.get_logged_model(ref.model_id).metrics or []
        held = {(m.key, round(m.value, 12), m.dataset_digest) for m in logged}
    new = {f"test_{name}": float(metrics[name]) for name in TEST_METRICS if metrics.get(name) is not None}
    new = {key: value for key, value in new.items() if (key, round(value, 12), dataset.digest) not in held}
    if new:
        log_metrics(client, ref.run_id, new, model_id=ref.model_id, dataset=dataset)
    client.log_dict(ref.run_id, json.loads(json.dumps(dict(metrics), default=str)), "test/metrics.json")
    return ref
