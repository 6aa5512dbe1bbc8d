"""dvc.yaml lists, for every stage, each project module its process can import (issue 11, item 5).

A stage's process is ``bin/python -m <module>`` (its ``cmd``). The project modules it can import are found
statically and transitively from that module with :mod:`ast`: every ``import``/``from ... import`` anywhere
in a reached module (inside functions too: lazy imports run in the stage), plus the ``__init__.py`` of every
package on the way (Python executes them). ``if TYPE_CHECKING:`` blocks are skipped (never executed).
A project module is a ``.py`` file under the repository root; third-party modules are not followed.
Dynamic imports (``importlib.import_module``) are invisible to this test: keep imports static.

The test fails naming each missing file, the import chain that reaches it, and the exact lines to add
under the stage's ``deps:`` in dvc.yaml; it also fails on listed ``.py`` deps the stage never imports
(they rerun the stage for nothing).
"""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The project file of a dotted module name (``a/b.py`` or ``a/b/__init__.py``), or None if not ours."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def is_type_checking(node: ast.AST) -> bool:
    """True for ``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:``."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


@dataclass
class Scope:
    """What one piece of a module does when it runs: the modules it imports and the names it uses."""

    imports: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)


def _collect(node: ast.AST, scope: Scope, package: str) -> None:
    """Add the imports and referenced names under ``node`` (one scope: nested code included) to ``scope``."""
    pending = [node]
    while pending:
        node = pending.pop()
        if is_type_checking(node):  # never executed
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            scope.imports.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from .. import y
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            scope.imports.add(base)
            scope.imports.update(f"{base}.{alias.name}" for alias in node.names)  # kept if a module file
            scope.names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Name):
            scope.names.add(node.id)
        elif isinstance(node, ast.Attribute):
            scope.names.add(node.attr)
        pending.extend(ast.iter_child_nodes(node))


def module_scopes(path: Path, module: str) -> dict[str | None, Scope]:
    """Split a module into scopes: ``None`` (what runs at import: top-level statements, decorators,
    defaults, class bodies) and one per top-level function or class (its body, methods included), keyed by
    name. A function's body runs only if its name is used somewhere that runs; imports inside it (lazy
    imports) count only then."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    scopes: dict[str | None, Scope] = {None: Scope()}
    pending: list[ast.stmt] = list(ast.parse(path.read_text(), filename=str(path)).body)
    while pending:
        node = pending.pop()
        if is_type_checking(node):
            pending.extend(node.orelse)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = scopes.setdefault(node.name, Scope())
            header = [*node.decorator_list, *getattr(node, "bases", []), *getattr(node, "keywords", [])]
            if isinstance(node, ast.ClassDef):
                header += [stmt for stmt in node.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))]
                inner = [stmt for stmt in node.body if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))]
            else:
                header += [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]
                inner = node.body
            for part in header:
                _collect(part, scopes[None], package)
            for part in inner:
                _collect(part, body, package)
        elif isinstance(node, (ast.If, ast.Try)):
            # module-level if/try blocks: their statements may define functions too
            for field_name in ("body", "orelse", "finalbody"):
                pending.extend(getattr(node, field_name, []))
            for handler in getattr(node, "handlers", []):
                pending.extend(handler.body)
            if isinstance(node, ast.If):
                _collect(node.test, scopes[None], package)
        else:
            _collect(node, scopes[None], package)
    return scopes


def with_packages(names: set[str]) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first."""
    return {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2)}


@cache
def project_imports(entry: str, root: Path = REPO) -> dict[str, tuple[str, ...]]:
    """Every project file (posix path relative to ``root``) the process ``python -m entry`` may import, each
    with the chain (``file`` or ``file:function``) that reaches it from the entry module.

    Reachability is a fixpoint: a module's import-time scope runs when the module is imported; a top-level
    function or class of a reached module runs when its name is used by any running scope (name-based, so
    it errs on the side of including)."""
    modules: dict[str, tuple[str, dict[str | None, Scope]]] = {}  # rel -> (module name, scopes)
    chains: dict[str, tuple[str, ...]] = {}
    running: set[tuple[str, str | None]] = set()
    names: set[str] = set()

    def reach(name: str, chain: tuple[str, ...]) -> None:
        path = module_file(name, root)
        if path is not None and (rel := path.relative_to(root).as_posix()) not in modules:
            modules[rel] = (name, module_scopes(path, name))
            chains[rel] = (*chain, rel)

    for name in sorted(with_packages({entry})):
        reach(name, ())
    changed = True
    while changed:
        changed = False
        for rel, (_name, scopes) in list(modules.items()):
            for key, scope in scopes.items():
                if (rel, key) in running or (key is not None and key not in names):
                    continue
                running.add((rel, key))
                changed = True
                names.update(scope.names)
                via = chains[rel][:-1] + (f"{rel}:{key}" if key else rel,)
                for imported in sorted(with_packages(scope.imports)):
                    reach(imported, via)
    return chains


def entry_module(cmd: str) -> str:
    """The module a stage runs: ``<python> -m <module>`` (the only form dvc.yaml uses)."""
    words = shlex.split(cmd)
    assert "-m" in words, f"stage cmd {cmd!r}: expected '<python> -m <module>'"
    return words[words.index("-m") + 1]


#: Project modules that cannot change any stage's outputs: dvc.yaml leaves them out of the stages' deps, so
#: editing them reruns nothing (issue 20, item 10). Reviewed one by one: a module belongs here only if no
#: file a stage writes (outs, metrics) is derived from it; each entry says why.
OUTPUT_NEUTRAL = {
    "flows/common.py": "the stage entry point around a flow: Prefect context, one-line errors, exit codes",
    "tlpipe/ops/lock.py": "the pipeline lock and file locks: whether a stage may run, not what it writes",
    "tlpipe/ops/process_identity.py": "pid and start time of a lock's or a server's owner",
    "tlpipe/ops/processes.py": "ports, health checks and process groups of the servers",
    "tlpipe/ops/prefect_server.py": "which Prefect server the flows report to, started and stopped",
    "tlpipe/ops/pause.py": "fault tests' pause points: wait, then go on unchanged",
    "tlpipe/tracking/sqlite_store.py": "creates the MLflow SQLite store (tracking only)",
}
#: Modules neutral for every stage but some: ``{module: (stages whose outputs it can change, why)}``.
#: MLflow logging writes nothing DVC tracks, except in evaluate: its report and promotion decision link the
#: MLflow runs and come from the registry's gate.
_LOGGING = (("evaluate",), "MLflow logging; evaluate's report, promotion and artifacts name the runs it logs")
OUTPUT_NEUTRAL_EXCEPT = {f"tlpipe/tracking/{name}.py": _LOGGING for name in (
    "__init__", "connection", "records", "runs", "tags", "fluent", "logged_models", "model_params")}


def output_neutral(rel: str, stage: str) -> bool:
    """Whether project file ``rel`` cannot change the outputs of ``stage`` (:data:`OUTPUT_NEUTRAL`)."""
    if rel in OUTPUT_NEUTRAL:
        return True
    stages, _ = OUTPUT_NEUTRAL_EXCEPT.get(rel, ((stage,), ""))
    return stage not in stages


def covered(rel: str, deps: list[str]) -> bool:
    """True when ``rel`` is a listed dep or inside a listed directory dep."""
    return any(rel == dep or rel.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_list_every_imported_project_module(stage):
    spec = STAGES[stage]
    deps = [str(dep) for dep in spec.get("deps", [])]
    imports = project_imports(entry_module(spec["cmd"]))
    assert imports, f"stage {stage}: entry module of {spec['cmd']!r} not found under {REPO}"
    missing = {rel: chain for rel, chain in imports.items()
               if not covered(rel, deps) and not output_neutral(rel, stage)}
    lines = "\n".join(f"      - {rel}" for rel in sorted(missing))
    chains = "\n".join(f"  {rel}: imported via {' -> '.join(chain)}" for rel, chain in sorted(missing.items()))
    assert not missing, (
        f"dvc.yaml stage '{stage}' ({spec['cmd']}) can import project files it does not depend on, so a change "
        f"there would not rerun it:\n{chains}\nAdd under stages.{stage}.deps in dvc.yaml:\n{lines}")


def test_output_neutral_modules_exist_and_are_imported_by_some_stage():
    """The exemption list stays current: each entry is a project file some stage's process imports."""
    imported = set().union(*(project_imports(entry_module(spec["cmd"])) for spec in STAGES.values()))
    for rel in [*OUTPUT_NEUTRAL, *OUTPUT_NEUTRAL_EXCEPT]:
        assert (REPO / rel).is_file(), rel
        assert rel in imported, f"{rel} is exempt but no stage imports it: drop it from the list"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_list_no_unused_project_module(stage):
    spec = STAGES[stage]
    imports = project_imports(entry_module(spec["cmd"]))
    unused = []
    for dep in map(str, spec.get("deps", [])):
        path = REPO / dep
        is_code = path.suffix == ".py" or (path.is_dir() and any(path.glob("*.py")))
        if is_code and (not any(covered(rel, [dep]) for rel in imports) or output_neutral(dep, stage)):
            unused.append(dep)  # never imported, or it cannot change the stage's outputs
    assert not unused, (
        f"dvc.yaml stage '{stage}' depends on project code its process never imports (a change there reruns "
        f"it for nothing): {', '.join(unused)}. Remove them from stages.{stage}.deps in dvc.yaml.")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_runs_through_the_project_launcher(stage):
    """``bin/python`` picks the project's interpreter whether or not a venv is activated (README commands)."""
    assert shlex.split(STAGES[stage]["cmd"])[0] == "bin/python", STAGES[stage]["cmd"]


BARE_PATH = os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir())


def launcher_copy(tmp_path: Path) -> Path:
    """A project folder with bin/python and no .venv (like a test copy of the project)."""
    (tmp_path / "bin").mkdir()
    shutil.copy2(REPO / "bin" / "python", tmp_path / "bin" / "python")
    return tmp_path


def test_launcher_runs_the_python_of_the_dvc_that_started_it(tmp_path):
    """No venv on PATH, none in the project: bin/python still finds the interpreter running ``dvc``."""
    project = launcher_copy(tmp_path)
    fake_dvc = tmp_path / "tools" / "dvc"  # argv: [<python>, .../dvc, ...] as for `.venv/bin/dvc repro`
    fake_dvc.parent.mkdir()
    fake_dvc.write_text("import subprocess, sys\nsys.exit(subprocess.run(['/bin/sh', '-c', "
                        "'bin/python -c \"import sys; print(sys.executable)\"']).returncode)\n")
    env = {"PATH": BARE_PATH, "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(fake_dvc)], cwd=project, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == sys.executable


def test_launcher_without_any_usable_python_says_what_it_tried(tmp_path):
    project = launcher_copy(tmp_path)
    env = {"PATH": BARE_PATH, "HOME": str(tmp_path), "TLPIPE_PYTHON": "/nonexistent/python"}
    for name in ("python3", "python"):
        found = shutil.which(name, path=BARE_PATH)
        probe = "import importlib.util as u; print(all(u.find_spec(m) for m in ('prefect', 'mlflow', 'keras')))"
        if found and subprocess.run([found, "-c", probe], capture_output=True, text=True).stdout.strip() == "True":
            pytest.skip(f"{found} has the project's requirements")
    result = subprocess.run(["bin/python", "-c", "print(1)"], cwd=project, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 127
    assert "no Python with the project's requirements" in result.stderr and "make setup" in result.stderr
    assert "/nonexistent/python" in result.stderr and str(project / ".venv" / "bin" / "python") in result.stderr


def test_ingest_depends_on_the_source_and_elpv_names_the_locked_package():
    """Ingest depends on ``${data.source}``: a folder source's files, or for ``elpv`` the file ./elpv, which
    must name the elpv-dataset version pyproject.toml pins (the version defines the data)."""
    import tomllib

    assert "${data.source}" in STAGES["ingest"]["deps"]
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [dep.split(";")[0].strip() for dep in dependencies if dep.startswith("elpv-dataset==")]
    named = [line.strip() for line in (REPO / "elpv").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert pins and named == pins, (
        f"./elpv names {named} but pyproject.toml pins {pins}: write the pinned line into ./elpv "
        "(ingest reruns on ELPV data only when that file changes)")


def test_import_scan_follows_lazy_imports_of_used_functions_only(tmp_path):
    """The scanner itself: package ``__init__``, relative and lazy imports; a lazy import counts only when its
    function is used by code that runs; ``TYPE_CHECKING`` imports never count."""
    files = {
        "pkg/__init__.py": "",
        "pkg/entry.py": "from pkg.helpers import used\nfrom . import eager\n\nif __name__ == '__main__':\n"
                        "    used()\n",
        "pkg/eager.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.typing_only\n",
        "pkg/helpers.py": "def used():\n    from .lazy import thing\n    return Worker().run()\n\n"
                          "def unused():\n    import pkg.never\n\nclass Worker:\n    def run(self):\n"
                          "        from pkg.sub import leaf\n",
        "pkg/lazy.py": "thing = 1\n", "pkg/never.py": "", "pkg/typing_only.py": "",
        "pkg/sub/__init__.py": "", "pkg/sub/leaf.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    chains = project_imports("pkg.entry", tmp_path)
    assert set(chains) == {"pkg/__init__.py", "pkg/entry.py", "pkg/eager.py", "pkg/helpers.py", "pkg/lazy.py",
                           "pkg/sub/__init__.py", "pkg/sub/leaf.py"}
    assert chains["pkg/sub/leaf.py"] == ("pkg/entry.py", "pkg/helpers.py:Worker", "pkg/sub/leaf.py")
    assert module_file("pkg.sub", tmp_path) == tmp_path / "pkg" / "sub" / "__init__.py"
    assert module_file("pkg.missing", tmp_path) is None
