"""Pass 1: every scope's bindings, so the resolver can tell what a name may hold at any point of a file."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath


@dataclass(frozen=True)
class Binding:
    kind: str  # import | value (the expression's object) | element (an item of it) | def (a def or class) | local
    # | deleted
    origin: str = ""
    expr: ast.expr | None = None
    line: int = 0
    unconditional: bool = False  # a direct statement of a module or class body


@dataclass(eq=False)
class Scope:
    kind: str  # module | function | class (lambdas and comprehensions are functions)
    parent: Scope | None = None
    comprehension: bool = False
    bindings: dict[str, list[Binding]] = field(default_factory=dict)
    declared_global: set[str] = field(default_factory=set)
    declared_nonlocal: set[str] = field(default_factory=set)


class Binder(ast.NodeVisitor):
    """Pass 1: each scope's bindings and the scope every node is evaluated in."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.module = Scope("module")
        self.scope = self.module
        self.scope_of: dict[ast.AST, Scope] = {}
        self.too_deep = False
        self._direct: set[ast.AST] = set()  # statements directly in a module or class body
        self._statement: ast.AST | None = None
        self._bound: set[ast.AST] = set()  # Name targets already bound with their value
        self.init_selves: dict[Scope, str] = {}  # an `__init__` of a bundle class → its first parameter
        # The object each match pattern is matched against, as an expression the resolver follows (`subject.attr`
        # for a keyword pattern, `subject[0]` for an item).
        self.subjects: dict[ast.pattern, ast.expr] = {}

    def run(self, tree: ast.Module) -> None:
        self._direct.update(tree.body)
        self.visit(tree)

    def visit(self, node: ast.AST) -> None:
        self.scope_of[node] = self.scope
        if isinstance(node, ast.stmt):
            outer, self._statement = self._statement, node
            super().visit(node)
            self._statement = outer
        else:
            super().visit(node)

    def bind(self, name: str, kind: str, origin: str = "", expr: ast.expr | None = None,
             scope: Scope | None = None) -> None:
        scope = scope or self.scope
        binding = Binding(kind, origin, expr, getattr(self._statement, "lineno", 0), self._statement in self._direct)
        homes = [scope]
        if name in scope.declared_global:
            homes = [self.module]
        elif name in scope.declared_nonlocal:  # every enclosing function: over-approximate, never miss
            homes = [s for s in ancestors(scope) if s.kind == "function"] or [scope]
        for home in homes:
            home.bindings.setdefault(name, []).append(binding)

    def _enter(self, kind: str, body: Iterable[ast.AST], params: Iterable[str] = ()) -> Scope:
        outer, self.scope = self.scope, Scope(kind, self.scope)
        entered = self.scope
        for param in params:
            self.bind(param, "local")
        for node in body:
            self.visit(node)
        self.scope = outer
        return entered

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for part in [*node.decorator_list, node.args, *([node.returns] if node.returns else [])]:
            self.visit(part)  # defaults and annotations belong to the enclosing scope
        self.bind(node.name, "def")
        params = _params(node.args)
        in_class = self.scope.kind == "class"
        scope = self._enter("function", [*getattr(node, "type_params", []), *node.body], params)
        if (in_class and isinstance(node, ast.FunctionDef) and node.name == "__init__" and not node.decorator_list
                and (node.args.posonlyargs or node.args.args)):
            self.init_selves[scope] = params[0]  # a new instance of the bundle's class (docs/rules.md)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.visit(node.args)
        self._enter("function", [node.body], _params(node.args))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for part in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(part)
        self.bind(node.name, "def")
        self._direct.update(node.body)
        self._enter("class", [*getattr(node, "type_params", []), *node.body])

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> None:
        self.visit(node.generators[0].iter)  # the first iterable is evaluated outside
        outer, self.scope = self.scope, Scope("function", self.scope, comprehension=True)
        for index, generator in enumerate(node.generators):
            if index:
                self.visit(generator.iter)
            self._bind_target(generator.target, generator.iter, element=True)
            self.visit(generator.target)
            for condition in generator.ifs:
                self.visit(condition)
        for part in ([node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]):
            self.visit(part)
        self.scope = outer

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def visit_Global(self, node: ast.Global) -> None:
        self.scope.declared_global.update(node.names)

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        self.scope.declared_nonlocal.update(node.names)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.bind(alias.asname, "import", alias.name)
            else:
                self.bind(alias.name.split(".")[0], "import", alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = absolute_module(node, self.package)
        for alias in node.names:
            if alias.name != "*" and base is not None:
                self.bind(alias.asname or alias.name, "import", f"{base}.{alias.name}" if base else alias.name)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self._bind_target(target, node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._bind_target(node.target, node.value)
        self.generic_visit(node)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        home = self.scope  # a walrus in a comprehension binds in the enclosing function
        while home.comprehension and home.parent is not None:
            home = home.parent
        self._bound.add(node.target)
        self.bind(node.target.id, "value", expr=node.value, scope=home)
        self.generic_visit(node)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self._bind_target(node.target, node.iter, element=True)
        self.generic_visit(node)

    visit_AsyncFor = visit_For

    def _bind_target(self, target: ast.expr, value: ast.expr, element: bool = False) -> None:
        if isinstance(target, ast.Name):
            self._bound.add(target)
            self.bind(target.id, "element" if element else "value", expr=value)
        elif isinstance(target, ast.Starred):  # `a, *rest = …`: rest holds items of the value
            self._bind_target(target.value, value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            if (not element and isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts)
                    and not any(isinstance(e, ast.Starred) for e in [*target.elts, *value.elts])):
                for item, part in zip(target.elts, value.elts, strict=True):  # `a, b = torch, F`
                    self._bind_target(item, part)
            else:
                for item in target.elts:
                    self._bind_target(item, value, element=True)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Del):
            self.bind(node.id, "deleted")
        elif isinstance(node.ctx, ast.Store) and node not in self._bound:
            self.bind(node.id, "local")

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.bind(node.name, "local")
        self.generic_visit(node)

    def visit_Match(self, node: ast.Match) -> None:
        self.visit(node.subject)
        for case in node.cases:
            self._pattern(case.pattern, node.subject)
            self.visit(case)

    def _pattern(self, pattern: ast.pattern, subject: ast.expr) -> None:
        """Captures hold the subject, or what a pattern reads from it: `case object(f=g)` binds g to `subject.f`."""
        self.subjects[pattern] = subject
        item = ast.Subscript(value=subject, slice=ast.Constant(0), ctx=ast.Load())
        if isinstance(pattern, ast.MatchAs):
            if pattern.name:
                self.bind(pattern.name, "value", expr=subject)
            if pattern.pattern:
                self._pattern(pattern.pattern, subject)
        elif isinstance(pattern, ast.MatchOr):
            for part in pattern.patterns:
                self._pattern(part, subject)
        elif isinstance(pattern, ast.MatchClass):
            for part in pattern.patterns:  # only `case int(n)` passes, which binds the subject itself
                self._pattern(part, subject)
            for attr, part in zip(pattern.kwd_attrs, pattern.kwd_patterns, strict=True):
                self._pattern(part, ast.Attribute(value=subject, attr=attr, ctx=ast.Load()))
        elif isinstance(pattern, (ast.MatchSequence, ast.MatchMapping)):
            for part in pattern.patterns:
                self._pattern(part, item)
            rest = pattern.rest if isinstance(pattern, ast.MatchMapping) else None
            if rest:
                self.bind(rest, "local")  # a new dict
        elif isinstance(pattern, ast.MatchStar) and pattern.name:
            self.bind(pattern.name, "local")  # a new list


def _params(args: ast.arguments) -> list[str]:
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    return [arg.arg for arg in every if arg is not None]


def ancestors(scope: Scope) -> Iterable[Scope]:
    while scope.parent is not None:
        scope = scope.parent
        yield scope


def absolute_module(node: ast.ImportFrom, package: str) -> str | None:
    """The absolute module a `from … import` names; None when a relative import climbs above the bundle."""
    if node.level == 0:
        return node.module or ""
    parts = package.split(".") if package else []
    if node.level - 1 > len(parts):
        return None
    base = parts[:len(parts) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])



def module_name(path: str) -> str | None:
    """The importable module a bundle path defines (`a/b.py` → a.b, `a/__init__.py` → a)."""
    pure = PurePosixPath(path)
    if pure.suffix != ".py":
        return None
    parts = [*pure.parent.parts, pure.stem]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts and all(part.isidentifier() for part in parts) else None

