"""The package's imports run one way, from the entry points down to Synapse.

docs/development.md "Layout" names the order; this reads every module's
imports (``ast``, nothing is imported) and fails on one that runs back up, or
on a folder this table does not place.
"""

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import matrix_leave_forget

PACKAGE = Path(matrix_leave_forget.__file__).parent
NAME = PACKAGE.name

# Top first. A unit may import its own layer's other units and any lower layer.
LAYERS: list[set[str]] = [
    {"__init__", "cli"},
    {"http"},
    {"membership", "media"},
    {"retention"},
    {"audit"},
    {"history", "db"},
    {"_synapse"},
    {"config", "metrics", "timestamps"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """The folder (or top-level file) of a dotted module name inside the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_in(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of each package import in a module's source, relative ones resolved."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
        elif isinstance(node, ast.Import):
            name = node.names[0].name
        else:
            continue
        if name.startswith(f"{NAME}."):
            found.append((node.lineno, name))
    return found


def back_up_imports(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Imports from a lower layer to a higher one; sources: name -> (source, is_package)."""
    found = []
    for module, (source, is_package) in sorted(sources.items()):
        for line, target in imports_in(source, module, is_package):
            if RANK[unit_of(target)] < RANK[unit_of(module)]:
                found.append(f"{module}:{line} imports {target}")
    return found


def package_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        sources[module] = (path.read_text(), is_package)
    return sources


class LayersTest(SynchronousTestCase):
    def test_every_unit_is_placed(self) -> None:
        """Each folder and top-level module of the package has a layer (a new one needs one)."""
        units = {unit_of(module) for module in package_sources()}
        units.discard("__main__")
        self.assertEqual(units - set(RANK), set())

    def test_no_import_runs_back_up(self) -> None:
        """No module imports one of a higher layer (TYPE_CHECKING imports included)."""
        self.assertEqual(back_up_imports(package_sources()), [])

    def test_a_back_up_import_is_found(self) -> None:
        """The check flags imports up, absolute and relative, and passes those down."""
        sources = {
            f"{NAME}.db.schema": (f"from {NAME}.retention.state import X\n", False),
            f"{NAME}.db": ("from .schema import Y\nfrom ..http import client\n", True),
            f"{NAME}.audit.log": (f"import {NAME}.db.schema\nfrom ..db import schema\n", False),
        }
        self.assertEqual(
            back_up_imports(sources),
            [
                f"{NAME}.db:2 imports {NAME}.http",
                f"{NAME}.db.schema:1 imports {NAME}.retention.state",
            ],
        )
