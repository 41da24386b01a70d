"""The house rules of docs/architecture.md, checked on the source: stage subpackages, imports only from the base and
earlier stages (lazy imports included), no import circle, no module over 450 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "dwml"
BASE = ("errors", "io", "config", "checks")
STAGES = ("data", "models", "distill", "training", "evaluation", "experiments")
MAX_LINES = 450


def rank(module: str) -> int:
    """0 for the base modules, 1..6 for the stages in pipeline order, 7 for the console script."""
    part = module.split(".")[1] if "." in module else "__init__"
    if part in BASE or part == "__init__":
        return 0
    if part == "cli":
        return len(STAGES) + 1
    return STAGES.index(part) + 1


def type_checking_nodes(tree: ast.AST) -> set[int]:
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING" for n in ast.walk(node)}


def imports_of(path: Path) -> set[str]:
    """The dwml modules that `path` imports anywhere (top level and inside functions), TYPE_CHECKING blocks aside."""
    rel = path.relative_to(PKG.parent).with_suffix("").parts
    package = list(rel[:-1])
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("dwml"):
                target = node.module
            else:
                continue
            # `from X import y`: y may be a submodule of X (graph() keeps only names that are modules)
            found |= {target} | {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dwml")}
    return found


def graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(PKG.parent).with_suffix("").parts): p for p in PKG.rglob("*.py")}
    modules = {m.removesuffix(".__init__"): p for m, p in modules.items()}
    return {m: {d for d in imports_of(p) if d in modules and d != m} for m, p in modules.items()}


def test_stages_are_subpackages():
    assert sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()) == sorted(STAGES)
    top = sorted(p.stem for p in PKG.glob("*.py"))
    assert top == sorted((*BASE, "cli", "__init__"))


def test_imports_go_only_to_the_base_and_earlier_stages():
    upward = [f"{m} -> {d}" for m, deps in graph().items() for d in deps if rank(d) > rank(m)]
    assert not upward, upward


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                circles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_module_fits_in_a_head(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES


def test_the_checker_sees_a_circle_and_an_upward_lazy_import(tmp_path, monkeypatch):
    """The rules are not vacuous: a lazy upward import and a two-module circle are both found."""
    pkg = tmp_path / "dwml"
    (pkg / "data").mkdir(parents=True)
    (pkg / "training").mkdir()
    for d in ("", "data", "training"):
        (pkg / d / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from ..training import b\n")
    (pkg / "training" / "b.py").write_text("from ..data.a import f\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    g = graph()
    assert g["dwml.data.a"] == {"dwml.training", "dwml.training.b"} and g["dwml.training.b"] == {"dwml.data.a"}
    with pytest.raises(AssertionError):
        test_imports_go_only_to_the_base_and_earlier_stages()
    with pytest.raises(AssertionError):
        test_no_import_circle()
