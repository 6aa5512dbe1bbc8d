"""Hashes and flat keys: a file's SHA-256, a params mapping's short hash, nested mappings as dotted keys."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path


def flatten(prefix: str, value: object) -> dict[str, object]:
    """Flatten nested mappings into dotted keys (for params and tags)."""
    if isinstance(value, Mapping):
        items: dict[str, object] = {}
        for key, inner in value.items():
            items.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return items
    return {prefix: value}


def hash_params(params: Mapping) -> str:
    """Short hash of a params mapping."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed (how a model run names the model file it logged)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
