"""`tlpipe compare` core: params compare by value, not spelling; across DVC and MLflow only shared keys differ."""

from __future__ import annotations

from tlpipe.compare import ExperimentSummary, canonical, compare_table, resolved_params


def test_canonical_numbers_compare_by_value() -> None:
    assert canonical("10.0") == canonical("10") == canonical("1e1") == "10"
    assert canonical("-3.0") == canonical("-3") and canonical("0.001") == canonical("1e-3")
    assert canonical("True") == "True" and canonical("native") == "native" and canonical(None) is None
    assert canonical("0.5") != canonical("0.50001")


def test_dvc_params_are_resolved_as_the_stages_saw_them() -> None:
    resolved = resolved_params({"data": {"image_size": "native"}, "features": {"backbone": "efficientnet_lite2"}})
    assert resolved["data"]["image_size"] == 260 and resolved["svm"]["c_grid"]["num"] == 13  # defaults filled
    assert resolved_params({"old_section": {"x": 1}}) == {"old_section": {"x": 1}}  # unparseable: as written


def test_same_run_from_dvc_and_mlflow_shows_no_false_differences() -> None:
    dvc = ExperimentSummary("exp", "exp (DVC)", {"frozen": 0.9},
                            {"svm.c_grid.start": "-3.0", "finetune.epochs": "20", "data.image_size": "224",
                             "schedule.cron": "0 3 * * *"}, "dvc")
    mlflow = ExperimentSummary("0" * 32, "run (MLflow)", {"frozen": 0.9},
                               {"svm.c_grid.start": "-3", "finetune.epochs": "20.0", "data.image_size": "224"},
                               "mlflow")
    text = compare_table(dvc, mlflow)
    assert "no params differ" in text and "schedule.cron" not in text
    changed = ExperimentSummary("e2", "e2 (DVC)", {"frozen": 0.8},
                                {"svm.c_grid.start": "-2", "finetune.epochs": "20", "data.image_size": "224",
                                 "schedule.cron": "0 4 * * *"}, "dvc")
    text = compare_table(dvc, changed)
    assert "svm.c_grid.start" in text and "schedule.cron" in text and "finetune.epochs" not in text
    assert "-0.1000" in text  # B - A test accuracy
