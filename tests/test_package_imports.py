"""The fdtrain package's import graph has no cycles, and the shard format's rules have one owner.

Pure ``ast`` over the source files (nothing is imported, so no torch): every ``import x``,
``from x import y`` and relative ``from . import y`` becomes an edge to the module it loads; an
import of a package is an edge to its ``__init__``, and ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``. Python loads a package's ``__init__`` before
any of its modules, but that implicit edge is left out: a package's ``__init__`` re-exporting its
modules is the usual pattern, not a cycle.

Module-level imports (including those under ``if``/``try``; not ``if TYPE_CHECKING:``, which never
runs) must form no cycle. Imports inside functions are collected separately: those of the data
package must not close a cycle either, so that none of them exists only to dodge one (they are
there for optional or heavy dependencies: DALI, torch behind ``fdtrain --help``).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fdtrain"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(module-level targets, function-level targets) inside the fdtrain package."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    top: set[str] = set()
    inner: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        found = set()
        if isinstance(node, ast.Import):
            bases = [a.name for a in node.names]
            names: list[str] = []
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                bases = [".".join(base + ([node.module] if node.module else []))]
            else:
                bases = [node.module or ""]
            names = [a.name for a in node.names]
        for base in bases:
            if not names and base in modules:
                found.add(base)
            for n in names:  # a module of the package, else a name from the package's (or module's) file
                found.add(f"{base}.{n}" if f"{base}.{n}" in modules else base)
        return found & modules.keys()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (inner if in_function else top).update(targets(child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return top - {name}, inner - {name}


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    top, inner = {}, {}
    for name, path in modules.items():
        top[name], inner[name] = _imports(name, path, modules)
    return top, inner


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def test_graph_sees_relative_and_package_imports(tmp_path):
    """The parser itself: a relative import, a package import and `from pkg import module` all count."""
    modules = {"fdtrain": PKG, "fdtrain.a": PKG, "fdtrain.sub": PKG, "fdtrain.sub.b": PKG, "fdtrain.sub.c": PKG}
    src = "from . import c\nfrom .. import a, Y\nimport fdtrain.sub\nfrom fdtrain.sub import c as d, X\nimport numpy\n"
    tmp = tmp_path / "b.py"
    tmp.write_text(src + "def f():\n    from fdtrain import a\n")
    top, inner = _imports("fdtrain.sub.b", tmp, modules)
    assert top == {"fdtrain.sub.c", "fdtrain.a", "fdtrain", "fdtrain.sub"} and inner == {"fdtrain.a"}
    assert _find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]
    assert _find_cycle({"x": {"y"}, "y": set()}) is None


def test_no_import_cycle_at_module_level():
    top, _ = _graph()
    assert len(top) > 40 and "fdtrain.data.format" in top
    cycle = _find_cycle(top)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_function_level_imports_of_data_close_no_cycle():
    top, inner = _graph()
    n_inner = sum(len(v) for v in inner.values())
    assert n_inner > 0  # counted apart: imports deferred for optional or heavy dependencies
    both = {n: top[n] | (inner[n] if n.startswith("fdtrain.data") else set()) for n in top}
    cycle = _find_cycle(both)
    assert cycle is None, "cycle through a function-level import in fdtrain.data: " + " -> ".join(cycle)


def test_backends_do_not_import_the_factory():
    top, inner = _graph()
    for backend in ("fdtrain.data.loading.torch_loader", "fdtrain.data.loading.dali_pipeline",
                    "fdtrain.data.loading.base", "fdtrain.data.loading.sampling"):
        assert not {"fdtrain.data.loading", "fdtrain.data.loading.build"} & (top[backend] | inner[backend]), backend
    assert "fdtrain.data.loading.build" not in top["fdtrain.data.prep.commands"]


def test_prep_and_format_do_not_need_loading():
    """Offline preparation and the format are torch-free: they never import the loading package."""
    top, inner = _graph()
    for name in top:
        if name.startswith(("fdtrain.data.prep", "fdtrain.data.format")):
            assert not any(m.startswith("fdtrain.data.loading") for m in top[name] | inner[name]), name


def _defined(pattern: str) -> list[str]:
    rx = re.compile(pattern, re.M)
    return [f"{p.relative_to(PKG.parent)}:{src[:m.start()].count(chr(10)) + 1}"
            for p in sorted(PKG.rglob("*.py")) for src in [p.read_text()] for m in rx.finditer(src)]


def test_shard_format_rules_have_one_owner():
    fmt = "fdtrain/data/format.py"
    for what, pattern in [
        ("an image-extension constant", r"^\s*\w*IMAGE_EXTS?\s*[:=]"),
        ("the sample-key rule", r"^\s*def \w*sample_key\w*\("),
        ("the member (key, ext) split", r"^\s*def \w*split_member\w*\("),
        ("the cls label rule", r"^\s*def \w*parse_label\w*\("),
        ("the index header", r"^\s*INDEX_VERSION\s*="),
        ("manifest reading", r"^\s*def \w*read_manifest\w*\("),
        ("the index writer", r"^\s*def \w*write_index\w*\("),
    ]:
        found = _defined(pattern)
        assert len(found) == 1 and found[0].startswith(fmt + ":"), f"{what} defined in {found}, want once in {fmt}"
    # nobody restates the rules inline: the first-dot key split, the index header, manifest parsing
    inline = _defined(r'find\("\.",|f"v1\.2 |"v1\.2"|json\.loads\(\w*[Mm]anifest')
    # Known leftover, outside the data package: `fdtrain train --print-schedule` reads the manifest's
    # counts itself (engine/commands.py); it is to call format.read_manifest when the engine is reworked.
    leftover = ("fdtrain/engine/commands.py:",)
    outside = [x for x in inline if not x.startswith((fmt + ":", *leftover))]
    assert outside == [], f"restated outside {fmt}: {outside}"


# ----------------------------------------------------------------------------------------------
# docs/design.md: the package map lists every module, and imports go the way it says
# ----------------------------------------------------------------------------------------------
DESIGN = PKG.parent / "docs" / "design.md"


def _design() -> tuple[dict[str, int], set[str]]:
    """(unit -> level from the 'Direction of imports' block, module paths in the table)."""
    text = DESIGN.read_text()
    block = text.split("## Direction of imports", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    levels = {}
    for line in block.strip().splitlines():
        level, *units = line.split()
        for u in units:
            assert u not in levels, f"docs/design.md lists {u} twice"
            levels[u] = int(level)
    listed = set(re.findall(r"^\| `(fdtrain/[\w/]+\.py)` \|", text, re.M))
    return levels, listed


def _unit(module: str, units: dict[str, int]) -> str:
    """The longest listed unit that is the module or contains it."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in units:
            return ".".join(parts[:i])
    raise AssertionError(f"{module}: in no unit of docs/design.md's 'Direction of imports'")


def test_package_map_lists_every_module_and_nothing_else():
    _, listed = _design()
    actual = {str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py")}
    assert not actual - listed, f"modules missing from docs/design.md: {sorted(actual - listed)}"
    assert not listed - actual, f"docs/design.md lists modules that do not exist: {sorted(listed - actual)}"


def _against_direction(levels: dict[str, int], graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for a, targets in graph.items():
        ua = _unit(a, levels)
        for b in targets:
            ub = _unit(b, levels)
            if ua != ub and levels[ub] >= levels[ua]:
                wrong.append(f"{a} (level {levels[ua]}) imports {b} (level {levels[ub]})")
    return wrong


def test_imports_go_the_way_the_package_map_says():
    """Every import (module- or function-level) goes from a unit to one on a line above it."""
    levels, _ = _design()
    top, inner = _graph()
    wrong = _against_direction(levels, top) + _against_direction(levels, inner)
    assert not wrong, "imports against docs/design.md's direction:\n" + "\n".join(sorted(wrong))
    # the check itself: an upward import, and one between units of the same line, are caught
    assert _against_direction(levels, {"fdtrain.config": {"fdtrain.engine.trainer"}})
    assert _against_direction(levels, {"fdtrain.metrics": {"fdtrain.losses"}})
    assert not _against_direction(levels, {"fdtrain.engine.trainer": {"fdtrain.engine.optim", "fdtrain.config"}})
