"""The module paths of before the package split (issue 21) as aliases of the modules that hold that code now.

Models logged before the split reference the old paths: a joblib'd SVM pickles
``tlpipe.svm.LinearSVM`` and the models-from-code file copied into each model
imports ``tlpipe.pyfunc``. :class:`LegacyFinder` (installed first on
``sys.meta_path`` by ``tlpipe/__init__.py``) answers only for those old paths: importing
``tlpipe.svm`` returns the module object ``tlpipe.train.svm`` itself, so a class
unpickled by its old path is the very class of today. Installing it imports nothing.

``tlpipe.features`` and ``tlpipe.tracking`` are packages now and cannot also be the
old modules; nothing logged references them.
"""

from __future__ import annotations

import importlib
import sys
from importlib.machinery import ModuleSpec

LEGACY_MODULES = {
    "calibration": "serving.calibration",
    "cluster": "ops.cluster",
    "compare": "evaluation.compare",
    "compare_backbones": "evaluation.compare_backbones",
    "config": "core.params",
    "ensemble": "evaluation.ensemble",
    "errors": "core.errors",
    "evaluate": "evaluation.evaluate",
    "finetune": "train.networks.training",
    "formats": "render.formats",
    "images": "data.images",
    "imagenet": "features.imagenet",
    "ingest": "data.ingest",
    "local_store": "tracking.sqlite_store",
    "lock": "ops.lock",
    "models": "core.names",
    "paths": "core.paths",
    "pipeline_summary": "evaluation.pipeline_summary",
    "plots": "render.plots",
    "predict": "serving.predict",
    "prefect_server": "ops.prefect_server",
    "prefect_watchdog": "ops.prefect_watchdog",
    "process_group": "ops.process_group",
    "process_identity": "ops.process_identity",
    "pyfunc": "serving.classifier",
    "pyfunc_model": "serving.pyfunc_model",
    "registry": "tracking.registry",
    "report": "render.html",
    "selection": "train.selection",
    "services": "ops.services",
    "sources": "core.sources",
    "store": "data.store",
    "svm": "train.svm",
    "torch_pickle": "features.backbones.torch_pickle",
}
"""Old module (under ``tlpipe.``) -> the module holding its code (or, when split, its pickled classes) now."""
LEGACY_PACKAGES = {"backbones": "features.backbones"}
"""Old package -> new package; its submodules keep their names."""


def resolve_legacy(fullname: str) -> str | None:
    """The module an old dotted path now names (None: not an old path)."""
    if not fullname.startswith("tlpipe."):
        return None
    rest = fullname[len("tlpipe."):]
    if rest in LEGACY_MODULES:
        return f"tlpipe.{LEGACY_MODULES[rest]}"
    head, _, tail = rest.partition(".")
    if head in LEGACY_PACKAGES:
        return f"tlpipe.{LEGACY_PACKAGES[head]}{'.' + tail if tail else ''}"
    return None


class AliasLoader:
    """Loads an old path as the new module object itself (it replaces itself in ``sys.modules``)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: ModuleSpec) -> None:
        """Default module creation (the placeholder is replaced in :meth:`exec_module`)."""
        return None

    def exec_module(self, module) -> None:
        """Import the new module and put it in ``sys.modules`` under the old name."""
        sys.modules[module.__name__] = importlib.import_module(self.target)


class LegacyFinder:
    """A meta-path finder answering only for the old module paths (:data:`LEGACY_MODULES`)."""

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        """A spec aliasing ``fullname`` to its new module, or None for any other name."""
        new = resolve_legacy(fullname)
        return ModuleSpec(fullname, AliasLoader(new)) if new else None


def install_legacy_finder() -> None:
    """Put :class:`LegacyFinder` first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, LegacyFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, LegacyFinder())
