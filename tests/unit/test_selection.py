"""The select stage's core: candidates, the budgeted race plan, the selection order, the choice by train CV."""

from __future__ import annotations

import numpy as np
import pytest

from tlpipe.core.params import NATIVE_SIZES, parse_params
from tlpipe.train import selection
from tlpipe.train.selection import Candidate, ProbeResult


def result(name: str, cv: float, round_index: int = 0, images: int = 50) -> ProbeResult:
    backbone, side = name.split("@")
    candidate = Candidate(f"efficientnet_{backbone}", int(side))
    return ProbeResult(name, candidate.backbone, candidate.image_size, round_index, images, cv, 0.01, 1.0,
                       round(candidate.gflops, 4), 0.0, 0.0)


def test_native_gflops_match_a_count_of_the_built_networks() -> None:
    from tlpipe.evaluation.compare_backbones import backbone_gflops

    for backbone in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        counted = backbone_gflops(backbone, NATIVE_SIZES[backbone])
        assert selection.NATIVE_GFLOPS[backbone] == pytest.approx(counted, rel=1e-3)


def test_auto_races_every_backbone_at_every_scale_within_the_caps() -> None:
    params = parse_params({})
    candidates = selection.list_candidates(params)
    assert candidates[0].name == "lite0@224" and len(candidates) == 9  # cheapest first
    raced, excluded = selection.afford(candidates, 221, params.select)  # hymenoptera's train split
    assert {"lite0@292", "lite1@312", "lite2@260", "lite2@340", "lite0@336", "lite1@360"} <= {c.name for c in raced}
    assert [c.name for c in excluded] == ["lite2@392"]  # 1.96 GFLOPs > select.max_gflops 1.5
    assert "max_gflops" in excluded[candidates[-1]]
    raced, excluded = selection.afford(candidates, 576, params.select)  # ELPV, 400 per class
    assert all(c.gflops * 576 <= 400 for c in raced) and len(raced) == 3
    assert any("max_train_gflops" in reason for reason in excluded.values())
    raced, excluded = selection.afford(candidates, 100_000, params.select)
    assert [c.name for c in raced] == ["lite0@224"]  # always the cheapest, however large the data


def test_pinned_backbone_races_sides_and_pinned_side_races_backbones() -> None:
    sides = selection.list_candidates(parse_params({"features": {"backbone": "efficientnet_lite1"}}))
    assert [c.name for c in sides] == ["lite1@240", "lite1@312", "lite1@360"]
    backbones = selection.list_candidates(parse_params({"data": {"image_size": "fixres"}}))
    assert sorted(c.name for c in backbones) == ["lite0@292", "lite1@312", "lite2@340"]
    both = parse_params({"features": {"backbone": "efficientnet_lite2"}, "data": {"image_size": 300}})
    assert [c.name for c in selection.list_candidates(both)] == ["lite2@300"]


def test_plan_fits_the_budget_in_the_worst_case_and_grows_by_eta() -> None:
    costs = [0.4, 0.6, 0.9, 1.0, 1.4]
    plan = selection.plan_rounds(costs, n_train=600, budget=300.0, eta=3, min_images=20)
    assert len(plan) == 2 and plan[1] == 3 * plan[0]
    assert selection.worst_case_cost(costs, plan, 3) <= 300.0
    bigger = selection.plan_rounds(costs, n_train=600, budget=600.0, eta=3, min_images=20)
    assert bigger[0] > plan[0]


def test_plan_stops_at_the_whole_train_split() -> None:
    plan = selection.plan_rounds([0.4, 0.6, 0.9], n_train=100, budget=1e9, eta=3, min_images=20)
    assert plan == [100]  # everything fits: one round on every train image
    assert selection.plan_rounds([0.4], n_train=100, budget=1.0, eta=3, min_images=20) == []


def test_budget_counts_the_features_stage_start_up() -> None:
    small = selection.budget_gflops(3.0, 400)
    assert small == pytest.approx(3.0 * (400 + selection.STARTUP_IMAGES) * selection.NATIVE_GFLOPS["efficientnet_lite0"])


def test_stratified_order_keeps_class_proportions_in_every_prefix() -> None:
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    order = selection.stratified_order(labels, seed=1)
    assert sorted(order.tolist()) == list(range(100))
    for prefix in (10, 30, 50):
        counts = np.bincount(labels[order[:prefix]], minlength=3)
        assert np.all(np.abs(counts - prefix * np.array([0.6, 0.3, 0.1])) <= 1)
    assert np.array_equal(order, selection.stratified_order(labels, seed=1))
    assert not np.array_equal(order, selection.stratified_order(labels, seed=2))


def test_next_round_keeps_the_best_third_and_ties_go_to_the_cheaper() -> None:
    candidates = [Candidate("efficientnet_lite0", 224), Candidate("efficientnet_lite1", 240),
                  Candidate("efficientnet_lite2", 260)]
    scored = [result("lite0@224", 0.90), result("lite1@240", 0.95), result("lite2@260", 0.95)]
    assert selection.next_candidates(candidates, scored, eta=3) == [candidates[1]]
    assert selection.choose(candidates, scored) == candidates[1]


def test_choice_comes_from_train_cv_even_where_test_accuracy_would_choose_otherwise(tmp_path) -> None:
    """Two candidate 'backbones' whose train features differ in how well they separate the classes.

    The race reads only the train images it is given (``images_path``, ``labels``); the held-out
    split, where the other candidate happens to be better, is never an input, so it cannot move
    the choice.
    """
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    signs = 2.0 * labels - 1.0
    good = signs[:, None] * 2.0 + rng.normal(0, 1, (80, 8))   # separable on train
    poor = signs[:, None] * 0.2 + rng.normal(0, 1, (80, 8))   # barely
    params = parse_params({"select": {"cv_folds": 4, "c_grid": {"start": -2, "stop": 1, "num": 4}, "n_jobs": 1}})
    a, b = Candidate("efficientnet_lite0", 224), Candidate("efficientnet_lite1", 240)
    np.save(selection.cache_path(tmp_path, a), good.astype(np.float32))  # features already extracted
    np.save(selection.cache_path(tmp_path, b), poor.astype(np.float32))
    scored = [selection.probe_candidate(c, tmp_path / "unused.npy", labels, 80, 0, tmp_path, params.select, None, 8)
              for c in (a, b)]
    assert scored[0].cv_accuracy > scored[1].cv_accuracy
    assert selection.choose([a, b], scored) == a
    # held-out accuracy that favours `b` (as a test split might, by chance): the race has no input for it
    held_out = {"lite0@224": 0.80, "lite1@240": 0.95}
    assert max(held_out, key=held_out.get) == b.name and selection.choose([a, b], scored) == a


def test_race_images_are_the_train_split_of_ingest_never_val_or_test(tmp_path) -> None:
    from tests.conftest import make_source
    from tlpipe.core.sources import list_source
    from tlpipe.data import store
    from tlpipe.data.ingest import ingest

    source = make_source(tmp_path / "source", per_class=15)
    params = parse_params({"data": {"source": str(source), "max_per_class": None, "workers": 1, "cv_folds": 2}})
    split = selection.split_train(params, tmp_path / "race")
    listing = list_source(str(source), None, "defect", 0.5)
    ingest(listing, params.data.model_copy(update={"image_size": 16}), tmp_path / "store")
    manifest = store.load_manifest(tmp_path / "store")
    by_split = {name: {str(source / rel) for rel in manifest.loc[manifest["split"] == name, "relpath"]}
                for name in store.SPLITS}
    assert set(split.files) == by_split["train"]
    assert not set(split.files) & (by_split["val"] | by_split["test"])
    assert split.total_images == len(manifest)
    labels = dict(zip(manifest["relpath"].map(lambda rel: str(source / rel)), manifest["label"]))
    assert [labels[f] for f in split.files] == split.labels.tolist()


def test_probe_reuses_features_of_earlier_rounds(tmp_path) -> None:
    labels = np.repeat([0, 1], 20)
    features = (2.0 * labels - 1.0)[:, None] + np.random.default_rng(0).normal(0, 0.5, (40, 4))
    candidate = Candidate("efficientnet_lite0", 224)
    np.save(selection.cache_path(tmp_path, candidate), features.astype(np.float32))
    params = parse_params({"select": {"cv_folds": 3, "c_grid": {"start": -1, "stop": 1, "num": 3}, "n_jobs": 1}})
    first = selection.probe_candidate(candidate, tmp_path / "none.npy", labels, 40, 1, tmp_path, params.select,
                                      None, 8)
    assert first.images == 40 and first.cv_accuracy > 0.9  # no images file was needed: all 40 were cached


def test_table_marks_the_choice_and_the_excluded() -> None:
    candidates = [Candidate("efficientnet_lite0", 224), Candidate("efficientnet_lite2", 260)]
    scored = [result("lite0@224", 0.90), result("lite2@260", 0.93), result("lite2@260", 0.94, 1, 150)]
    table = selection.candidates_table(candidates, scored, candidates[1],
                                       {Candidate("efficientnet_lite2", 392): "over select.max_gflops (1.96 > 1.5)"})
    assert table.iloc[0]["candidate"] == "lite2@260" and bool(table.iloc[0]["chosen"])
    assert table.iloc[0]["images"] == 150 and table.iloc[0]["rounds"] == 2
    assert table.set_index("candidate").loc["lite2@392", "note"].startswith("over select.max_gflops")
    assert selection.metrics_payload(candidates[1], table) == {"choice": "lite2@260", "cv_accuracy": 0.94}
    summary = selection.race_summary(table, candidates[1], [50, 150], 100.0, 1.0)
    assert summary["rounds"] == [50, 150] and summary["candidates"]["lite0@224"]["cv_accuracy"] == 0.90
    assert selection.selection_payload(candidates[1]) == {"backbone": "efficientnet_lite2", "image_size": 260}
