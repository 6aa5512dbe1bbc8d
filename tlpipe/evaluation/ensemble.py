"""The evaluate stage's ``ensemble``: the best models' calibrated probabilities, averaged; kept only if it helps.

The decision reads the train and validation splits only; the test split is
scored afterwards, for information, exactly as for every other model.

1. **Members.** The models with a selection score and class probabilities,
   ranked by the lower end of the 95 % Wilson interval of that score (the
   gate's ranking, :func:`tlpipe.evaluation.evaluate.selection_bounds`; ties in
   :data:`tlpipe.core.names.MODEL_NAMES` order). One *try* per ``k = 2..K``: the
   top ``k``.
2. **Calibration.** An SVM's probabilities are Platt-scaled already (a sigmoid
   fitted on out-of-fold decision values of the train split, by the svm
   stage) and used as they are. A network's softmax is temperature-scaled
   (:mod:`tlpipe.serving.calibration`) with ``T`` fitted on the validation split; on
   that split its probabilities are cross-fitted (each fold scaled with the
   ``T`` fitted on the other folds), so a try's validation score never includes
   the fit of its own calibration. The saved ensemble (and the test split) use
   ``T`` fitted on all validation images.
3. **Scoring.** A try averages its members' calibrated probabilities with equal
   weights and predicts the most probable class. It is scored on the
   validation split, the one split no member was fitted on: accuracy, log-loss
   and the Wilson lower bound with ``n`` = validation images.
4. **Keep rule.** The best try (highest bound, then lowest log-loss, then fewer
   members) becomes the model ``ensemble`` only if (a) its bound beats the best
   single model's selection bound, and (b) its validation accuracy beats every
   single model's accuracy on the same validation images. The networks picked
   their epoch on the validation split, so their validation accuracy, and any
   try holding one, is slightly optimistic. (b) turns that optimism against the
   ensemble: it must beat the networks' own optimistic accuracies on the very
   images they were selected on, not only the SVMs' cross-validated accuracy on
   train. When kept, its selection score is that validation accuracy, so it
   joins the candidates with the highest bound and is put forward to the gate.

Outputs in the evaluate report folder: ``ensemble.csv`` (every try: members,
validation accuracy, log-loss and bound, test accuracy for information, kept)
and, when kept, ``ensemble.json`` (the model: members, the SHA-256 of each
member's file, temperatures, its validation scores). The logged MLflow pyfunc
holds every member (:func:`tlpipe.tracking.logged_models.log_ensemble_classifier`) and averages
their calibrated probabilities, so it is registered and served like any model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.core.hashing import file_sha256
from tlpipe.core.names import ENSEMBLE_MODEL, MODEL_NAMES, model_family
from tlpipe.data import store
from tlpipe.evaluation.choice import selection_bounds, wilson_lower
from tlpipe.evaluation.evaluate import predict_model
from tlpipe.evaluation.metrics import check_predictions, compute_metrics, round_float
from tlpipe.render.formats import format_score
from tlpipe.serving.calibration import (
    average_probabilities,
    crossfit_temperature,
    fit_temperature,
    log_loss,
    scale_temperature,
)

TRIES_FILE = "ensemble.csv"
SPEC_FILE = "ensemble.json"
TRY_COLUMNS = ["members", "k", "val_accuracy", "val_log_loss", "val_bound", "test_accuracy", "kept"]
RULE = ("top-k by selection bound (k = 2..K); SVMs: Platt probabilities, networks: temperature-scaled on val "
        "(cross-fitted); equal-weight mean; kept if its val Wilson bound beats the best single model's selection "
        "bound and its val accuracy beats every single model's")


def rank_members(bounds: dict[str, float], predictions: dict[str, tuple]) -> list[str]:
    """The models that can join an ensemble, best first: a selection bound and probabilities.

    Args:
        bounds: Each model's selection bound (:func:`tlpipe.evaluation.evaluate.selection_bounds`).
        predictions: ``{model: (labels, probabilities or None)}`` on any split.

    Returns:
        Names by bound, highest first; ties in :data:`MODEL_NAMES` order.
    """
    usable = [name for name in MODEL_NAMES if name in bounds and name in predictions
              and predictions[name][1] is not None]
    return sorted(usable, key=lambda name: -bounds[name])  # stable: ties keep MODEL_NAMES order


def calibrate_members(val_proba: dict[str, np.ndarray], y_val: np.ndarray,
                      ) -> tuple[dict[str, np.ndarray], dict[str, float | None]]:
    """Each member's calibrated validation probabilities and the temperature its saved form uses.

    SVMs: their (Platt) probabilities as they are, temperature None. Networks:
    ``T`` fitted on all of ``y_val``; the validation probabilities returned are
    cross-fitted (:func:`tlpipe.serving.calibration.crossfit_temperature`).
    """
    calibrated, temperatures = {}, {}
    for name, proba in val_proba.items():
        if model_family(name) == "network":
            temperatures[name] = round(fit_temperature(proba, y_val), 4)
            calibrated[name] = crossfit_temperature(proba, y_val)
        else:
            temperatures[name] = None
            calibrated[name] = np.asarray(proba, dtype=np.float64)
    return calibrated, temperatures


def apply_temperatures(proba: dict[str, np.ndarray], temperatures: dict[str, float | None]) -> dict[str, np.ndarray]:
    """Calibrated probabilities on new images: each model scaled by its temperature (None: as they are)."""
    return {name: np.asarray(p, dtype=np.float64) if temperatures.get(name) is None
            else scale_temperature(p, temperatures[name]) for name, p in proba.items()}


def score_try(members: list[str], calibrated: dict[str, np.ndarray], y_val: np.ndarray) -> dict:
    """One try on the validation split: its members, accuracy, log-loss and Wilson bound (n = validation images)."""
    proba = average_probabilities([calibrated[name] for name in members])
    accuracy = round_float(np.mean(proba.argmax(axis=1) == y_val))
    return {"members": list(members), "k": len(members), "val_accuracy": accuracy,
            "val_log_loss": round_float(log_loss(proba, y_val)),
            "val_bound": round_float(wilson_lower(accuracy, len(y_val)))}


def choose_try(tries: list[dict], best_bound: float, best_val_accuracy: float) -> tuple[int | None, str]:
    """The keep rule: which try becomes ``ensemble`` (or None), and why. Reads validation scores only.

    Args:
        tries: :func:`score_try` results.
        best_bound: The best single model's selection bound.
        best_val_accuracy: The best single model's accuracy on the validation split.
    """
    passing = [i for i, t in enumerate(tries) if t["val_bound"] > best_bound and t["val_accuracy"] > best_val_accuracy]
    if not tries:
        return None, "no try: fewer than two models with a selection score and probabilities"
    if not passing:
        top = max(range(len(tries)), key=lambda i: (tries[i]["val_bound"], -tries[i]["val_log_loss"], -tries[i]["k"]))
        return None, (f"dropped: the best try ({' + '.join(tries[top]['members'])}) has validation accuracy "
                      f"{format_score(tries[top]['val_accuracy'])} (bound {format_score(tries[top]['val_bound'])}); "
                      f"it needed a bound above {format_score(best_bound)} (best single model) and an accuracy above "
                      f"{format_score(best_val_accuracy)} (best single model on the same validation images)")
    kept = max(passing, key=lambda i: (tries[i]["val_bound"], -tries[i]["val_log_loss"], -tries[i]["k"]))
    return kept, (f"kept: {' + '.join(tries[kept]['members'])}, validation accuracy "
                  f"{format_score(tries[kept]['val_accuracy'])} (bound {format_score(tries[kept]['val_bound'])}) "
                  f"against the best single model's bound {format_score(best_bound)} and validation accuracy "
                  f"{format_score(best_val_accuracy)}")


def plan_ensemble(val_predictions: dict[str, tuple], y_val: np.ndarray, bounds: dict[str, float]) -> dict:
    """Every try and the keep decision, from the selection bounds and the validation split only.

    Args:
        val_predictions: ``{model: (labels, probabilities)}`` on the validation split.
        y_val: Validation labels.
        bounds: Selection bounds of the single models.

    Returns:
        JSON-ready: ``tries`` (each with ``kept``), ``kept`` (bool), ``members`` and
        ``temperatures`` of the kept ensemble (empty when dropped), ``ranked`` (every
        candidate member, best first) with ``all_temperatures``, ``reason``,
        ``best_single``, ``best_single_bound``, ``best_single_val_accuracy``,
        ``val_images`` and, when kept, ``val_accuracy``, ``val_log_loss``, ``val_bound``.
    """
    y_val = np.asarray(y_val, dtype=np.int64)
    ranked = rank_members(bounds, val_predictions) if len(y_val) else []
    calibrated, temperatures = calibrate_members({name: val_predictions[name][1] for name in ranked}, y_val)
    tries = [score_try(ranked[:k], calibrated, y_val) for k in range(2, len(ranked) + 1)]
    singles = {name: round_float(np.mean(np.asarray(val_predictions[name][0]) == y_val)) for name in ranked}
    best = ranked[0] if ranked else None
    best_val = max(singles.values(), default=0.0)
    index, reason = choose_try(tries, bounds[best] if best else 0.0, best_val)
    if not len(y_val):
        reason = "no try: the validation split is empty"
    for position, entry in enumerate(tries):
        entry["kept"] = position == index
    members = tries[index]["members"] if index is not None else []
    plan = {"tries": tries, "kept": index is not None, "members": members,
            "temperatures": {name: temperatures[name] for name in members}, "ranked": ranked,
            "all_temperatures": temperatures, "reason": reason, "best_single": best,
            "best_single_bound": bounds[best] if best else None, "best_single_val_accuracy": best_val,
            "single_val_accuracy": singles, "val_images": int(len(y_val))}
    if index is not None:
        plan.update({key: tries[index][key] for key in ("val_accuracy", "val_log_loss", "val_bound")})
    return plan


def score_on_test(plan: dict, test_predictions: dict[str, tuple], y_test: np.ndarray) -> np.ndarray | None:
    """Add each try's test accuracy (information only, after the decision); the kept ensemble's probabilities.

    Returns:
        The kept ensemble's test probabilities (n, n_classes), or None when it was dropped.
    """
    calibrated = apply_temperatures({name: test_predictions[name][1] for name in plan["ranked"]},
                                    plan["all_temperatures"])
    kept = None
    for entry in plan["tries"]:
        proba = average_probabilities([calibrated[name] for name in entry["members"]])
        entry["test_accuracy"] = round_float(np.mean(proba.argmax(axis=1) == np.asarray(y_test)))
        if entry["kept"]:
            kept = proba
    return kept


def add_ensemble(found: dict[str, Path], store_dir: Path, features_dir: Path, pixel_size: int,
                 predictions: dict[str, tuple], metrics: dict[str, dict], scores: dict[str, float],
                 split_sizes: dict[str, int], y_test: np.ndarray, classes: list[str]) -> dict:
    """Try the ensembles of the evaluated models; when one is kept, add ``ensemble`` to the stage's results.

    Predicts the validation split with every candidate member, plans the tries
    (:func:`plan_ensemble`: no test data), then scores them on the test split.
    When kept, ``predictions``, ``metrics`` and ``scores`` (its validation
    accuracy: ranked with ``n`` = validation images) gain an ``ensemble`` entry,
    in place.

    Args:
        found: ``{model: file}`` of the evaluated models.
        store_dir: The image store.
        features_dir: The features folder (SVM inputs).
        pixel_size: Side of ``svm_pixels``'s inputs.
        predictions: ``{model: (labels, probabilities)}`` on the test split.
        metrics: ``{model: test metrics}``.
        scores: ``{model: selection score}``.
        split_sizes: Images per split (``train``, ``val``).
        y_test: Test labels.
        classes: Class names.

    Returns:
        :func:`plan_ensemble`'s plan with test accuracies, plus ``files`` (each
        member's file name, family and SHA-256) when kept.
    """
    bounds = selection_bounds(scores, split_sizes)
    y_val = store.split_labels(Path(store_dir), "val")
    ranked = rank_members(bounds, predictions)
    val = {}
    if len(ranked) >= 2 and len(y_val):
        for name in ranked:
            val[name] = predict_model(name, found[name], store_dir, features_dir, pixel_size, "val")
            check_predictions(name, *val[name], len(y_val), len(classes))
    plan = plan_ensemble(val, y_val, bounds)
    kept = score_on_test(plan, predictions, y_test)
    if kept is not None:
        predictions[ENSEMBLE_MODEL] = (kept.argmax(axis=1), kept)
        metrics[ENSEMBLE_MODEL] = compute_metrics(y_test, kept.argmax(axis=1), kept, classes)
        scores[ENSEMBLE_MODEL] = plan["val_accuracy"]
        plan["files"] = {name: {"file": found[name].name, "family": model_family(name),
                                "sha256": file_sha256(found[name])} for name in plan["members"]}
    return plan


def spec_path(out_dir: Path) -> Path:
    """Where the kept ensemble is saved: ``<out_dir>/ensemble.json`` (the file its MLflow run is matched by)."""
    return Path(out_dir) / SPEC_FILE


def build_spec(plan: dict, classes: list[str]) -> dict:
    """The saved ensemble: members, their files, temperatures, classes and its validation scores."""
    return {"model": ENSEMBLE_MODEL, "members": plan["members"], "temperatures": plan["temperatures"],
            "files": plan["files"], "classes": list(classes), "val_images": plan["val_images"],
            **{key: plan[key] for key in ("val_accuracy", "val_log_loss", "val_bound")}, "rule": RULE}


def tries_frame(plan: dict) -> pd.DataFrame:
    """``ensemble.csv``: one row per try, members joined by ``+``."""
    rows = [{**entry, "members": "+".join(entry["members"])} for entry in plan["tries"]]
    return pd.DataFrame(rows, columns=TRY_COLUMNS)


def write_outputs(out_dir: Path, plan: dict, classes: list[str]) -> None:
    """Write ``ensemble.csv`` and, when kept, ``ensemble.json``; otherwise remove an earlier run's ensemble files."""
    out_dir = Path(out_dir)
    store.write_csv(out_dir / TRIES_FILE, tries_frame(plan))
    if plan["kept"]:
        store.write_json(spec_path(out_dir), build_spec(plan, classes))
        return
    for stale in (spec_path(out_dir), out_dir / f"confusion_{ENSEMBLE_MODEL}.png"):
        stale.unlink(missing_ok=True)


def run_params(plan: dict, classes: list[str], data_hash: str) -> dict[str, object]:
    """Params of the ensemble's MLflow model run (shared keys as the trained models' runs, plus ``ensemble.*``)."""
    params = {"model": ENSEMBLE_MODEL, "family": "ensemble", "model_kind": "calibrated_average",
              "members": ",".join(plan["members"]), "data_hash": data_hash, "classes": ",".join(classes),
              "n_classes": len(classes), "n_val": plan["val_images"], "ensemble.rule": RULE}
    params.update({f"ensemble.temperature.{name}": "none" if value is None else value
                   for name, value in plan["temperatures"].items()})
    return params


def report_section(result: dict):
    """The report's table of every try (:class:`tlpipe.render.html.TableSection`), or None when nothing was tried."""
    from tlpipe.render.html import Table, TableSection

    plan = result.get("ensemble")
    if not plan or not plan.get("tries"):
        return None
    columns = {"members": "members", "k": "models", "val_accuracy": "validation accuracy",
               "val_log_loss": "validation log-loss", "val_bound": "validation lower bound",
               "test_accuracy": "test accuracy (information only)", "kept": "kept"}
    rows = [{**entry, "members": " + ".join(entry["members"])} for entry in plan["tries"]]
    kept = [row["members"] for row in rows if row["kept"]]
    note = (f"Averages of the best models' calibrated probabilities, scored on {plan['val_images']} validation "
            f"images; chosen without the test split. {plan['reason'][0].upper()}{plan['reason'][1:]}. Rule: {RULE}.")
    return TableSection("ensemble", "Ensemble tries", Table(columns, rows, highlight=kept), note)


def add_report_section(data, result: dict):
    """The report's data (:class:`tlpipe.render.html.ReportData`) with :func:`report_section` appended, when any."""
    from dataclasses import replace

    extra = report_section(result)
    return data if extra is None else replace(data, sections=[*data.sections, extra])
