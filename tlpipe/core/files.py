"""Files written whole or not at all: the one file-writing primitive and the clean-up after killed writers."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Write a whole file atomically: readers see the old file or the new one, never a part.

    The bytes (``str`` is encoded as UTF-8) go to a temp sibling ``.<name>.tmp-<pid>``
    (the pattern :func:`remove_stale_siblings` cleans up after a killed writer), which
    then replaces ``path`` with one ``os.replace``. The parent folder is created if
    needed; on any error the temp file is removed and ``path`` is left untouched.
    This is the one file-writing primitive of the project: JSON, CSV, PNG, HTML and
    Markdown outputs all go through it. ``mode`` (e.g. ``0o600`` for a secret) is set
    on the temp file before it replaces ``path``, so the file never exists with wider
    permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else bytes(data))
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def owner_alive(pid: int, since: float) -> bool:
    """Whether process ``pid`` may still own a staging path last modified at ``since`` (epoch seconds).

    False when no such process exists, when it is a zombie, or when it started after
    the path was last modified (the pid was reused by a newer process). True when in
    doubt, so a live writer's files are never removed.
    """
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= since + 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # e.g. access denied: it exists
        return True


def remove_stale_siblings(target: Path) -> list[Path]:
    """Remove what killed writers of ``target`` left next to it; return the removed paths.

    A process building ``target`` writes ``.<name>.tmp-<pid>`` (a staging folder, or
    a temp file for :func:`tlpipe.data.store.write_json`), and :func:`tlpipe.data.store.publish_dir` parks the previous
    output as ``.<name>.old-<pid>``. A process killed half-way (``kill -9``, out of
    memory) leaves them behind; they are removed here, at the start of the next write,
    once their owner is gone (see :func:`owner_alive`). Assumes writers on one host.
    """
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)")
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            if owner_alive(int(match.group(1)), entry.stat(follow_symlinks=False).st_mtime):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:  # removed concurrently, or not removable: never block the new write over debris
            continue
    return removed
