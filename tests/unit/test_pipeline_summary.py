"""The pipeline's Prefect artifacts' content: comparison rows, promotion decision, MLflow run links."""

from __future__ import annotations

from pathlib import Path

from tlpipe.evaluation.pipeline_summary import (
    RunLink,
    artifact_key,
    comparison_rows,
    links_markdown,
    merge_metrics,
    promotion_markdown,
)


def test_comparison_rows_spell_out_short_keys_and_sort_best_first(monkeypatch) -> None:
    monkeypatch.setenv("TLPIPE_MLFLOW_UI_URL", "http://ui:5000/")
    metrics = merge_metrics({"frozen": {"acc": 0.7}, "concat": {"acc": 0.9}},
                            {"frozen": {"bal_acc": 0.65, "f1": 0.6, "auc": 0.8}, "concat": {"bal_acc": 0.9}})
    rows = comparison_rows(metrics, {"concat": RunLink("concat", "r1", "7")})
    assert [row["model"] for row in rows] == ["concat", "frozen"]
    assert rows[1] == {"model": "frozen", "test_accuracy": 0.7, "test_balanced_accuracy": 0.65,
                       "test_f1_macro": 0.6, "test_roc_auc": 0.8}
    assert rows[0]["mlflow_run"] == "http://ui:5000/#/experiments/7/runs/r1?workflowType=machine_learning"


def test_promotion_markdown_states_the_decision_and_reason() -> None:
    text = promotion_markdown({"promoted": False, "reason": "not promoted: 0.90 does not beat v2 (0.95)",
                               "version": "3", "champion_version": "2"})
    assert "**not promoted**: not promoted: 0.90 does not beat v2 (0.95)" in text
    assert "| champion_version | 2 |" in text
    assert "No decision recorded" in promotion_markdown({})
    scores = promotion_markdown({"promoted": True, "reason": "r", "test_accuracy": 0.75, "champion_accuracy": 0.6375})
    assert "| test_accuracy | 0.7500 |" in scores and "| champion_accuracy | 0.6375 |" in scores  # as in the report


def test_links_and_keys(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TLPIPE_MLFLOW_UI_URL", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    report = tmp_path / "report.html"
    report.write_text("<html/>")
    text = links_markdown(RunLink("pipeline", "p", "1"), [RunLink("svm", "s", "1")], {"svm_pixels": RunLink(
        "svm_pixels", "m", "1")}, report)
    assert "[p](http://tracking:5000/#/experiments/1/runs/p?workflowType=machine_learning)" in text
    assert ('[Compare the 1 models in MLflow](http://tracking:5000/#/compare-runs?runs=["m"]&experiments=["1"]'
            '&workflowType=machine_learning)') in text
    assert "stage svm: [s](" in text and "model svm_pixels: [m](" in text and report.as_uri() in text
    assert f"]({report.as_uri()})" not in text  # as text to copy: Prefect's UI does not open file:// links
    assert artifact_key("My Project_2", "model-comparison") == "my-project-2-model-comparison"
