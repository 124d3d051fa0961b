"""What an AST node is and where it sits, for the rules (docs/rules.md): the bundle's own objects, `super()` and
`__init__` calls, callees, attribute-chain tops, tracked aliases, and a path expression's constant pieces."""

from __future__ import annotations

import ast

from prism_ray.policy.resolver import Resolver
from prism_ray.policy.tables import ATTR_BUILTINS


class Shapes:
    def __init__(self, resolver: Resolver, parent: dict[ast.AST, ast.AST]) -> None:
        self.resolver = resolver
        self.parent = parent

    def path_pieces(self, node: ast.expr, depth: int) -> list[ast.expr | str]:
        """A path expression as constant text and opaque parts, in order (locals followed once bound once)."""
        if depth > 8:
            return [node]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return [*self.path_pieces(node.left, depth + 1), *self.path_pieces(node.right, depth + 1)]
        if isinstance(node, ast.JoinedStr):
            pieces: list[ast.expr | str] = []
            for value in node.values:
                if isinstance(value, ast.Constant):
                    pieces.append(str(value.value))
                elif isinstance(value, ast.FormattedValue) and value.conversion == -1 and value.format_spec is None:
                    pieces += self.path_pieces(value.value, depth + 1)
                else:
                    pieces.append(value)
            return pieces
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Call) and self.resolver.builtin_call(node) == "str" and len(node.args) == 1:
            return self.path_pieces(node.args[0], depth + 1)
        if isinstance(node, ast.Name) and (found := self.resolver.lookup(node)):
            bindings = found[1]
            if len(bindings) == 1 and bindings[0].kind == "value" and bindings[0].expr is not None:
                return self.path_pieces(bindings[0].expr, depth + 1)
        return [node]

    # ---- what an object is

    def own(self, base: ast.AST, origins: set[str]) -> bool:
        """Whether `base` is surely the bundle's own object: a bundle module, a def or class of this file, or the
        new instance `self` inside a bundle class's `__init__` (which may be called only on it, see visit_Attribute)."""
        if origins and origins <= self.resolver.modules:
            return True
        if not isinstance(base, ast.Name) or (found := self.resolver.lookup(base)) is None:
            return False
        return all(binding.kind == "def" for binding in found[1]) or self.new_instance(base)

    def new_instance(self, name: ast.Name) -> bool:
        """Whether `name` is the `self` of a bundle class's `__init__`, never rebound."""
        found = self.resolver.lookup(name)
        return found is not None and self.resolver.binder.init_selves.get(found[0]) == name.id and len(found[1]) == 1

    def is_super(self, node: ast.AST) -> bool:
        """`super()`, or `super(C, self)` in `__init__`: Python checks that the object it binds to is an instance
        of the bundle class it names (`super(C, C)` would bind nothing)."""
        if not (isinstance(node, ast.Call) and self.resolver.builtin_call(node) == "super" and not node.keywords):
            return False
        return not node.args or (len(node.args) == 2 and isinstance(node.args[1], ast.Name)
                                 and self.new_instance(node.args[1]))

    def init_call(self, node: ast.Attribute) -> bool:
        """`super().__init__(…)`, or `X.__init__(self, …)` with the `self` of the enclosing `__init__`."""
        parent = self.parent.get(node)
        if not (isinstance(parent, ast.Call) and parent.func is node):
            return False
        first = parent.args[0] if parent.args else None
        return (isinstance(first, ast.Name) and self.own(first, set())) or self.is_super(node.value)

    def enclosing_def(self, node: ast.AST) -> str | None:
        while (node := self.parent.get(node)) is not None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name
        return None

    # ---- where a node sits

    def is_callee(self, node: ast.AST) -> bool:
        parent = self.parent.get(node)
        return isinstance(parent, ast.Call) and parent.func is node

    def is_chain_top(self, node: ast.AST) -> bool:
        """Whether this node ends an attribute chain (`torch.hub.load` is checked once, at `.load`)."""
        parent = self.parent.get(node)
        if isinstance(parent, ast.Attribute):
            return False
        return not (isinstance(parent, ast.Call) and parent.args and parent.args[0] is node
                    and self.resolver.builtin_call(parent) in ATTR_BUILTINS)

    def alias_context(self, node: ast.AST) -> bool:
        """`alias = value` into a plain name outside a class body: the alias is tracked like the original."""
        child, parent = node, self.parent.get(node)
        while isinstance(parent, (ast.IfExp, ast.BoolOp, ast.NamedExpr)) and child is not getattr(parent, "test", None):
            child, parent = parent, self.parent.get(parent)
        if self.resolver.scope(node).kind == "class":
            return False
        if isinstance(parent, ast.Assign) and parent.value is child:
            return all(isinstance(target, ast.Name) for target in parent.targets)
        return isinstance(parent, ast.AnnAssign) and parent.value is child and isinstance(parent.target, ast.Name)
