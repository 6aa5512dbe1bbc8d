"""`tlpipe compare` core: params compare by value, not spelling; across DVC and MLflow only shared keys differ."""

from __future__ import annotations

from tlpipe.evaluation.compare import ExperimentSummary, canonical, compare_table, resolved_params


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


def test_compare_names_both_tasks_and_says_when_class_sets_differ() -> None:
    """Issue 19: a 2-class and a 4-class run are not compared as if chance were the same."""
    two = ExperimentSummary("a", "a (DVC)", {"frozen": 0.9}, {}, "dvc", "elpv-defect", ["defective", "functional"])
    four = ExperimentSummary("b", "b (DVC)", {"frozen": 0.7}, {}, "dvc", "flowers-daisy-iris-rose-tulip",
                             ["daisy", "iris", "rose", "tulip"])
    text = compare_table(two, four)
    assert "A: a (DVC), task elpv-defect, classes [defective, functional]" in text
    assert "B: b (DVC), task flowers-daisy-iris-rose-tulip, classes [daisy, iris, rose, tulip]" in text
    assert "the class sets differ" in text and "A 0.5000 = 1/2" in text and "B 0.2500 = 1/4" in text
    same = ExperimentSummary("c", "c (DVC)", {"frozen": 0.8}, {}, "dvc", "elpv-defect", ["functional", "defective"])
    assert "differ" not in compare_table(two, same).split("\n\n")[0]
    other_data = ExperimentSummary("d", "d (DVC)", {"frozen": 0.8}, {}, "dvc", "cells-defective-functional",
                                   ["defective", "functional"])
    assert "different tasks (elpv-defect, cells-defective-functional)" in compare_table(two, other_data)


def test_a_dvc_experiment_knows_its_task(tmp_path) -> None:
    import yaml

    from tlpipe.evaluation.compare import load_dvc_experiment

    for name in ("ants", "bees"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        (tmp_path / "photos" / name / "a.jpg").write_bytes(b"x")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": str(tmp_path / "photos")}}))
    summary = load_dvc_experiment("workspace", tmp_path)
    assert (summary.task, summary.classes) == ("photos-ants-bees", ["ants", "bees"])


DVC_CSV = """\
Experiment,rev,typ,Created,parent,State,Executor,svm_features.acc,svm_concat.acc,svm_pixels.acc,frozen.acc,\
concat.acc,finetuned.acc,data.source,data.max_per_class
,workspace,baseline,,,,,0.9608,0.9542,0.5294,0.9608,0.9608,0.9281,/home/someone/datasets/hymenoptera_data,
,main,baseline,2026-12-03T08:10:10,,,,0.8187,0.8187,0.7562,0.75,0.75,0.8313,elpv,400
lobar-gaps,fa3bdb8,branch_base,2026-12-03T08:20:12,,,,0.9608,0.9542,0.5294,0.9608,0.9608,0.9281,\
/home/someone/datasets/hymenoptera_data,
"""


def test_exps_table_fits_160_columns_with_six_models() -> None:
    """`make exps` (tlpipe exps): a column per model headed by its name, 4 decimals, the params that vary."""
    from tlpipe.evaluation.compare import format_exps

    lines = format_exps(DVC_CSV).splitlines()
    assert lines[0].split() == ["experiment", "svm_features", "svm_concat", "svm_pixels", "frozen", "concat",
                                "finetuned", "data.source", "data.max_per_class"]
    assert lines[2].split()[:2] == ["workspace", "0.9608"] and lines[3].split()[-1] == "400"
    assert lines[4].startswith("  lobar-gaps ") and "0.7500" in lines[3]
    assert max(len(line) for line in lines) <= 160
