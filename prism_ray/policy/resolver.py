"""What an expression may evaluate to, as dotted origins (`F.cross_entropy` → torch.nn.functional.cross_entropy).

Follows aliases, getattr with constant names, literal containers and names other bundle files import. An origin
outside the bundle is then handed to reach.py, which says what it really is.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable

from prism_ray.policy.reach import Reached, reach
from prism_ray.policy.scopes import Binder, Binding, Scope, ancestors
from prism_ray.policy.tables import MAX_RESOLUTION_STEPS


class TooComplex(Exception):
    """The file is too deeply nested, or too tangled, to analyse."""


class Resolver:
    """What an expression may evaluate to, as dotted origins (`<type>` marks `type(x)`)."""

    def __init__(self, binder: Binder, modules: set[str], exports: dict[str, dict[str, set[str]]]) -> None:
        self.binder = binder
        self.modules = modules
        self.exports = exports
        # Name results are cached (alias chains would otherwise cost exponential time), except those computed
        # while a cycle (`a = b; b = a`) was cut short, which may be incomplete.
        self._cache: dict[tuple[str, int, str], set[str]] = {}
        self._busy: set[tuple[str, int, str]] = set()
        self._cut = False
        self._steps = 0

    def scope(self, node: ast.AST) -> Scope:
        return self.binder.scope_of.get(node, self.binder.module)

    def lookup(self, node: ast.Name) -> tuple[Scope, list[Binding]] | None:
        scope = self.scope(node)
        if node.id in scope.declared_global:
            scope = self.binder.module
        for index, candidate in enumerate([scope, *ancestors(scope)]):
            if (index == 0 or candidate.kind != "class") and node.id in candidate.bindings:
                return candidate, candidate.bindings[node.id]
        return None

    def is_builtin(self, node: ast.Name) -> bool:
        """Whether the name may still mean the builtin when this line runs (module names resolve at run time)."""
        found = self.lookup(node)
        if found is None:
            return True
        scope, bindings = found
        if scope.kind == "function":
            return False
        deferred = self.scope(node).kind == "function"
        return any(b.kind == "deleted" for b in bindings) or not any(
            b.unconditional and (deferred or b.line < node.lineno) for b in bindings)

    def builtin_call(self, node: ast.AST) -> str | None:
        """The builtin's name when `node` is a call to a builtin function."""
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and self.is_builtin(node.func):
            return node.func.id
        return None

    def origins(self, node: ast.AST) -> set[str]:
        found: set[str] = set()
        if isinstance(node, ast.Name):
            found = self._through_bindings("origins", self.lookup(node), node.id)
        elif isinstance(node, ast.Attribute):
            found = {extend(origin, node.attr) for origin in self.origins(node.value)}
        elif isinstance(node, ast.Subscript):
            found = self.elements(node.value)
        elif isinstance(node, ast.NamedExpr):
            found = self.origins(node.value)
        elif isinstance(node, ast.IfExp):
            found = self.origins(node.body) | self.origins(node.orelse)
        elif isinstance(node, ast.BoolOp):
            found = set().union(*(self.origins(value) for value in node.values))
        elif isinstance(node, ast.Call):
            builtin = self.builtin_call(node)
            name = const_str(node.args[1]) if len(node.args) >= 2 else None
            if builtin == "getattr" and name is not None:
                found = {extend(origin, name) for origin in self.origins(node.args[0])}
            elif builtin == "type" and len(node.args) == 1:
                found = {"<type>"}
        return {canonical for origin in found for canonical in self.canonical(origin)}

    def elements(self, node: ast.AST) -> set[str]:
        """What the items of a literal container (or a name bound to one) may be."""
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(self.elements(e.value) if isinstance(e, ast.Starred) else self.origins(e)
                                 for e in node.elts))
        if isinstance(node, ast.Dict):
            return set().union(*(self.origins(value) for value in node.values))
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp)):
            return self.origins(node.elt)
        if isinstance(node, (ast.IfExp, ast.BoolOp)):
            parts = [node.body, node.orelse] if isinstance(node, ast.IfExp) else node.values
            return set().union(*(self.elements(part) for part in parts))
        if isinstance(node, ast.Name):
            return self._through_bindings("elements", self.lookup(node), node.id)
        return set()

    def module_origins(self, name: str) -> set[str]:
        """What a module-level name may hold (for other files importing it)."""
        return self._through_bindings("origins", (self.binder.module, self.binder.module.bindings[name]), name)

    def _through_bindings(self, want: str, found: tuple[Scope, list[Binding]] | None, name: str) -> set[str]:
        if found is None:
            return set()
        self._steps += 1
        if self._steps > MAX_RESOLUTION_STEPS:
            raise TooComplex
        key = (want, id(found[0]), name)
        if key in self._cache:
            return self._cache[key]
        if key in self._busy:
            self._cut = True
            return set()
        self._busy.add(key)
        outer_cut, self._cut = self._cut, False
        result: set[str] = set()
        for binding in found[1]:
            if binding.kind == "import" and want == "origins":
                result |= self.canonical(binding.origin)
            elif binding.kind == "value" and binding.expr is not None:
                result |= self.origins(binding.expr) if want == "origins" else self.elements(binding.expr)
            elif binding.kind == "element" and binding.expr is not None and want == "origins":
                result |= self.elements(binding.expr)
        self._busy.discard(key)
        if not self._cut:
            self._cache[key] = result
        self._cut = self._cut or outer_cut
        return result

    def bundle_prefix(self, origin: str) -> str | None:
        parts = origin.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in self.modules),
                    None)

    def canonical(self, origin: str, depth: int = 0) -> set[str]:
        """Follow names another bundle module imported (`architecture.torch.load` → torch.load)."""
        prefix = self.bundle_prefix(origin) if not origin.startswith("<") else None
        if prefix is None or prefix == origin or depth > 8:
            return {origin}
        symbol, _, rest = origin[len(prefix) + 1:].partition(".")
        targets = self.exports.get(prefix, {}).get(symbol)
        if not targets:
            return {origin}
        return set().union(*(self.canonical(extend(target, rest) if rest else target, depth + 1)
                             for target in targets))

    def reached(self, origin: str) -> Reached:
        """What an origin really is; the bundle's own objects and `type(x)` stay unknown."""
        return Reached(origin) if origin.startswith("<") or self.bundle_prefix(origin) is not None else reach(origin)

    def names(self, node: ast.AST) -> set[str]:
        """The canonical names of what `node` may be (`torch.nn.modules.module.torch.save` → torch.save)."""
        return {self.reached(origin).name for origin in self.origins(node)}

    def foreign(self, origins: Iterable[str]) -> list[str]:
        """Origins outside the bundle: imported modules, their contents, and `type(x)` (any class)."""
        return sorted(o for o in origins if o.startswith("<") or self.bundle_prefix(o) is None)


def extend(origin: str, attr: str) -> str:
    return origin if origin.startswith("<") else f"{origin}.{attr}"


def const_str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

