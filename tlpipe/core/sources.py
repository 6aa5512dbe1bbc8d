"""List the labelled image files of a source: a class-folder tree, a pre-split tree, or ELPV; name its task.

A source listing never opens an image; it only finds candidate files, their class
and (for pre-split trees) their split, and rejects what is unsafe to read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from tlpipe.core.errors import UserError

SPLIT_DIRS = ("train", "val", "test")
ELPV = "elpv"


class SourceError(UserError, ValueError):
    """The source cannot be listed (missing, empty, wrong layout)."""


@dataclass(frozen=True)
class Candidate:
    """A file that may become a training image."""

    path: Path
    relpath: str
    class_name: str
    split: str | None = None


@dataclass(frozen=True)
class Rejection:
    """A file that was not used, and why."""

    relpath: str
    class_name: str
    reason: str


@dataclass
class SourceListing:
    """Everything found in a source."""

    kind: str
    root: Path
    candidates: list[Candidate] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _list_class_dir(class_dir: Path, root: Path, class_name: str, split: str | None, listing: SourceListing) -> None:
    """Append every regular file under ``class_dir`` (sorted, recursive) to ``listing``."""
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            relpath = path.relative_to(root).as_posix()
            if path.is_symlink() and not _inside(path, root):
                listing.rejections.append(Rejection(relpath, class_name, "symlink leaves the source folder"))
            elif name.startswith("."):
                listing.rejections.append(Rejection(relpath, class_name, "hidden file"))
            elif not path.is_file():
                listing.rejections.append(Rejection(relpath, class_name, "not a regular file"))
            else:
                listing.candidates.append(Candidate(path, relpath, class_name, split))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_presplit(root: Path) -> bool:
    names = {p.name for p in _class_dirs(root)}
    return "train" in names and bool(names & {"val", "test"}) and names <= set(SPLIT_DIRS)


def list_folder(root: Path, classes: list[str] | None = None) -> SourceListing:
    """List a ``<root>/<class>/*`` or ``<root>/{train,val,test}/<class>/*`` tree.

    Args:
        root: The source folder.
        classes: Keep only these class names (others are skipped silently).

    Raises:
        SourceError: When the folder is missing or holds no class folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"source folder not found: {root}")
    presplit = _is_presplit(root)
    listing = SourceListing("presplit" if presplit else "folder", root)
    split_dirs = [(d, d.name) for d in _class_dirs(root)] if presplit else [(root, None)]
    for split_dir, split in split_dirs:
        for class_dir in _class_dirs(split_dir):
            if classes is not None and class_dir.name not in classes:
                continue
            if class_dir.is_symlink() and not _inside(class_dir, root):
                relpath = class_dir.relative_to(root).as_posix()
                listing.rejections.append(Rejection(relpath, class_dir.name, "symlink leaves the source folder"))
                continue
            _list_class_dir(class_dir, root, class_dir.name, split, listing)
    if not listing.candidates and not listing.rejections:
        raise SourceError(
            f"no class folders with files in {root}: expected <src>/<class>/<image> "
            "or <src>/{train,val|test}/<class>/<image>"
        )
    return listing


def elpv_root() -> Path:
    """Return the data folder shipped by the ``elpv-dataset`` package."""
    try:
        import elpv_dataset
    except ImportError:
        raise SourceError("source 'elpv' needs the elpv-dataset package: pip install elpv-dataset") from None
    return Path(elpv_dataset.__file__).parent / "data"


def elpv_class(probability: float, module_type: str, label: str, threshold: float) -> str:
    """Map one ELPV row to a class name: defect (>= threshold) or module type."""
    if label == "type":
        return module_type
    return "defective" if probability >= threshold else "functional"


def list_elpv(label: str = "defect", threshold: float = 0.5, classes: list[str] | None = None) -> SourceListing:
    """List the ELPV solar-cell images with their labels from the package's ``labels.csv``."""
    root = elpv_root()
    listing = SourceListing("elpv", root)
    with open(root / "labels.csv") as handle:
        for line in handle:
            row = line.split()
            if not row:
                continue
            relpath, probability, module_type = row[0], float(row[1]), row[2]
            class_name = elpv_class(probability, module_type, label, threshold)
            if classes is None or class_name in classes:
                listing.candidates.append(Candidate(root / relpath, relpath, class_name))
    listing.candidates.sort(key=lambda c: c.relpath)
    return listing


def list_source(source: str, classes: list[str] | None, elpv_label: str, elpv_threshold: float) -> SourceListing:
    """List a source named by the ``data.source`` param ('elpv' or a folder path)."""
    if source == ELPV:
        return list_elpv(elpv_label, elpv_threshold, classes)
    return list_folder(Path(source).expanduser(), classes)


# ---------------------------------------------------------------- the task a source defines

CLASS_SUFFIX_MAX = 32
"""Longest readable class-set suffix of a task name (``ants-bees``); longer sets are named by count and hash."""


def slugify(text: str) -> str:
    """Lower-case letters, digits and single hyphens (``Hymenoptera Data`` -> ``hymenoptera-data``)."""
    slug = "".join(char if char.isascii() and char.isalnum() else "-" for char in str(text).lower())
    return "-".join(part for part in slug.split("-") if part) or "data"


def class_set_suffix(class_names: list[str]) -> str:
    """The class set in a task name: ``ants-bees`` when short, else ``<n>classes-<6 hex of SHA-256>``."""
    names = sorted(map(str, class_names))
    slugs = [slugify(name) for name in names]
    readable = "-".join(slugs)
    if names and len(readable) <= CLASS_SUFFIX_MAX and len(set(slugs)) == len(slugs):
        return readable
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:6]
    return f"{len(names)}classes-{digest}"


def source_folder(source: str, root: Path | None = None) -> Path:
    """A folder source as a path: ``~`` expanded, a relative path taken from ``root`` (the project)."""
    path = Path(source).expanduser()
    return Path(os.path.abspath(Path(root) / path if root is not None and not path.is_absolute() else path))


def _holds_a_file(class_dir: Path, root: Path) -> bool:
    """Whether a class folder holds a file ingest would try (not hidden, not a link leaving ``root``)."""
    for dirpath, _dirnames, filenames in os.walk(class_dir, followlinks=False):
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file() and not (path.is_symlink() and not _inside(path, root)):
                return True
    return False


def folder_class_names(root: Path, classes: list[str] | None = None) -> list[str]:
    """The classes of a folder source, sorted, read from its folder names (no image is opened).

    The class folders holding at least one file, in any split of a pre-split tree, as
    :func:`list_folder` lists them; ``classes`` keeps only those names.

    Raises:
        SourceError: When the folder is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"source folder not found: {root}")
    split_dirs = _class_dirs(root) if _is_presplit(root) else [root]
    return sorted({class_dir.name for split_dir in split_dirs for class_dir in _class_dirs(split_dir)
                   if (classes is None or class_dir.name in classes)
                   and not (class_dir.is_symlink() and not _inside(class_dir, root))
                   and _holds_a_file(class_dir, root)})


def elpv_class_names(label: str, threshold: float, classes: list[str] | None = None) -> list[str]:
    """The classes ELPV yields under a labelling (from its ``labels.csv``; no image is opened)."""
    return sorted({candidate.class_name for candidate in list_elpv(label, threshold, classes).candidates})


@dataclass(frozen=True)
class SourceTask:
    """The task a source defines: its name and its class set."""

    name: str
    classes: list[str]


def folder_task(folder: Path, class_names: list[str]) -> SourceTask:
    """A folder source's task: the folder's name (a pre-split tree's too) and its class set, e.g.
    ``hymenoptera-ants-bees``."""
    return SourceTask(f"{slugify(Path(folder).name)}-{class_set_suffix(class_names)}", sorted(class_names))


def name_source_task(source: str, classes: list[str] | None, elpv_label: str, elpv_threshold: float,
                     root: Path | None = None) -> SourceTask:
    """The task of a source (``data.*`` params): each data set and class set is its own task.

    ELPV: ``elpv-defect`` or ``elpv-type`` (the labelling names the class set; a subset kept by
    ``classes`` is appended); a folder: its name and class set (:func:`folder_task`).

    Raises:
        SourceError: When the source cannot be listed.
    """
    if source == ELPV:
        found = elpv_class_names(elpv_label, elpv_threshold, classes)
        everything = found if classes is None else elpv_class_names(elpv_label, elpv_threshold)
        suffix = "" if found == everything else f"-{class_set_suffix(found)}"
        return SourceTask(f"elpv-{elpv_label}{suffix}", found)
    folder = source_folder(source, root)
    return folder_task(folder, folder_class_names(folder, classes))
