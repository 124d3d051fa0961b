"""Architecture family: a fingerprint of the architecture source that ignores everything cosmetic.

Two sources are the same family when they differ only in formatting, comments, docstrings, type annotations,
`pass`/`...` fillers, the names the source itself binds (variables, arguments, functions, classes, attributes
it assigns, import aliases) or numeric literals. Numbers are collapsed on purpose: DIM = 128 → 256 or a
different depth is a hyperparameter tweak of the same architecture, not a new one. What stays: the statement
and expression structure, every name taken from outside (torch.nn.Linear, F.gelu, builtins), strings
("gelu" vs "relu") and True/False/None flags. File names are not hashed, so renaming a single file keeps the family.
"""

from __future__ import annotations

import ast
import hashlib

from prism_ray.errors import BundleError

_NUMBER = "<number>"  # not a legal identifier, so it cannot collide with a real name


def architecture_family(sources: dict[str, str]) -> str:
    """sha256 hex of the canonical AST dump of the given files, taken in path order."""
    trees = [_parse(path, sources[path]) for path in sorted(sources)]
    bound: set[str] = set()
    for tree in trees:
        bound |= _bound_names(tree)
    canonical = _Canonicaliser(bound)  # one renaming across files, so cross-file references stay consistent
    dumps = [ast.dump(canonical.visit(tree), include_attributes=False) for tree in trees]
    return hashlib.sha256("\n".join(dumps).encode()).hexdigest()


def _parse(path: str, text: str) -> ast.Module:
    try:
        return ast.parse(text, filename=path)
    except SyntaxError as error:
        raise BundleError("contract:syntax", f"syntax error: {error.msg}", file=path, line=error.lineno) from None


def _bound_names(tree: ast.Module) -> set[str]:
    """The names this source introduces itself; only these are renamed, so library references stay visible."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Load):
            bound.add(node.attr)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.alias) and node.asname:
            bound.add(node.asname)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound


class _Canonicaliser(ast.NodeTransformer):
    """Renames bound names to v0, v1, … in order of first appearance and drops what cannot change behaviour."""

    def __init__(self, bound: set[str]):
        self.bound = bound
        self.renamed: dict[str, str] = {}

    def _rename(self, name: str) -> str:
        if name not in self.bound:
            return name
        return self.renamed.setdefault(name, f"v{len(self.renamed)}")

    def visit_Expr(self, node: ast.Expr) -> ast.AST | None:
        # Docstrings and other bare constants (`...`) are no-ops.
        return None if isinstance(node.value, ast.Constant) else self.generic_visit(node)

    def visit_Pass(self, node: ast.Pass) -> None:
        return None

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        is_number = isinstance(node.value, int | float | complex) and not isinstance(node.value, bool)
        return ast.Name(id=_NUMBER, ctx=ast.Load()) if is_number else node

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
        node.attr = self._rename(node.attr)
        return self.generic_visit(node)

    def visit_keyword(self, node: ast.keyword) -> ast.AST:
        if node.arg is not None:
            node.arg = self._rename(node.arg)
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
