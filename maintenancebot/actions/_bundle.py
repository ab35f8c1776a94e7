"""One program text from a package of host-side modules, for `python3 -I -c TEXT`.

A host program is easier to read split into modules, but it travels as one text and runs where
maintenancebot is not installed. The modules import each other only as `from .module import
names`; the bundle puts each module after the ones it imports, the package's `__init__` (the
entry point) last, and replaces those relative imports with `pass`, since every name is then
already defined in the one namespace they all share. Anything that would behave differently
once bundled is refused here rather than found on a host: another form of relative import, an
alias, or two modules defining the same top-level name.
"""

from __future__ import annotations

import ast
import graphlib
from importlib.resources.abc import Traversable

ENTRY = "__init__"


class BundleError(Exception):
    """The package cannot be flattened into one program without changing its meaning."""


def bundle(package: Traversable) -> str:
    # Sorted, so that the text (and what a host runs) does not depend on directory order.
    sources = {item.name.removesuffix(".py"): item.read_text(encoding="utf-8")
               for item in sorted(package.iterdir(), key=lambda item: item.name)
               if item.name.endswith(".py")}
    if ENTRY not in sources:
        raise BundleError(f"{package.name} has no __init__.py to run")
    trees = {name: ast.parse(text, f"{package.name}/{name}.py") for name, text in sources.items()}
    imports = {name: relative_imports(name, tree, sources) for name, tree in trees.items()}
    check_unique_names(trees)
    graph = {name: {node.module or "" for node in nodes} for name, nodes in imports.items()}
    graph[ENTRY] |= set(sources) - {ENTRY}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise BundleError(f"{package.name}: modules import each other in a cycle: "
                          f"{' -> '.join(exc.args[1])}") from None
    return "\n\n".join(without_imports(sources[name], imports[name]) for name in order)


def relative_imports(name: str, tree: ast.Module, sources: dict[str, str]) -> list[ast.ImportFrom]:
    found = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    for node in found:
        where = f"{name}.py line {node.lineno}"
        if node.level != 1 or node.module not in sources or node.module == ENTRY:
            raise BundleError(f"{where}: only `from .<sibling module> import names` can be "
                              "bundled")
        if any(alias.asname or alias.name == "*" for alias in node.names):
            raise BundleError(f"{where}: a bundled import cannot rename or use *: the names "
                              "must stay as the sibling defines them")
    return found


def check_unique_names(trees: dict[str, ast.Module]) -> None:
    """Bundled, a second definition would silently replace the first for every module."""
    owner: dict[str, str] = {}
    for module, tree in trees.items():
        for node in tree.body:
            for name in defined_names(node):
                if owner.setdefault(name, module) != module:
                    raise BundleError(f"{name} is defined in both {owner[name]}.py and "
                                      f"{module}.py")


def defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else (
        [node.target] if isinstance(node, ast.AnnAssign | ast.AugAssign) else [])
    return [leaf.id for target in targets for leaf in ast.walk(target)
            if isinstance(leaf, ast.Name)]


def without_imports(source: str, nodes: list[ast.ImportFrom]) -> str:
    """`pass` keeps a block that held only imports (`if TYPE_CHECKING:`) valid."""
    lines = source.splitlines()
    for node in nodes:
        first, last = node.lineno - 1, (node.end_lineno or node.lineno) - 1
        lines[first] = " " * node.col_offset + "pass"
        for index in range(first + 1, last + 1):
            lines[index] = ""
    return "\n".join(lines) + "\n"
