"""Trained models logged into an MLflow run as their image-taking pyfunc (:mod:`tlpipe.serving.packaging`).

Each function takes the MlflowClient and the run id: mlflow.pyfunc.log_model logs only into the active
run, so :func:`log_pyfunc` makes the run active for that one call (:func:`tlpipe.tracking.fluent.active_run`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tlpipe.serving.packaging import (
    ensemble_artifacts,
    keras_artifacts,
    model_options,
    svm_artifacts,
    trained_artifacts,
)
from tlpipe.tracking.fluent import active_run


class UncheckedPyfunc:
    """``mlflow.pyfunc`` as the flavor of ``mlflow.models.Model.log``, without MLflow's serving-input check.

    ``mlflow.pyfunc.log_model`` loads every model it logs once more and predicts its input example, and only
    warns when that fails: most of the time logging takes (on this machine 11.9 s against
    0.9 s for the tiny pipeline's three networks). ``Model.log`` skips that check when its flavor is given
    ``validate_serving_input=False`` (what MLflow's transformers flavor does for models too large to load);
    ``mlflow.pyfunc.save_model`` does not take the argument, so this flavor drops it. What is logged is the
    same: the model, its signature and input example, flavor ``python_function``. That logged models load and
    predict is tested (tests/unit/test_pyfunc.py).
    """

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(path, mlflow_model, validate_serving_input: bool = True, **kwargs):
        """``mlflow.pyfunc.save_model`` with every argument but ``validate_serving_input``."""
        import mlflow.pyfunc

        return mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)


def log_pyfunc(client, run_id: str, name: str, classes: list[str], artifacts: dict[str, str], **log_options):
    """Log a pyfunc model from code (:func:`tlpipe.serving.packaging.model_options`) into run ``run_id``.

    The one fluent call of model logging: ``Model.log`` (what ``mlflow.pyfunc.log_model`` calls, here with
    :class:`UncheckedPyfunc`) logs into the active run, so the run is made active for it
    (:func:`tlpipe.tracking.fluent.active_run`).

    Returns:
        The ``ModelInfo``.
    """
    from mlflow.models import Model

    with active_run(client, run_id):
        return Model.log(artifact_path=None, name=name, flavor=UncheckedPyfunc, flavor_name="pyfunc.ModelFromCode",
                         validate_serving_input=False, **model_options(classes, artifacts), **log_options)


def log_keras_classifier(client, run_id: str, name: str, keras_model_path: Path, classes: list[str], image_size: int,
                         resize_mode: str, registered_model_name: str | None = None, **log_options):
    """Log a network as a pyfunc model in run ``run_id`` (see :func:`tlpipe.serving.packaging.save_keras_classifier`).

    Args:
        client: An ``MlflowClient`` on the run's store.
        run_id: The run the model is logged into.
        log_options: More ``mlflow.pyfunc.log_model`` arguments (``step``, ``tags``,
            ``params``, ``model_type``) for the logged model.

    Returns:
        The ``ModelInfo``; ``model_uri`` (``models:/<model id>``) loads it back.
    """
    with tempfile.TemporaryDirectory(prefix="tlpipe-pyfunc-") as folder:
        artifacts = keras_artifacts(Path(folder), keras_model_path, classes, image_size, resize_mode)
        return log_pyfunc(client, run_id, name, classes, artifacts, registered_model_name=registered_model_name,
                          **log_options)


def log_svm_classifier(client, run_id: str, name: str, svm_path: Path, feature: str, classes: list[str],
                       image_size: int, resize_mode: str, backbone: str, weights: str | None, pixel_size: int,
                       registered_model_name: str | None = None, extractor_path: Path | None = None,
                       **log_options):
    """Log an SVM with its input preparation as a pyfunc model in run ``run_id``.

    Args:
        name: Model name in the run.
        svm_path: The joblib'd ``SVC``.
        feature: ``final``, ``concat`` (final then mid) or ``pixels``.
        classes: Class names in label order.
        image_size: Training image size (the store's).
        resize_mode: Training resize mode.
        backbone: Backbone that made the features (ignored for ``pixels``).
        weights: Its weights, as the features stage used them (None: random init).
        pixel_size: Side of the raw-pixel images (``pixels`` only).
        registered_model_name: Also register the model under this name.
        extractor_path: The extractor (``.keras``, uint8 images -> {"final",
            "mid"}) the features were made with; default: rebuild it from
            ``backbone`` and ``weights`` (exact for ImageNet weights or a
            weights file, not for random init).
        log_options: More ``mlflow.pyfunc.log_model`` arguments (``step``, ``tags``,
            ``params``, ``model_type``) for the logged model.

    Returns:
        The ``ModelInfo``.
    """
    with tempfile.TemporaryDirectory(prefix="tlpipe-pyfunc-") as folder:
        artifacts = svm_artifacts(Path(folder), svm_path, feature, classes, image_size, resize_mode,
                                  backbone, weights, pixel_size, extractor_path)
        return log_pyfunc(client, run_id, name, classes, artifacts, registered_model_name=registered_model_name,
                          **log_options)


def log_trained_model(client, run_id: str, name: str, model_path: Path, store_dir: Path,
                      features_dir: Path | None, params, **log_options):
    """Log one of the pipeline's trained models as its image-taking pyfunc, in run ``run_id``.

    Picks the SVM or network logger from the model's family
    (:func:`tlpipe.core.names.model_family`); an SVM on features gets the features
    stage's saved extractor from ``features_dir``.

    Args:
        name: A name from :data:`tlpipe.core.names.MODEL_NAMES`.
        model_path: Its ``.joblib`` or ``.keras`` file.
        store_dir: The image store (class names and image size).
        features_dir: The features folder (SVMs on features only).
        params: The pipeline's :class:`tlpipe.core.params.Params`.
        log_options: See :func:`log_keras_classifier`.

    Returns:
        The ``ModelInfo``.
    """
    from tlpipe.data import store

    with tempfile.TemporaryDirectory(prefix="tlpipe-pyfunc-") as folder:
        artifacts = trained_artifacts(Path(folder), name, model_path, store_dir, features_dir, params)
        return log_pyfunc(client, run_id, name, store.load_classes(store_dir), artifacts, **log_options)


def log_ensemble_classifier(client, run_id: str, name: str, members: dict[str, Path],
                            temperatures: dict[str, float | None], store_dir: Path, features_dir: Path | None,
                            params, **log_options):
    """Log the evaluate stage's ensemble as one pyfunc model, in run ``run_id`` (:func:`ensemble_artifacts`).

    Returns:
        The ``ModelInfo``.
    """
    from tlpipe.data import store

    with tempfile.TemporaryDirectory(prefix="tlpipe-pyfunc-") as folder:
        artifacts = ensemble_artifacts(Path(folder), members, temperatures, store_dir, features_dir, params)
        return log_pyfunc(client, run_id, name, store.load_classes(store_dir), artifacts, **log_options)
