"""The package's shape: one import name, layered imports without cycles, no test importing a benchmark.

The import graph is read from the source with ``ast`` (imports inside functions included), not
from what happens to be loaded, so a cycle hidden behind a lazy import is found too.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
from pathlib import Path

import mfsim

PACKAGE_DIR = Path(mfsim.__file__).resolve().parent  # the repository root, or site-packages/mfsim
TESTS_DIR = Path(__file__).resolve().parent
LAYERS = ("kernels", "pipeline", "jobs")  # each may import only from itself and the layers before it


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR).with_suffix("")
    return ".".join(("mfsim", *rel.parts)).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every ``mfsim...`` module or package a file imports (``from a import b`` counts as a.b when b is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mfsim"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mfsim")}
    return out


def import_graph() -> dict[str, set[str]]:
    files = [f for layer in LAYERS for f in (PACKAGE_DIR / layer).rglob("*.py")]
    modules = {_module_name(f): f for f in files}
    return {name: {d for d in _imports(f) if d in modules and d != name} for name, f in modules.items()}


def test_one_top_level_import_name():
    names = sorted(k for k, dists in importlib.metadata.packages_distributions().items() if "mfsim" in dists)
    assert names == ["mfsim"]
    assert mfsim.__version__ == importlib.metadata.version("mfsim")
    for name in ("mfsim.pipeline", "mfsim.kernels", "mfsim.jobs", "mfsim.jobs.cli", "mfsim.jobs.bench.svd"):
        assert importlib.import_module(name).__file__.startswith(str(PACKAGE_DIR))
    config = importlib.import_module("mfsim.pipeline.config")
    assert config.DEFAULT_CONFIG.is_file()  # conf/ ships with the package


def test_layers_import_only_downwards():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the project's modules
    for module, deps in graph.items():
        layer = LAYERS.index(module.split(".")[1])
        for dep in deps:
            assert LAYERS.index(dep.split(".")[1]) <= layer, f"{module} imports {dep}"


# Within ``pipeline``: the run bookkeeping (``runs/``) stands on the vocabulary and the runtime helpers only, and
# the math (``model/``) and the lists (``lists/``) never reach the bookkeeping: they take a timer or a callable.
VOCABULARY = {"mfsim.pipeline.config", "mfsim.pipeline.registry", "mfsim.pipeline.errors", "mfsim.pipeline.outputs"}
RUNTIME = {"mfsim.pipeline.logs", "mfsim.pipeline.progress"}


def _in(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_runs_import_only_the_vocabulary_and_runtime_helpers():
    graph = import_graph()
    runs = [m for m in graph if _in("mfsim.pipeline.runs", m)]
    assert len(runs) >= 5  # the walk found the package's modules
    for module in runs:
        for dep in graph[module]:
            if _in("mfsim.pipeline", dep) and dep != "mfsim.pipeline":
                assert _in("mfsim.pipeline.runs", dep) or dep in VOCABULARY | RUNTIME, f"{module} imports {dep}"


def test_math_and_lists_never_import_the_run_bookkeeping():
    graph = import_graph()
    checked = [m for m in graph if _in("mfsim.pipeline.model", m) or _in("mfsim.pipeline.lists", m)]
    assert len(checked) >= 8
    for module in checked:
        for dep in graph[module]:
            assert not _in("mfsim.pipeline.runs", dep), f"{module} imports {dep}"


# The math, the lists and the report in that order: each may read the ones before it, never one after.
PIPELINE_ORDER = ("mfsim.pipeline.model", "mfsim.pipeline.lists", "mfsim.pipeline.report")


def test_math_lists_report_import_only_downwards():
    graph = import_graph()
    for module, deps in graph.items():
        mine = [i for i, pkg in enumerate(PIPELINE_ORDER) if _in(pkg, module)]
        for dep in deps:
            theirs = [i for i, pkg in enumerate(PIPELINE_ORDER) if _in(pkg, dep)]
            if mine and theirs:
                assert theirs[0] <= mine[0], f"{module} imports {dep}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path ``[m, ..., m]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    # two modules that import each other, one of them inside a function
    (tmp_path / "a.py").write_text("import numpy\n\ndef f():\n    from mfsim.jobs.b import g\n")
    (tmp_path / "b.py").write_text("from mfsim.jobs.a import f\n")
    graph = {"mfsim.jobs.a": _imports(tmp_path / "a.py") & {"mfsim.jobs.b"},
             "mfsim.jobs.b": _imports(tmp_path / "b.py") & {"mfsim.jobs.a"}, "mfsim.jobs.c": set()}
    assert find_cycle(graph) == ["mfsim.jobs.a", "mfsim.jobs.b", "mfsim.jobs.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_no_test_imports_a_benchmark():
    for path in TESTS_DIR.rglob("*.py"):
        for dep in _imports(path):
            assert not dep.startswith("mfsim.jobs.bench"), f"{path.name} imports the benchmark {dep}"


def test_a_built_wheel_holds_only_mfsim_and_works_installed(tmp_path):
    """``pip install .`` (not editable): one top-level name, and the installed copy imports and loads its config."""
    import os
    import subprocess
    import sys
    import zipfile

    repo = TESTS_DIR.parent
    if not (repo / "pyproject.toml").is_file():
        import pytest

        pytest.skip("the tests are not beside the project's source tree")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(repo)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("mfsim-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        assert {t for t in tops if not t.endswith(".dist-info")} == {"mfsim"}
        assert "mfsim/conf/default.yaml" in zf.namelist() and "mfsim/jobs/bench/svd.py" in zf.namelist()
        zf.extractall(tmp_path / "site")
    # the installed copy comes first on the path, before the editable finder of this venv
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = ("import mfsim, mfsim.pipeline, mfsim.kernels, mfsim.jobs, mfsim.jobs.cli;"
            "from mfsim.pipeline.config import load_config;"
            "assert load_config().svd.rank == 64; print(mfsim.__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent == tmp_path / "site" / "mfsim"
