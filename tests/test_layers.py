"""The folders are layers and imports point down: a test reads the import graph of every package module."""

import ast
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CORE = {"matmul", "attention", "checkpoint", "experts", "protos"}
# package -> the packages it may import. Training sits beside the serving stack: it uses the core,
# and only the benchmarks and the CLI use it.
ALLOWED = {
    "protos": set(),
    "matmul": set(),
    "attention": {"matmul"},
    "checkpoint": set(),
    "experts": {"matmul", "checkpoint", "protos"},
    "router": _CORE,
    "training": _CORE | {"router"},
    "server": _CORE | {"router"},
    "cluster": _CORE | {"router", "server"},
    "bench": _CORE | {"router", "server", "cluster", "training"},
    "experiment": _CORE | {"router", "server", "cluster", "training", "bench"},
    "cli": _CORE | {"router", "server", "cluster", "training", "bench", "experiment"},
}


def imported_packages(source: str) -> set[str]:
    """Top-level names of every import in a module, those inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def upward_imports(root: Path) -> list[str]:
    """'module imports package' for every import of a project package its layer may not use."""
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for name in imported_packages(path.read_text()) & set(ALLOWED):
                if name != package and name not in allowed:
                    bad.append(f"{path.relative_to(root)} imports {name}")
    return bad


def test_every_package_is_a_known_layer():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages == set(ALLOWED), "a new package needs its place in ALLOWED"


def test_imports_point_down():
    assert upward_imports(REPO) == []


def test_an_upward_import_is_caught(tmp_path):
    for package in ALLOWED:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    model = tmp_path / "router" / "model.py"
    model.write_text(model.read_text() + "\n\ndef late():\n    from cluster.app import build_app\n")
    assert upward_imports(tmp_path) == ["router/model.py imports cluster"]
