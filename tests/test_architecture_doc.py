"""docs/architecture.md's tables match the tree: every module or package a table names exists (with the symbols named
beside it), and every module of prism_ray/ is in a module table. Read generically, so the doc may regroup its
tables: paths are read from the columns whose header says "module" or "code", relative to prism_ray/ or to the
package named at the start of the line that introduces the table (as "`harness/` — the run of one bundle:"); a
module table is one whose first header cell says "module", and its first column lists the modules."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO

DOC = REPO / "docs" / "architecture.md"
PACKAGE = REPO / "prism_ray"
PATH = re.compile(r"`([\w/]+(?:\.py|/))`")  # `run.py`, `harness/stream.py`, `store/`
SYMBOLS = re.compile(r"`([\w/]+\.py)` \(([^)]*)\)")  # `harness/records.py` (`Books`, `charged`)
INTRODUCED = re.compile(r"^`([\w/]+/)`")
RULE = re.compile(r"\|[ \-|:]+\|")  # the line under a table's header


@dataclass
class Table:
    base: Path
    header: list[str]
    rows: list[list[str]]

    @property
    def lists_modules(self) -> bool:
        return "module" in self.header[0]

    def code_cells(self, modules_only: bool = False) -> list[str]:
        """The cells of the columns that name code (`modules_only`: the first column of a module table)."""
        columns = [0] if modules_only else [index for index, title in enumerate(self.header)
                                            if "module" in title or "code" in title]
        return [row[index] for row in self.rows for index in columns if index < len(row)]

    def paths(self, modules_only: bool = False) -> set[Path]:
        return {self.base / found.rstrip("/") for cell in self.code_cells(modules_only) for found in PATH.findall(cell)}


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def tables(text: str) -> list[Table]:
    found: list[Table] = []
    lines = text.splitlines()
    for index, line in enumerate(lines[:-1]):
        if not (line.startswith("|") and RULE.fullmatch(lines[index + 1].strip())):
            continue
        intro = next((earlier for earlier in reversed(lines[:index]) if earlier.strip()), "")
        package = INTRODUCED.match(intro)
        rows = []
        for row in lines[index + 2:]:
            if not row.startswith("|"):
                break
            rows.append(cells(row))
        found.append(Table(PACKAGE / package.group(1).rstrip("/") if package else PACKAGE, cells(line), rows))
    return found


def modules_in(directory: Path) -> set[Path]:
    """The modules (without .py) and sub-packages directly in a package, its __init__.py aside."""
    return ({path.with_suffix("") for path in directory.glob("*.py") if path.name != "__init__.py"}
            | {path for path in directory.iterdir() if (path / "__init__.py").is_file()})


def defined_names(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    return names | {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
                    if isinstance(target, ast.Name)}


def test_the_doc_has_module_tables():
    found = tables(DOC.read_text())
    assert any(table.lists_modules and table.base == PACKAGE for table in found)
    assert any(table.lists_modules and table.base == PACKAGE / "harness" for table in found)


def test_every_path_the_tables_name_exists():
    missing = sorted(str(path.relative_to(REPO)) for table in tables(DOC.read_text()) for path in table.paths()
                     if not path.exists())
    assert missing == [], f"docs/architecture.md names modules that are not in the tree: {missing}"


def test_every_symbol_named_beside_a_module_is_defined_there():
    wrong = []
    for table in tables(DOC.read_text()):
        for cell in table.code_cells():
            for module, names in SYMBOLS.findall(cell):
                path = table.base / module
                wrong += [f"{name} in {path.relative_to(REPO)}" for name in re.findall(r"`(\w+)`", names)
                          if path.is_file() and name not in defined_names(path)]
    assert wrong == [], f"docs/architecture.md names what its modules do not define: {wrong}"


def test_every_module_is_in_a_module_table():
    found = tables(DOC.read_text())
    listed = {path.with_suffix("") for table in found if table.lists_modules for path in table.paths(modules_only=True)}
    described = {PACKAGE} | {table.base for table in found if table.lists_modules}  # packages with a table of their own
    # a sub-package is listed by name (`store/`) or module by module (`gate/hard_gate.py`, `gate/prompt.py`)
    listed |= {package for package in modules_in(PACKAGE) if package.is_dir() and modules_in(package) <= listed}
    unlisted = sorted(str(path.relative_to(REPO)) for package in described for path in modules_in(package)
                      if path not in listed)
    assert unlisted == [], f"docs/architecture.md's module tables leave out: {unlisted}"
