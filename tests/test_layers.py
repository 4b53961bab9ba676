"""The package's layers: no two parts of `lfb_ray/` import each other, directly or around a loop.

A part is a top-level module (`lfb_ray/pipeline.py`) or a subpackage (`lfb_ray/bank/`). Imports
inside functions count too: they are how a loop hides (the bank build imported `identity`, which
imported the bank's format; preflight imported the training package, which imported the CLI, which
imported preflight). Read from the source with `ast`, nothing imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lfb_ray"


def _part(module: str) -> str | None:
    """`lfb_ray.bank.reader` -> `bank`; `lfb_ray.pipeline` -> `pipeline`; the package face -> None."""
    bits = module.split(".")
    return bits[1] if bits[0] == "lfb_ray" and len(bits) > 1 else None


def _module_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    bits = list(rel.parts)
    return ".".join(bits[:-1] if bits[-1] == "__init__" else bits)


def _imports(path: Path, root: Path) -> set[str]:
    """Absolute names of the lfb_ray modules `path` imports anywhere in its body."""
    me = _module_of(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from lfb_ray import storage`
    return {m for m in out if m.startswith("lfb_ray.")}


def part_graph(root: Path = PKG) -> dict[str, set[str]]:
    """{part: parts it imports}, without a part's imports of itself."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        me = _part(_module_of(path, root))
        if me is None:
            continue
        deps = {p for p in map(_part, _imports(path, root)) if p and p != me}
        graph.setdefault(me, set()).update(deps)
    return graph


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one part (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_parts_of_the_package_import_each_other():
    graph = part_graph()
    assert {"bank", "data", "train", "pipeline", "config"} <= set(graph)  # the walk saw the package
    assert loops(graph) == [], "parts of lfb_ray that import each other (also inside functions)"


@pytest.mark.parametrize("lazy", [False, True])
def test_a_loop_is_found_even_inside_a_function(tmp_path, lazy):
    """The check itself: a loop through a function-level import is reported."""
    root = tmp_path / "lfb_ray"
    (root / "bank").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "bank" / "__init__.py").write_text("")
    body = "def f():\n    from lfb_ray.identity import prepared_id\n" if lazy else "from lfb_ray import identity\n"
    (root / "bank" / "build.py").write_text(body)
    (root / "identity.py").write_text("from lfb_ray.bank.format import bank_manifests\n")
    (root / "storage.py").write_text("import os\n")
    graph = part_graph(root)
    assert graph["bank"] == {"identity"} and graph["storage"] == set()
    assert loops(graph) == [["bank", "identity"]]
