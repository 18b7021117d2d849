"""odtk's modules import each other without a cycle (imports inside functions count too: they only delay one)."""
import ast
import os
from typing import Dict, List, Optional, Set

import odtk

PACKAGE = os.path.dirname(os.path.abspath(odtk.__file__))


def _module_files() -> Dict[str, str]:
    """Dotted module name -> path, for odtk/*.py and odtk/backbones/*.py (a package is its __init__)."""
    files = {}
    for sub in ("", "backbones"):
        folder = os.path.join(PACKAGE, sub)
        prefix = ".".join(p for p in ("odtk", sub) if p)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                stem = name[:-3]
                files[prefix if stem == "__init__" else f"{prefix}.{stem}"] = os.path.join(folder, name)
    return files


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imports(node: ast.AST) -> List[ast.stmt]:
    """Every import statement under `node`, at module level or in a function, except in the body of
    `if TYPE_CHECKING:` (never run)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [node]
    children = node.orelse if _type_checking_only(node) else ast.iter_child_nodes(node)
    return [found for child in children for found in _imports(child)]


def _resolve(name: str, modules: Set[str]) -> Optional[str]:
    """The odtk module that importing `name` runs last: the longest known prefix (odtk.x.y -> odtk.x)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _top_level_names(path: str) -> Set[str]:
    """Names a package's __init__ binds at module level (assignments, definitions, imports)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _from_target(base: str, name: str, modules: Set[str], files: Dict[str, str]) -> Optional[str]:
    """The odtk module `from base import name` runs: the submodule base.name if there is one, else base, except
    for a name a package's __init__ does not bind: a module that is not Python source (odtk._C, compiled)."""
    if f"{base}.{name}" in modules:
        return f"{base}.{name}"
    if base in files and files[base].endswith("__init__.py") and name not in _top_level_names(files[base]):
        return None
    return base


def import_graph() -> Dict[str, Set[str]]:
    files = _module_files()
    modules = set(files)
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in files.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[:len(parts) - node.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                targets = [_from_target(base, a.name, modules, files) for a in node.names]
            for target in filter(None, targets):
                resolved = _resolve(target, modules) if target.split(".")[0] == "odtk" else None
                if resolved and resolved != module:
                    graph[module].add(resolved)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of the directed graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_graph_sees_relative_absolute_and_function_imports():
    graph = import_graph()
    assert "odtk.backbones" in graph["odtk.model"]                  # from .backbones import build_backbone
    assert "odtk.box" in graph["odtk.model"]                        # from . import box as box_ops
    assert "odtk.utils" in graph["odtk.backbones"]                  # from ..utils import OdtkError
    assert "odtk.backbones.fpn" in graph["odtk.backbones"]          # from .fpn import FPN
    assert "odtk.dali" in graph["odtk.data"]                        # inside loader_factory
    assert "odtk.infer" in graph["odtk.train"]                      # inside validate
    assert "odtk.main" in graph["odtk.__main__"]
    assert "odtk.version" in graph["odtk.onnx_meta"]                # from .version import __version__
    assert graph["odtk.extension"] == {"odtk.utils"}                # from . import _C: compiled, not odtk's Python


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_odtk_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _calls(name: str) -> Set[str]:
    """module.function (or module for module level) of every call to a function or method called `name`."""
    found = set()

    def walk(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, f"{where}.{child.name}")
                continue
            if isinstance(child, ast.Call):
                func = child.func
                if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) == name:
                    found.add(where)
            walk(child, where)

    for module, path in _module_files().items():
        with open(path) as f:
            walk(ast.parse(f.read(), path), module)
    return found


def test_only_entry_points_configure_logging():
    """Library code logs to the "odtk" logger and leaves handlers to the application: only odtk's entry points (the
    CLI, and the worker processes it spawns) call setup_logging, the one place with logging.basicConfig."""
    assert _calls("basicConfig") == {"odtk.utils.setup_logging"}
    assert _calls("setup_logging") == {"odtk.distributed.worker_setup"}
    assert _calls("worker_setup") == {"odtk.main.main", "odtk.distributed._run"}
    assert _calls("set_num_threads") == {"odtk.distributed.worker_setup"}
