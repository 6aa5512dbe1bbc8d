"""The layout rule of ``tlpipe/`` (README "Layout"): sub-packages in layers, each importing only those below it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tlpipe"
LAYERS = ("core", "render", "ops", "data", "features", "serving", "train", "tracking", "evaluation")
"""Lowest first: a module may import its own sub-package and those before it, never one after it."""
MAX_TOP_LEVEL_MODULES = 12
MAX_LINES = 500


def imported_modules(path: Path) -> set[str]:
    """Every ``tlpipe``/``flows``/``tasks`` module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in found if name.split(".")[0] in ("tlpipe", "flows", "tasks")}


def layer_of(module: str) -> int | None:
    """The layer index of a ``tlpipe.<sub-package>...`` module (None for ``tlpipe`` itself and ``_legacy``)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_sub_packages_import_only_their_layer_and_those_below() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        own = layer_of(module)
        for name in imported_modules(path):
            if name.split(".")[0] != "tlpipe":
                wrong.append(f"{module} imports {name} (the core never imports flows or tasks)")
            elif own is not None and (layer := layer_of(name)) is not None and layer > own:
                wrong.append(f"{module} ({LAYERS[own]}) imports {name} ({LAYERS[layer]})")
    assert not wrong, "\n".join(wrong)


def test_few_modules_at_the_top_and_none_too_long() -> None:
    top = [path.name for path in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    long = [f"{path} ({n} lines)" for folder in (PACKAGE, PACKAGE.parent / "flows", PACKAGE.parent / "tasks")
            for path in folder.rglob("*.py") if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, long
