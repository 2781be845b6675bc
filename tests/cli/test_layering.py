"""Imports run one way (docs/design.md, "The layers"): every import of the package — top-level or inside a
function — reaches its own room or a lower floor, and the modules import each other without a circle.

A room is a top-level module or sub-package of mindone_idefics3; `FLOORS` places every room (a new one must be
placed here). Names imported from the package root (`from mindone_idefics3 import Idefics3Processor`) count as
imports of the module that defines them."""
import ast
from pathlib import Path

import pytest

import mindone_idefics3

PACKAGE = Path(__file__).resolve().parents[2] / "mindone_idefics3"
# floor → rooms; a room may import its own room and the floors below it
FLOORS = [
    {"errors", "version", "compat"},
    {"files", "json_file", "process", "distributed", "hub", "config", "device", "runtime", "prefix"},
    {"weights"},
    {"ops", "processing"},
    {"generation"},  # the model class inherits GenerationMixin, as transformers' models do
    {"model"},
    {"runner", "chat", "continuous", "image_cache", "compile_cache", "demo", "cli_options"},
    {"convert", "finetune", "batch", "serve", "eval"},
    {"cli", "__init__", "__main__"},
]
FLOOR = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


def room_of(parts) -> str:
    """The room of a module path inside the package (('model', 'llama') → 'model')."""
    name = parts[0]
    if name in mindone_idefics3._LAZY:  # a public name of the package root: where it is defined
        return mindone_idefics3._LAZY[name].split(".")[1]
    return name


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path):
    """(line, the imported mindone_idefics3 module path as parts after the package name) of every import in
    `path`, wherever it stands (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            names = [module + [a.name] for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        for parts in names:
            if parts and parts[0] == "mindone_idefics3" and len(parts) > 1:
                yield node.lineno, tuple(parts[1:])


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_room_has_a_floor():
    rooms = {f.relative_to(PACKAGE).parts[0].removesuffix(".py") for f in FILES}
    assert rooms <= set(FLOOR), f"place these rooms in FLOORS: {sorted(rooms - set(FLOOR))}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    upward = [(line, ".".join(parts)) for line, parts in imported_modules(path)
              if room_of(parts) != own and FLOOR.get(room_of(parts), -1) > FLOOR[own]]
    assert not upward, f"{own} (floor {FLOOR[own]}) imports upward: {upward}"


def test_no_import_cycle():
    modules = {module_name(f): f for f in FILES}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for _, parts in imported_modules(path):
            if parts[0] in mindone_idefics3._LAZY:
                parts = tuple(mindone_idefics3._LAZY[parts[0]].split(".")[1:])
            # `from .pkg import name`: the module pkg.name if it is one, else pkg
            for n in (len(parts), len(parts) - 1):
                target = ".".join(("mindone_idefics3",) + parts[:n])
                if target in modules and target != name:
                    edges.add(target)
                    break
        graph[name] = edges
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycle, f"import cycles: {cycle}"
