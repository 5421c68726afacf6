"""The package's imports point one way: no module imports one that imports it back, not even
inside a function (DESIGN.md's module table)."""

import ast
from pathlib import Path

import distml

PACKAGE = Path(distml.__file__).parent


def distml_imports(path: Path) -> set[str]:
    """The distml modules a file imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "distml":  # from distml import x: x may be a module
                found |= {f"distml.{alias.name}" for alias in node.names}
            elif node.module.startswith("distml."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("distml.")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {f"distml.{path.stem}": path for path in PACKAGE.glob("*.py")}
    return {name: distml_imports(path) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (first module repeated at the end), or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for target in sorted(graph[name]):
            cycle = visit(target, [*path, name])
            if cycle:
                return cycle
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name, [])
        if cycle:
            return cycle
    return None


def test_no_module_imports_one_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_checker_sees_function_level_imports(tmp_path: Path):
    (tmp_path / "a.py").write_text("def f():\n    from distml.b import g\n")
    assert distml_imports(tmp_path / "a.py") == {"distml.b"}
    assert find_cycle({"distml.a": {"distml.b"}, "distml.b": {"distml.a"}}) == [
        "distml.a",
        "distml.b",
        "distml.a",
    ]


def test_collectives_never_import_the_loop_or_the_launcher():
    graph = import_graph()
    assert not graph["distml.dist"] & {"distml.train", "distml.launch"}
    assert "distml.launch" not in graph["distml.train"]
