"""Choose the backbone and the input size by cross-validation on the train split.

The ``select`` stage answers the two questions a user cannot: which pretrained
backbone, and at which input side. Every candidate (a backbone at a side) is
scored by the cross-validated accuracy of a linear probe (the SVM stage's
linear SVM, C searched by stratified K-fold CV) on pooled final features of
train images only: the validation and test splits are never read.

Scoring every candidate on every train image would cost many features stages,
so the candidates race by successive halving (Jamieson & Talwalkar 2016): all
of them on a stratified subset of the train split, the best 1/``eta`` on a
subset ``eta`` times larger (features of the images already seen are reused),
until one is left or the whole train split is used. The subset sizes are the
largest that fit the compute budget (:func:`plan_rounds`), so the stage costs
at most ``budget`` times the features stage (see :func:`budget_gflops`) whatever
the candidates turn out to be. The winner has the highest CV accuracy of the
last round; ties go to the cheaper candidate.

Everything here is plain Python over arrays and paths; the flow
(``flows/select.py``) wires the rounds and maps :func:`probe_candidate` over
each round's candidates as Prefect tasks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.core.params import NATIVE_SIZES, Params, SelectParams, SvmParams, scaled_size
from tlpipe.core.task import side_for

NATIVE_GFLOPS: dict[str, float] = {"efficientnet_lite0": 0.3839, "efficientnet_lite1": 0.5989,
                                   "efficientnet_lite2": 0.8585, "resnet50": 3.8559}
"""Multiply-adds (1e9) per image of each backbone's feature model at its native side
(:func:`tlpipe.evaluation.compare_backbones.backbone_gflops`; a unit test keeps them equal). Planning
scales them by the square of the side."""

STARTUP_IMAGES = 1000
"""The features stage's fixed cost (interpreter, TensorFlow, Prefect, MLflow, building the
network: about 15 s here) expressed as the Lite0-native images it could extract meanwhile
(about 70 per second on these 2 cores)."""

REFERENCE_BACKBONE = "efficientnet_lite0"
"""The backbone of the course-shaped features stage the budget is measured against."""

SELECTION_KEYS = ("backbone", "image_size")
"""What ``data/selection.json`` holds: the choice, and nothing that changes from run to run."""


class SelectionError(ValueError):
    """The selection cannot run as asked (e.g. a missing choice)."""


@dataclass(frozen=True)
class Candidate:
    """One backbone at one input side."""

    backbone: str
    image_size: int

    @property
    def name(self) -> str:
        """Short label, e.g. ``lite2@340``."""
        return f"{self.backbone.replace('efficientnet_', '')}@{self.image_size}"

    @property
    def gflops(self) -> float:
        """Estimated multiply-adds (1e9) per image: :data:`NATIVE_GFLOPS` scaled by the side squared."""
        return estimate_gflops(self.backbone, self.image_size)


@dataclass(frozen=True)
class ProbeResult:
    """A candidate's linear-probe score on the first ``images`` images of the selection order."""

    candidate: str
    backbone: str
    image_size: int
    round: int
    images: int
    cv_accuracy: float
    cv_std: float
    best_c: float
    gflops: float
    extract_seconds: float
    probe_seconds: float

    def to_dict(self) -> dict:
        """Plain dict for CSV, JSON and MLflow."""
        return asdict(self)


def estimate_gflops(backbone: str, image_size: int) -> float:
    """GFLOPs per image of ``backbone`` at ``image_size``, scaled from its native side."""
    native = NATIVE_SIZES[backbone]
    return NATIVE_GFLOPS[backbone] * (image_size / native) ** 2


def list_candidates(params: Params) -> list[Candidate]:
    """The candidates the params leave open, cheapest first.

    A pinned ``features.backbone`` leaves one backbone; a pinned ``data.image_size``
    (a side, ``native`` or ``fixres``) leaves one side per backbone. Otherwise
    ``select.backbones`` x ``select.scales`` (the backbone's native side times each
    scale, to a multiple of 4). :func:`afford` then drops what costs too much.
    """
    chosen = params.features.backbone
    backbones = list(params.select.backbones) if chosen == "auto" else [chosen]
    size = params.data.image_size
    candidates = []
    for backbone in backbones:
        if size == "auto":
            sides = [scaled_size(NATIVE_SIZES[backbone], scale) for scale in params.select.scales]
        else:
            sides = [side_for(size, backbone)]
        candidates += [Candidate(backbone, side) for side in dict.fromkeys(sides)]
    candidates.sort(key=lambda c: (c.gflops, c.backbone, c.image_size))
    return candidates


def afford(candidates: Sequence[Candidate], n_train: int, params: SelectParams) -> tuple[list[Candidate], dict]:
    """Split candidates into those raced and those too costly, keeping at least the cheapest.

    Too costly: more than ``max_gflops`` per image (the race and every later stage scale with it), or
    more than ``max_train_gflops`` for the whole train split (train images x GFLOPs per image: the
    finetune stage's work, which dominates a run, grows with both, so a larger data set gets a cheaper
    network and the run's time stays bounded).

    Returns:
        The raced candidates and ``{candidate: reason}`` for the others.
    """
    if len(candidates) <= 1:
        return list(candidates), {}
    excluded = {}
    for candidate in candidates:
        if candidate.gflops > params.max_gflops:
            excluded[candidate] = f"over select.max_gflops ({candidate.gflops:.2f} > {params.max_gflops:g})"
        elif candidate.gflops * n_train > params.max_train_gflops:
            excluded[candidate] = (f"over select.max_train_gflops ({n_train} train images x {candidate.gflops:.2f}"
                                   f" = {candidate.gflops * n_train:.0f} > {params.max_train_gflops:g})")
    raced = [c for c in candidates if c not in excluded] or [candidates[0]]
    return raced, {c: reason for c, reason in excluded.items() if c not in raced}


def budget_gflops(budget: float, total_images: int) -> float:
    """The compute budget: ``budget`` features stages of the reference backbone on every image.

    A features stage costs its images plus its fixed start-up (:data:`STARTUP_IMAGES`), so on a
    small data set (where start-up dominates the features stage) the race gets more images than a
    count of images alone would give it.
    """
    return budget * (total_images + STARTUP_IMAGES) * NATIVE_GFLOPS[REFERENCE_BACKBONE]


def survivors(count: int, eta: int) -> int:
    """How many candidates go on to the next round."""
    return max(1, math.ceil(count / eta))


def round_sizes(first: int, rounds: int, eta: int, n_train: int) -> list[int]:
    """Images per round: ``first``, ``eta`` times more each round, at most ``n_train``."""
    return [min(n_train, first * eta ** r) for r in range(rounds)]


def count_rounds(candidates: int, eta: int) -> int:
    """Rounds until one candidate is left (1 when there is a single candidate)."""
    rounds, left = 1, candidates
    while left > 1 and survivors(left, eta) > 1:
        left = survivors(left, eta)
        rounds += 1
    return rounds


def worst_case_cost(costs: Sequence[float], sizes: Sequence[int], eta: int) -> float:
    """GFLOPs of a race with ``sizes`` if the most expensive candidates always survive."""
    ranked = sorted(costs, reverse=True)
    total, seen, left = 0.0, 0, len(ranked)
    for size in sizes:
        total += (size - seen) * sum(ranked[:left])
        seen, left = size, survivors(left, eta)
    return total


def plan_rounds(costs: Sequence[float], n_train: int, budget: float, eta: int, min_images: int) -> list[int]:
    """Images per round of the race: the largest first round whose worst case fits ``budget``.

    A round that already uses the whole train split ends the race (its best wins). With
    one candidate there is nothing to race: no rounds. When even ``min_images`` per round
    does not fit, the race runs at ``min_images`` (the least CV can work with) over budget.

    Args:
        costs: GFLOPs per image of each candidate.
        n_train: Images in the train split.
        budget: GFLOPs the race may spend.
        eta: Keep the best ``1/eta`` each round; the next round has ``eta`` times the images.
        min_images: The smallest subset the probe's CV accepts.
    """
    if len(costs) <= 1:
        return []
    rounds = count_rounds(len(costs), eta)
    low = min(min_images, n_train)
    best = low
    high = n_train
    while low <= high:
        middle = (low + high) // 2
        if worst_case_cost(costs, round_sizes(middle, rounds, eta, n_train), eta) <= budget:
            best, low = middle, middle + 1
        else:
            high = middle - 1
    sizes = round_sizes(best, rounds, eta, n_train)
    return sizes[:sizes.index(n_train) + 1] if n_train in sizes else sizes


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """An order of the train images whose every prefix keeps the class proportions.

    Each class is shuffled (seeded); the classes are then interleaved by each image's
    rank within its class, scaled by the class size, so a prefix of any length holds
    each class in proportion (to within one image). Rounds use prefixes, so each
    round's images include the previous round's.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels), dtype=np.float64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        ranks = rng.permutation(len(members))
        keys[members] = (ranks + 0.5) / len(members)
    return np.lexsort((labels, keys))


def probe_folds(labels: np.ndarray, folds: int) -> int:
    """CV folds the subset supports: ``folds``, fewer when the rarest class has fewer images."""
    rarest = int(np.bincount(labels).min()) if len(labels) else 0
    if rarest < 2:
        raise SelectionError("each class needs at least 2 train images in the selection subset")
    return min(folds, rarest)


def score_probe(features: np.ndarray, labels: np.ndarray, params: SelectParams) -> tuple[float, float, float]:
    """CV accuracy of the SVM stage's linear SVM on ``features``: (mean, std over folds, best C)."""
    from tlpipe.train.svm import search_c

    svm_params = SvmParams(c_grid=params.c_grid, cv_folds=probe_folds(labels, params.cv_folds),
                           n_jobs=params.n_jobs, seed=params.seed)
    best_c, table = search_c(np.asarray(features, dtype=np.float32), labels, svm_params)
    best = table.loc[table["rank"].idxmin()]
    return round(float(best["mean_test_score"]), 4), round(float(best["std_test_score"]), 4), best_c


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize square uint8 images to ``size`` (bilinear, antialiased when shrinking, as ingest's Pillow)."""
    from PIL import Image

    if images.shape[1] == size:
        return np.asarray(images)
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
                     for image in images])


def extract_final(candidate: Candidate, images: np.ndarray, weights: str | None, batch_size: int) -> np.ndarray:
    """Pooled final features of ``images`` (already at the candidate's side) through its backbone."""
    import keras

    from tlpipe.features.extraction import build_extractor

    model = build_extractor(candidate.backbone, weights, candidate.image_size, include_top=False)
    try:
        parts = [np.asarray(model.predict_on_batch(images[i:i + batch_size])["final"], dtype=np.float32)
                 for i in range(0, len(images), batch_size)]
    finally:
        del model
        keras.backend.clear_session()
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def cache_path(cache_dir: Path, candidate: Candidate) -> Path:
    """Where a candidate's features of the images seen so far are kept between rounds."""
    return Path(cache_dir) / f"{candidate.backbone}_{candidate.image_size}.npy"


def probe_candidate(candidate: Candidate, images_path: Path, labels: np.ndarray, images: int, round_index: int,
                    cache_dir: Path, params: SelectParams, weights: str | None, batch_size: int) -> ProbeResult:
    """Score one candidate on the first ``images`` images of the selection order.

    Features of images seen in an earlier round are read back from ``cache_dir``;
    only the new ones go through the backbone.

    Args:
        candidate: The backbone and side.
        images_path: ``.npy`` of the selection subset in selection order, at the largest side raced.
        labels: Their labels, same order.
        images: How many of them this round uses.
        round_index: The round (0-based), for the record.
        cache_dir: Feature cache between rounds.
        params: The ``select`` params (probe grid, folds, seed).
        weights: Backbone weights (``imagenet``, a file, or None for random).
        batch_size: Inference batch size.
    """
    path = cache_path(cache_dir, candidate)
    seen = np.load(path) if path.exists() else np.zeros((0, 0), np.float32)
    start = time.perf_counter()
    if images > len(seen):
        source = np.load(images_path, mmap_mode="r")[len(seen):images]
        new = extract_final(candidate, resize_images(source, candidate.image_size), weights, batch_size)
        seen = new if not len(seen) else np.concatenate([seen, new])
        np.save(path, seen)
    extracted = time.perf_counter()
    mean, std, best_c = score_probe(seen[:images], labels[:images], params)
    return ProbeResult(candidate.name, candidate.backbone, candidate.image_size, round_index, images, mean, std,
                       best_c, round(candidate.gflops, 4), round(extracted - start, 3),
                       round(time.perf_counter() - extracted, 3))


def rank_results(results: Sequence[ProbeResult]) -> list[ProbeResult]:
    """Best first: highest CV accuracy; ties go to the cheaper candidate, then by name."""
    return sorted(results, key=lambda r: (-r.cv_accuracy, r.gflops, r.candidate))


def next_candidates(candidates: Sequence[Candidate], results: Sequence[ProbeResult], eta: int) -> list[Candidate]:
    """The candidates that go on: the best ``1/eta`` of this round's results."""
    by_name = {c.name: c for c in candidates}
    keep = rank_results(results)[:survivors(len(results), eta)]
    return [by_name[r.candidate] for r in keep]


def choose(candidates: Sequence[Candidate], last_round: Sequence[ProbeResult]) -> Candidate:
    """The winner: the single candidate, or the best of the last round."""
    if len(candidates) == 1:
        return candidates[0]
    if not last_round:
        raise SelectionError("no candidate was scored")
    best = rank_results(last_round)[0]
    return next(c for c in candidates if c.name == best.candidate)


def candidates_table(candidates: Sequence[Candidate], results: Sequence[ProbeResult], choice: Candidate,
                     excluded: dict | None = None) -> pd.DataFrame:
    """One row per candidate: its last (largest) round's score, every round's, and the choice.

    Columns: candidate, backbone, image_size, gflops, rounds, images, cv_accuracy, cv_std,
    best_c, seconds (extraction + probe over its rounds), chosen, note.
    """
    rows = []
    excluded = excluded or {}
    for candidate in [*candidates, *excluded]:
        own = [r for r in results if r.candidate == candidate.name]
        last = max(own, key=lambda r: r.round) if own else None
        note = excluded[candidate] if candidate in excluded else (
            "" if own else ("pinned" if len(candidates) == 1 else "not scored"))
        rows.append({
            "candidate": candidate.name, "backbone": candidate.backbone, "image_size": candidate.image_size,
            "gflops": round(candidate.gflops, 4), "rounds": len(own), "images": last.images if last else 0,
            "cv_accuracy": last.cv_accuracy if last else None, "cv_std": last.cv_std if last else None,
            "best_c": last.best_c if last else None,
            "seconds": round(sum(r.extract_seconds + r.probe_seconds for r in own), 3),
            "chosen": candidate == choice, "note": note,
        })
    table = pd.DataFrame(rows)
    return table.sort_values(["rounds", "cv_accuracy", "gflops"], ascending=[False, False, True],
                             na_position="last").reset_index(drop=True)


def selection_payload(choice: Candidate) -> dict:
    """``data/selection.json``: the choice only, so it changes only when the choice does."""
    return {"backbone": choice.backbone, "image_size": int(choice.image_size)}


def metrics_payload(choice: Candidate, table: pd.DataFrame) -> dict:
    """``metrics/select.json``, the DVC metric: the choice and its CV accuracy (one short row in
    ``dvc metrics show``; every candidate's numbers are in :func:`race_summary`)."""
    chosen = table[table["chosen"]].iloc[0]
    return {"choice": choice.name,
            "cv_accuracy": None if pd.isna(chosen["cv_accuracy"]) else float(chosen["cv_accuracy"])}


def race_summary(table: pd.DataFrame, choice: Candidate, plan: Sequence[int], budget: float,
                 seconds: float) -> dict:
    """``reports/select/race.json``: the plan, the budget, the time, and each candidate's numbers."""
    return {
        **metrics_payload(choice, table),
        "rounds": list(map(int, plan)),
        "budget_gflops": round(budget, 1),
        "seconds": round(seconds, 1),
        "candidates": {row.candidate: {"cv_accuracy": None if pd.isna(row.cv_accuracy) else float(row.cv_accuracy),
                                       "images": int(row.images), "gflops": float(row.gflops),
                                       "seconds": float(row.seconds)}
                       for row in table.itertuples()},
    }


@dataclass(frozen=True)
class TrainSplit:
    """The train split as ingest makes it: files and labels in selection order, and the data set's size."""

    files: list[str]
    labels: np.ndarray
    total_images: int


def split_train(params: Params, work_dir: Path, progress=lambda it: it) -> TrainSplit:
    """The train split exactly as ingest makes it, in selection order (:func:`stratified_order`).

    The same code runs on the same source into a throwaway store at a tiny side, so
    duplicates, rejections, the per-class cap and the seeded stratified split all match
    the real store's.
    """
    from tlpipe.core.sources import list_source
    from tlpipe.data import store
    from tlpipe.data.ingest import ingest

    data = params.data
    listing = list_source(data.source, data.classes, data.elpv_label, data.elpv_threshold)
    ingest(listing, data.model_copy(update={"image_size": 16}), Path(work_dir) / "split", progress)
    manifest = store.load_manifest(Path(work_dir) / "split")
    train = manifest[manifest["split"] == "train"].reset_index(drop=True)
    labels = train["label"].to_numpy()
    order = stratified_order(labels, params.select.seed)
    paths = {c.relpath: str(c.path) for c in listing.candidates}
    return TrainSplit([paths[train.at[int(row), "relpath"]] for row in order], labels[order], len(manifest))


def plan_race(params: Params, candidates: Sequence[Candidate], split: TrainSplit) -> tuple[list[int], float]:
    """The race's images per round and its compute budget (GFLOPs), from the ``select`` params."""
    budget = budget_gflops(params.select.budget, split.total_images)
    plan = plan_rounds([c.gflops for c in candidates], len(split.labels), budget, params.select.eta,
                       params.select.min_images)
    return plan, budget


def decode_race_images(split: TrainSplit, count: int, side: int, params: Params, work_dir: Path) -> Path:
    """Decode the first ``count`` train images of the selection order at ``side`` into a ``.npy``."""
    from tlpipe.data import store
    from tlpipe.data.ingest import DecodeJob, _iter_decoded, resolve_workers

    data = params.data
    jobs = [DecodeJob(i, path, side, data.resize_mode, data.min_side, data.max_pixels)
            for i, path in enumerate(split.files[:count])]
    images_path = Path(work_dir) / "images.npy"
    with store.NpyWriter(images_path, len(jobs), (side, side, 3)) as writer:
        for _, pixels, info in _iter_decoded(jobs, resolve_workers(data.workers)):
            if pixels is None:  # decoded fine a moment ago: the source changed under us
                raise SelectionError(f"a train image could not be decoded again: {info.get('reason')}")
            writer.write(np.frombuffer(pixels, np.uint8).reshape(side, side, 3))
    return images_path


def report_section(report_dir: Path):
    """The report's section on the select stage: every candidate's CV accuracy, cost and the choice.

    None when the select stage wrote no table (e.g. a project from before it existed).
    """
    from tlpipe.render.html import Table, TableSection

    path = Path(report_dir) / "candidates.csv"
    if not path.exists():
        return None
    table = pd.read_csv(path)
    chosen = table[table["chosen"]]
    name = chosen.iloc[0]["candidate"] if len(chosen) else "?"
    columns = {"candidate": "candidate", "image_size": "side", "gflops": "GFLOPs / image", "rounds": "rounds",
               "images": "train images", "cv_accuracy": "CV accuracy", "cv_std": "± (fold std)",
               "seconds": "seconds", "note": "note"}
    rows = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    note = (f"Chosen: {name}. Each candidate is a backbone at an input side, scored by the cross-validated accuracy "
            "of a linear SVM on its pooled features of train images only (never val or test), raced by "
            "successive halving within the select.budget; 'rounds' and 'train images' say how far each got.")
    return TableSection("select", "Backbone and input size (select stage)", Table(columns, rows, highlight=[name]),
                        note)
