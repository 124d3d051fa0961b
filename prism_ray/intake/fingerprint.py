"""Code fingerprints that ignore everything cosmetic: the architecture family and the training loop's fingerprint.

Two sources canonicalise alike when they differ only in formatting, comments, docstrings, type annotations,
`pass`/`...` fillers, the names the source itself binds (variables, arguments, functions, classes, attributes
it assigns, import aliases, the bundle's own module names) or, unless `keep_numbers`, numeric literals. Numbers
are collapsed on purpose in the family: DIM = 128 → 256 or a different depth is a hyperparameter tweak of the same
architecture, not a new one. What stays: the statement and expression structure, every name taken from outside
(torch.nn.Linear, F.gelu, builtins), strings ("gelu" vs "relu") and True/False/None flags. File names are not
hashed, so renaming files keeps the fingerprint.

`code_fingerprints(bundle)` gives the three digests the store keeps for copy detection (docs/scoring.md, "Copies").
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from pathlib import PurePosixPath

from prism_ray.errors import BundleError
from prism_ray.intake.bundle import Bundle

_NUMBER = "<number>"  # not a legal identifier, so it cannot collide with a real name


@dataclass(frozen=True)
class CodeFingerprints:
    """What a bundle's code is, up to cosmetics: the architecture family and the training loop (numbers collapsed),
    and both scripts with their numbers kept (`canonical`: an exact copy up to names, layout and comments)."""

    architecture_family: str
    training: str
    canonical: str


def architecture_family(sources: dict[str, str]) -> str:
    """sha256 hex of the canonical AST dump of the given files (numbers collapsed), taken in path order."""
    return _digest([(path, sources[path]) for path in sorted(sources)], set(_module_names(sources)), keep_numbers=False)


def code_fingerprints(bundle: Bundle) -> CodeFingerprints:
    """The fingerprints of a checked bundle. Each role's sources are its entry file and the bundle modules it imports,
    in the order it reaches them (so file names never matter); the training loop's are those the architecture's
    do not already cover."""
    python = bundle.python_files
    modules = _module_names(python)
    architecture = _reachable(bundle.config.architecture_entry.file, python, modules)
    entry = bundle.config.training_entry.file
    training = [entry, *(path for path in _reachable(entry, python, modules) if path not in {entry, *architecture})]

    def digest(paths: list[str], keep_numbers: bool) -> str:
        return _digest([(path, python[path]) for path in paths], set(modules), keep_numbers)

    # Each role is renamed on its own (a copier may rename `ctx` in one script only); the tokenizer changes what the
    # same code learns from, so an exact copy must also declare the same one.
    exact = "\n".join([digest(architecture, keep_numbers=True), digest(training, keep_numbers=True),
                       f"tokenizer={bundle.config.tokenizer}"])
    return CodeFingerprints(architecture_family=digest(architecture, keep_numbers=False),
                            training=digest(training, keep_numbers=False),
                            canonical=hashlib.sha256(exact.encode()).hexdigest())


def _digest(sources: list[tuple[str, str]], local_modules: set[str], keep_numbers: bool) -> str:
    trees = [_parse(path, text) for path, text in sources]
    modules = {part for module in local_modules for part in module.split(".")}
    names, attributes = set(modules), set(modules)
    for tree in trees:
        bound = _bound_names(tree)
        names |= bound.names
        attributes |= bound.attributes
    canonical = _Canonicaliser(names, attributes, local_modules, keep_numbers)  # one renaming across files
    dumps = [ast.dump(canonical.visit(tree), include_attributes=False) for tree in trees]
    return hashlib.sha256("\n".join(dumps).encode()).hexdigest()


def _parse(path: str, text: str) -> ast.Module:
    try:
        return ast.parse(text, filename=path)
    except SyntaxError as error:
        raise BundleError("contract:syntax", f"syntax error: {error.msg}", file=path, line=error.lineno) from None


def _module_names(sources: dict[str, str]) -> dict[str, str]:
    """Dotted module name → path, for the bundle's own .py files (`pkg/__init__.py` is `pkg`)."""
    names = {}
    for path in sources:
        parts = PurePosixPath(path).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _reachable(entry: str, sources: dict[str, str], modules: dict[str, str]) -> list[str]:
    """The entry file, then every bundle module it imports (transitively), depth first in source order."""
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        order.append(path)
        for module in _imported_modules(path, _parse(path, sources[path])):
            if module in modules:
                visit(modules[module])

    visit(entry)
    return order


def _imported_modules(path: str, tree: ast.Module) -> list[str]:
    """Every module name an import in this file may load, in source order (parents and `from m import sub` too)."""
    package = list(PurePosixPath(path).with_suffix("").parts[:-1])
    names: list[str] = []
    imports = sorted((node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)),
                     key=lambda node: (node.lineno, node.col_offset))
    for node in imports:
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
        else:
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            bases = [module, *(f"{module}.{alias.name}" if module else alias.name for alias in node.names)]
        for base in bases:
            parts = base.split(".")
            names.extend(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return names


@dataclass
class _Bound:
    names: set[str]  # variables, arguments, functions, classes, import aliases
    attributes: set[str]  # attributes it assigns, and its functions and classes (methods are reached as attributes)


def _bound_names(tree: ast.Module) -> _Bound:
    """The names this source introduces itself; only these are renamed, so library references stay visible.
    Names and attributes are told apart, so `step = ...` never renames a library's `optimizer.step()`."""
    bound = _Bound(set(), set())
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.names.add(node.id)
        elif isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Load):
            bound.attributes.add(node.attr)
        elif isinstance(node, ast.arg):
            bound.names.add(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.names.add(node.name)
            bound.attributes.add(node.name)
        elif isinstance(node, ast.alias) and node.asname:
            bound.names.add(node.asname)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.names.add(node.name)
    return bound


class _Canonicaliser(ast.NodeTransformer):
    """Renames bound names to v0, v1, … in order of first appearance and drops what cannot change behaviour."""

    def __init__(self, names: set[str], attributes: set[str], local_modules: set[str], keep_numbers: bool) -> None:
        self.names = names
        self.attributes = attributes
        self.local_modules = local_modules
        self.keep_numbers = keep_numbers
        self.renamed: dict[str, str] = {}

    def _rename(self, name: str, bound: set[str] | None = None) -> str:
        if name not in (self.names if bound is None else bound):
            return name
        return self.renamed.setdefault(name, f"v{len(self.renamed)}")

    def _rename_module(self, dotted: str) -> str:
        """A bundle module's dotted name, component by component; a library's stays as written."""
        if dotted not in self.local_modules:
            return dotted
        return ".".join(self._rename(part) for part in dotted.split("."))

    def visit_Expr(self, node: ast.Expr) -> ast.AST | None:
        # Docstrings and other bare constants (`...`) are no-ops.
        return None if isinstance(node.value, ast.Constant) else self.generic_visit(node)

    def visit_Pass(self, node: ast.Pass) -> None:
        return None

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        is_number = isinstance(node.value, int | float | complex) and not isinstance(node.value, bool)
        return ast.Name(id=_NUMBER, ctx=ast.Load()) if is_number and not self.keep_numbers else node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        if node.value is None:
            return None
        return self.visit(ast.Assign(targets=[node.target], value=node.value))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        node.name = self._rename(node.name)
        node.returns = None
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        node.name = self._rename(node.name)
        return self.generic_visit(node)

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.arg = self._rename(node.arg)
        node.annotation = None
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        node.id = self._rename(node.id)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        node.attr = self._rename(node.attr, self.attributes)
        return self.generic_visit(node)

    def visit_keyword(self, node: ast.keyword) -> ast.AST:
        if node.arg is not None:
            node.arg = self._rename(node.arg)
        return self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> ast.AST:
        for alias in node.names:
            alias.name = self._rename_module(alias.name)
            if alias.asname:
                alias.asname = self._rename(alias.asname)
        return node

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        if node.module:
            node.module = self._rename_module(node.module) if not node.level else ".".join(
                self._rename(part) for part in node.module.split("."))
        return self.generic_visit(node)

    def visit_alias(self, node: ast.alias) -> ast.AST:
        # `from layers import Block` names a class of the bundle's own; dotted module paths are never bound.
        node.name = self._rename(node.name)
        if node.asname:
            node.asname = self._rename(node.asname)
        return node

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> ast.AST:
        if node.name:
            node.name = self._rename(node.name)
        return self.generic_visit(node)

    def visit_Global(self, node: ast.Global | ast.Nonlocal) -> ast.AST:
        node.names = [self._rename(name) for name in node.names]
        return node

    visit_Nonlocal = visit_Global
