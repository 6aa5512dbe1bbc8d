"""List the labelled image files of a source: a class-folder tree, a pre-split tree, or ELPV.

A source listing never opens an image; it only finds candidate files, their class
and (for pre-split trees) their split, and rejects what is unsafe to read.
"""

from __future__ import annotations

from tlpipe.errors import UserError
import os
from dataclasses import dataclass, field
from pathlib import Path

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
