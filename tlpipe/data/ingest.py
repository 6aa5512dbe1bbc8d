"""Core of the ``ingest`` stage: validate a source, split it and write the image store.

Steps, each a plain function:

1. :func:`decode_candidates` decodes every candidate file in parallel (all cores,
   JPEG draft mode) and streams the pixels of valid, non-duplicate images into a
   temporary raw file, collecting a record per file (kept or rejected, and why).
2. :func:`select_per_class` caps each class at ``max_per_class`` (seeded).
3. :func:`assign_splits` makes the stratified, seeded train/val/test split (or
   respects a pre-split tree).
4. :func:`check_task_support` fails when the data cannot support the task.
5. :func:`write_store` copies rows into one ``.npy`` per split plus the manifest,
   in a staging folder that is published atomically.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.core.errors import UserError
from tlpipe.core.params import DataParams
from tlpipe.core.sources import Candidate, SourceListing
from tlpipe.data import store
from tlpipe.data.images import ImageRejected, decode_bytes, hash_bytes
from tlpipe.ops.pause import pause_point

RAW_NAME = "decoded.raw"
RECORD_COLUMNS = ["relpath", "class_name", "source_split", "sha256", "width", "height", "mode", "row", "reason"]


class DataError(UserError, ValueError):
    """The data cannot support the task (too few classes or images)."""


@dataclass(frozen=True)
class DecodeJob:
    """What a worker needs to decode one file."""

    position: int
    path: str
    size: int
    mode: str
    min_side: int
    max_pixels: int


def _decode_job(job: DecodeJob) -> tuple[int, bytes | None, dict]:
    """Worker: decode one file; return its pixels (or None) and its record fields."""
    try:
        data = Path(job.path).read_bytes()
    except OSError as error:
        return job.position, None, {"reason": f"unreadable file: {error.strerror or error}"}
    try:
        image = decode_bytes(data, job.size, job.mode, job.min_side, job.max_pixels)
    except ImageRejected as error:
        return job.position, None, {"sha256": hash_bytes(data), "reason": str(error)}
    info = {"sha256": image.sha256, "width": image.width, "height": image.height, "mode": image.mode}
    return job.position, image.pixels.tobytes(), info


def _iter_decoded(jobs: list[DecodeJob], workers: int) -> Iterable[tuple[int, bytes | None, dict]]:
    """Decode jobs in order, in a process pool when ``workers`` > 1."""
    if workers <= 1 or len(jobs) < 16:
        yield from map(_decode_job, jobs)
        return
    # forkserver, not fork: the caller (a Prefect flow) runs threads, and forking a threaded
    # process can deadlock a child on a lock held at fork time (seen here).
    context = multiprocessing.get_context("forkserver")
    chunk = max(1, min(16, len(jobs) // (workers * 8)))
    with context.Pool(workers) as pool:
        for index, decoded in enumerate(pool.imap(_decode_job, jobs, chunksize=chunk)):
            if index == 0:
                pause_point("ingest.decoding")  # the pool's workers are running (tests/e2e/test_faults.py)
            yield decoded


def resolve_workers(workers: int) -> int:
    """Number of decode processes: ``workers``, or every available core when 0."""
    if workers > 0:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def decode_jobs(candidates: list[Candidate], params: DataParams) -> list[DecodeJob]:
    """One decode job per candidate, in listing order, with the store's size and the image limits."""
    return [DecodeJob(i, str(c.path), params.image_size, params.resize_mode, params.min_side, params.max_pixels)
            for i, c in enumerate(candidates)]


def keep_first(candidate: Candidate, info: dict, decoded: bool, first_seen: dict[str, str]) -> tuple[bool, str]:
    """Whether a candidate is kept: decoded and the first of its SHA-256 in listing order (``first_seen``:
    hash -> relpath of the kept one, updated); and the reason it is not (its decode error, or the duplicate)."""
    sha, reason = info.get("sha256", ""), info.get("reason", "")
    if decoded and sha in first_seen:
        return False, f"duplicate of {first_seen[sha]}"
    if decoded:
        first_seen[sha] = candidate.relpath
        return True, reason
    return False, reason


def candidate_record(candidate: Candidate, info: dict, row: int, reason: str) -> tuple:
    """One row of the decode records (:data:`RECORD_COLUMNS`): the candidate, its decode info, its row or -1."""
    return (candidate.relpath, candidate.class_name, candidate.split or "", info.get("sha256", ""),
            info.get("width", 0), info.get("height", 0), info.get("mode", ""), row, reason)


def decode_candidates(
    candidates: list[Candidate],
    params: DataParams,
    raw_path: Path,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> pd.DataFrame:
    """Decode every candidate, streaming kept pixels to ``raw_path``.

    Exact duplicates (same SHA-256) are kept once: the first in sorted path order.

    Returns:
        One row per candidate: relpath, class_name, source_split, sha256, width,
        height, mode, row (position in the raw file, -1 when not kept), reason.
    """
    jobs = decode_jobs(candidates, params)
    records: list[tuple] = []  # tuples, not dicts: metadata stays small per file
    first_seen: dict[str, str] = {}
    with open(raw_path, "wb") as raw:
        for position, pixels, info in progress(_iter_decoded(jobs, resolve_workers(params.workers))):
            candidate = candidates[position]
            kept, reason = keep_first(candidate, info, pixels is not None, first_seen)
            row = -1
            if kept:
                row = raw.tell() // len(pixels)
                raw.write(pixels)
            records.append(candidate_record(candidate, info, row, reason))
    del jobs
    return pd.DataFrame.from_records(records, columns=RECORD_COLUMNS)


def select_per_class(kept: pd.DataFrame, max_per_class: int | None, seed: int) -> pd.DataFrame:
    """Keep at most ``max_per_class`` images per class (per split for pre-split data), seeded."""
    if max_per_class is None:
        return kept
    rng = np.random.default_rng(seed)
    parts = []
    for _, group in kept.sort_values("sha256").groupby(["source_split", "class_name"], sort=True):
        if len(group) > max_per_class:
            chosen = np.sort(rng.choice(len(group), size=max_per_class, replace=False))
            group = group.iloc[chosen]
        parts.append(group)
    return pd.concat(parts)


def held_out_count(n: int, fraction: float) -> int:
    """Images of one class held out for a split: ``round(n * fraction)``, at least one."""
    return max(1, int(round(n * fraction)))


def _stratified(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``frame`` into (rest, held-out), stratified per class, seeded.

    Each class holds out :func:`held_out_count` images chosen by a seeded
    permutation of its rows in content-hash order, so every class appears in both
    parts and the result does not depend on directory order.
    """
    rng = np.random.default_rng(seed)
    held_index = []
    for _, group in frame.sort_values("sha256").groupby("class_name", sort=True):
        order = rng.permutation(len(group))
        held_index.extend(group.index[order[: held_out_count(len(group), fraction)]])
    held = frame.loc[held_index]
    return frame.drop(index=held_index), held


def minimum_per_class(params: DataParams, presplit: bool) -> int:
    """Smallest class size that leaves >= cv_folds train images after the val and test hold-outs."""
    for n in range(2, 10_000):
        test = 0 if presplit else held_out_count(n, params.test_fraction)
        train_val = n - test
        if train_val < 2:
            continue
        if train_val - held_out_count(train_val, params.val_fraction) >= params.cv_folds:
            return n
    raise DataError("split fractions leave no training images")  # pragma: no cover


def check_task_support(kept: pd.DataFrame, params: DataParams, presplit: bool) -> None:
    """Raise :class:`DataError` when the kept images cannot support the task.

    Needs at least two classes, and every class large enough for a stratified
    train/val/test split and ``cv_folds``-fold cross-validation on train.
    """
    pool = kept[kept["source_split"] == "train"] if presplit else kept
    counts = pool["class_name"].value_counts().sort_index()
    if len(counts) < 2:
        found = ", ".join(f"'{c}' ({n})" for c, n in counts.items()) or "none"
        raise DataError(f"need at least two classes with usable images; found {found}")
    need = minimum_per_class(params, presplit)
    where = "training images" if presplit else "usable images"
    for class_name, count in counts.items():
        if count < need:
            raise DataError(
                f"class '{class_name}' has {count} {where}; at least {need} are needed for a "
                f"stratified train/val/test split with {params.cv_folds}-fold cross-validation"
            )
    if presplit:
        held = kept[kept["source_split"] != "train"]
        missing = sorted(set(counts.index) - set(held["class_name"]))
        if missing:
            raise DataError(f"class(es) {missing} have no images in the held-out split folder")


def assign_splits(kept: pd.DataFrame, params: DataParams, presplit: bool) -> pd.DataFrame:
    """Return ``kept`` with a ``split`` column (train/val/test), stratified and seeded.

    A pre-split tree keeps its split: ``test/`` is the test split; when there is no
    ``test/``, its ``val/`` is the held-out test split; validation is then carved
    from ``train/`` (unless both ``val/`` and ``test/`` exist).
    """
    kept = kept.copy()
    if presplit:
        has_test = (kept["source_split"] == "test").any()
        has_val = (kept["source_split"] == "val").any()
        mapping = {"train": "train", "test": "test", "val": "val" if has_test else "test"}
        kept["split"] = kept["source_split"].map(mapping)
        if has_test and has_val:
            return kept
        train, val = _stratified(kept[kept["split"] == "train"], params.val_fraction, params.seed)
        kept.loc[val.index, "split"] = "val"
        return kept
    train_val, test = _stratified(kept, params.test_fraction, params.seed)
    train, val = _stratified(train_val, params.val_fraction, params.seed)
    kept["split"] = ""
    kept.loc[test.index, "split"] = "test"
    kept.loc[val.index, "split"] = "val"
    kept.loc[train.index, "split"] = "train"
    return kept


def build_manifest(split_frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Order rows (split, then path) and add ``label`` and per-split ``index`` columns."""
    order = {name: i for i, name in enumerate(store.SPLITS)}
    frame = split_frame.assign(_order=split_frame["split"].map(order))
    frame = frame.sort_values(["_order", "relpath"]).drop(columns="_order").reset_index(drop=True)
    frame["label"] = frame["class_name"].map({c: i for i, c in enumerate(classes)}).astype(int)
    frame["index"] = frame.groupby("split").cumcount()
    columns = ["split", "index", "relpath", "class_name", "label", "sha256", "width", "height", "mode", "row"]
    return frame[columns]


def write_store(manifest: pd.DataFrame, classes: list[str], raw_path: Path, size: int, staging: Path) -> None:
    """Copy each split's rows from the raw decode file into ``<split>.npy`` in ``staging``."""
    row_shape = (size, size, 3)
    row_bytes = size * size * 3
    with open(raw_path, "rb") as raw:
        for split in store.SPLITS:
            rows = manifest.loc[manifest["split"] == split, "row"].to_numpy()
            with store.NpyWriter(store.split_path(staging, split), len(rows), row_shape) as writer:
                for row in rows:
                    raw.seek(int(row) * row_bytes)
                    writer.write(np.frombuffer(raw.read(row_bytes), dtype=np.uint8).reshape(row_shape))
    store.write_csv(staging / store.MANIFEST, manifest.drop(columns="row"))
    store.write_json(staging / store.CLASSES, classes)


def hash_manifest(manifest: pd.DataFrame) -> str:
    """Content hash of the dataset as stored: split, class and file hash of every row."""
    digest = hashlib.sha256()
    for split, class_name, sha in manifest[["split", "class_name", "sha256"]].itertuples(index=False):
        digest.update(f"{split},{class_name},{sha}\n".encode())
    return digest.hexdigest()


def combine_source_hash(entries: Iterable[tuple[str, str, str]]) -> str:
    """Hash (relpath, class, file hash) triples, in sorted order, into one source hash."""
    digest = hashlib.sha256()
    for relpath, class_name, sha in sorted(entries):
        digest.update(f"{relpath},{class_name},{sha}\n".encode())
    return digest.hexdigest()


def hash_source(listing: SourceListing) -> str:
    """Content hash of a source without decoding: every candidate's path, class and bytes."""
    entries = []
    for candidate in listing.candidates:
        try:
            sha = hash_bytes(candidate.path.read_bytes())
        except OSError:
            sha = "unreadable"
        entries.append((candidate.relpath, candidate.class_name, sha))
    return combine_source_hash(entries)


def summarize(records: pd.DataFrame, manifest: pd.DataFrame, listing: SourceListing, params: DataParams) -> dict:
    """Build the data report: counts per class and split, and every rejection with its reason."""
    rejected = records.loc[records["row"] < 0, ["relpath", "class_name", "reason"]]
    listed = pd.DataFrame([r.__dict__ for r in listing.rejections], columns=["relpath", "class_name", "reason"])
    rejected = pd.concat([listed, rejected]).sort_values("relpath")
    not_selected = len(records[records["row"] >= 0]) - len(manifest)
    counts = manifest.groupby(["split", "class_name"]).size()
    return {
        "source": str(listing.root) if listing.kind != "elpv" else "elpv",
        "source_kind": listing.kind,
        "files_found": len(records) + len(listing.rejections),
        "images_kept": len(manifest),
        "rejected": len(rejected),
        "not_selected_by_max_per_class": not_selected,
        "counts": {s: {c: int(n) for c, n in counts[s].items()} for s in store.SPLITS if s in counts},
        "rejections": rejected.to_dict(orient="records"),
        "rejection_reasons": {k: int(v) for k, v in
                              rejected["reason"].str.split(":").str[0].str.replace(r" of .*", "", regex=True)
                              .value_counts().items()},
        "data_hash": hash_manifest(manifest),
        "source_hash": combine_source_hash(
            (r.relpath, r.class_name, r.sha256 or "unreadable")
            for r in records[["relpath", "class_name", "sha256"]].itertuples(index=False)),
        "image_size": params.image_size,
    }


SHARD_FILES = 64  # files per Dask decode task (one shard file each)
SHARD_DIR = "shards"


def decode_shard(jobs: list[DecodeJob], shard_path: str) -> list[tuple[int, int, dict]]:
    """Dask task: decode ``jobs`` in order, appending each decodable image's pixels to ``shard_path``.

    Returns:
        ``(position, row in the shard or -1, record fields)`` per job.
    """
    results, row = [], 0
    with open(shard_path, "wb") as shard:
        for job in jobs:
            position, pixels, info = _decode_job(job)
            if pixels is None:
                results.append((position, -1, info))
            else:
                shard.write(pixels)
                results.append((position, row, info))
                row += 1
    return results


def decode_candidates_on_dask(
    candidates: list[Candidate], params: DataParams, shard_dir: Path, client,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> tuple[pd.DataFrame, list[tuple[int, int]], list[Path]]:
    """:func:`decode_candidates` on a Dask cluster: workers decode shards of the listing in parallel, each
    writing its pixels to its own shard file in ``shard_dir``.

    Duplicates are resolved afterwards in listing order, exactly as the local path does, so the
    records are the same: ``row`` numbers the kept images in listing order.

    Returns:
        The records, each kept row's (shard, row in shard), and the shard files.
    """
    from distributed import as_completed

    from tlpipe.ops.cluster import even_chunks

    shard_dir.mkdir(parents=True, exist_ok=True)
    jobs = decode_jobs(candidates, params)
    chunks = even_chunks(len(jobs), SHARD_FILES)
    shard_paths = [shard_dir / f"shard-{k:06d}.raw" for k in range(len(chunks))]
    futures = [client.submit(decode_shard, jobs[chunk.start:chunk.stop], str(path), pure=False)
               for chunk, path in zip(chunks, shard_paths)]
    index = {future.key: k for k, future in enumerate(futures)}
    shard_results: list[list[tuple[int, int, dict]]] = [[] for _ in futures]
    for future in progress(as_completed(futures)):
        shard_results[index[future.key]] = future.result()
        future.release()
    records: list[tuple] = []
    locations: list[tuple[int, int]] = []
    first_seen: dict[str, str] = {}
    for shard, results in enumerate(shard_results):
        for position, shard_row, info in results:
            candidate = candidates[position]
            kept, reason = keep_first(candidate, info, shard_row >= 0, first_seen)
            row = -1
            if kept:
                row = len(locations)
                locations.append((shard, shard_row))
            records.append(candidate_record(candidate, info, row, reason))
    return pd.DataFrame.from_records(records, columns=RECORD_COLUMNS), locations, shard_paths


def scatter_shard(shard_path: str, moves: list[tuple[int, str, int]], size: int) -> int:
    """Dask task: copy rows of one shard file to their places in the split files.

    Args:
        moves: ``(row in the shard, split file, row in the split)`` triples.

    Returns:
        The number of rows written.
    """
    row_bytes = size * size * 3
    with open(shard_path, "rb") as shard:
        for shard_row, split_file, split_row in sorted(moves):
            shard.seek(shard_row * row_bytes)
            pixels = np.frombuffer(shard.read(row_bytes), dtype=np.uint8).reshape(1, size, size, 3)
            store.write_rows_at(Path(split_file), split_row, pixels)
    return len(moves)


def write_store_on_dask(manifest: pd.DataFrame, classes: list[str], locations: list[tuple[int, int]],
                        shard_paths: list[Path], size: int, staging: Path, client) -> None:
    """:func:`write_store` on a Dask cluster: the split files are allocated, then each worker copies the
    rows of one shard into them in parallel (disjoint rows), giving byte-identical files."""
    from distributed import wait

    moves: dict[int, list[tuple[int, str, int]]] = {}
    for split in store.SPLITS:
        part = manifest.loc[manifest["split"] == split].sort_values("index")
        path = store.split_path(staging, split)
        store.create_npy(path, len(part), (size, size, 3))
        for split_row, row in zip(part["index"].to_numpy(), part["row"].to_numpy()):
            shard, shard_row = locations[int(row)]
            moves.setdefault(shard, []).append((shard_row, str(path), int(split_row)))
    futures = [client.submit(scatter_shard, str(shard_paths[shard]), items, size, pure=False)
               for shard, items in sorted(moves.items())]
    wait(futures)
    written = sum(future.result() for future in futures)
    if written != len(manifest):
        raise RuntimeError(f"wrote {written} of {len(manifest)} store rows")
    store.write_csv(staging / store.MANIFEST, manifest.drop(columns="row"))
    store.write_json(staging / store.CLASSES, classes)


def ingest(
    listing: SourceListing,
    params: DataParams,
    store_dir: Path,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    client=None,
) -> dict:
    """Validate, split and store a listed source; return the data report.

    The store is built in a staging folder next to ``store_dir`` and published
    atomically; on any error the previous store is left untouched. With ``params.dask``
    (or ``$TLPIPE_DASK_SCHEDULER``), or a ``distributed.Client`` as ``client``, decoding and
    the store writes run on that Dask cluster (see :mod:`tlpipe.ops.cluster`); the outputs
    are byte-identical to the local path's.

    Raises:
        DataError: When the data cannot support the task.
    """
    if client is None:
        from tlpipe.ops.cluster import stage_cluster

        with stage_cluster("ingest", params.dask) as dask:
            if dask is not None:
                return ingest(listing, params, store_dir, progress, client=dask)
    staging = store.staging_dir(Path(store_dir))
    try:
        raw_path = staging / RAW_NAME
        if client is None:
            records = decode_candidates(listing.candidates, params, raw_path, progress)
        else:
            records, locations, shard_paths = decode_candidates_on_dask(
                listing.candidates, params, staging / SHARD_DIR, client, progress)
        presplit = listing.kind == "presplit"
        kept = records[records["row"] >= 0]
        check_task_support(kept, params, presplit)
        selected = select_per_class(kept, params.max_per_class, params.seed)
        check_task_support(selected, params, presplit)
        classes = sorted(selected["class_name"].unique())
        manifest = build_manifest(assign_splits(selected, params, presplit), classes)
        if client is None:
            write_store(manifest, classes, raw_path, params.image_size, staging)
            raw_path.unlink()
        else:
            write_store_on_dask(manifest, classes, locations, shard_paths, params.image_size, staging, client)
            import shutil

            shutil.rmtree(staging / SHARD_DIR)
        report = summarize(records, manifest, listing, params)
        report["classes"] = classes
        store.publish_dir(staging, Path(store_dir))
        return report
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
