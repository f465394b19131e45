"""The package's layout: imports point one way (core <- run <- attacks <- apps <- cli)."""

import ast
from graphlib import CycleError, TopologicalSorter

from tests.helpers import ROOT

PACKAGE = ROOT / "kwta_lightning"
# what each part may import besides itself and kwta_lightning.errors
ALLOWED = {
    "core": set(),
    "run": {"core"},
    "attacks": {"core", "run"},
    "apps": {"core", "run", "attacks"},
    "cli": {"core", "run", "attacks", "apps"},
}


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, top_level_only: bool) -> set[str]:
    """The kwta_lightning modules a file imports (at its top level, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("kwta_lightning") and module_exists(n)}
    return found


def module_exists(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def part(module: str) -> str | None:
    """core, run, attacks, apps or cli of ``kwta_lightning.<part>...``; None for the top."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else None


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_the_layout_has_its_parts():
    assert {part(m) for m in MODULES} == {None, "errors", *ALLOWED}


def test_imports_point_one_way():
    wrong = []
    for module, path in MODULES.items():
        here = part(module)
        if here not in ALLOWED:
            continue
        for target in imports(path, top_level_only=False):
            there = part(target)
            if there not in (None, "errors", here, *ALLOWED[here]):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_cycles():
    graph = {m: imports(p, top_level_only=True) - {m} for m, p in MODULES.items()}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None
