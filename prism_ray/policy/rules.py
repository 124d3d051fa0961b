"""Pass 2: every rule of docs/rules.md, over one file, each finding with a rule id and a file:line."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from prism_ray.errors import Reason
from prism_ray.policy.reach import metaclass_methods, shared_member_names
from prism_ray.policy.resolver import Resolver, const_str
from prism_ray.policy.scopes import absolute_module
from prism_ray.policy.shapes import Shapes
from prism_ray.policy.tables import (
    ATTR_BUILTINS,
    CONTEXT_DUNDERS,
    DUNDER,
    DUNDER_IN_TEXT,
    FORBIDDEN_BUILTINS,
    FORBIDDEN_METHODS,
    FOREIGN_PRIVATE_OK,
    FORMAT_METHODS,
    INTROSPECTION,
    MAX_NUMBERS,
    MAX_STRING_BYTES,
    MUTATORS,
    SAFE_DEFS,
    SAFE_DUNDER_NAMES,
    SAFE_DUNDERS,
    SELF_MATCHING,
    TORCH_FLAGS,
    UNSAFE_MODULE_NAMES,
    allowlisted,
    path_problem,
)


@dataclass
class Budget:
    """Embedded data, counted over the whole bundle: a table split over several files gains nothing. Distinct names
    count as text too, since a function's `__name__` or an Enum member's `.name` reads back as a string."""

    numbers: int = 0
    text_bytes: int = 0
    names: set[str] = field(default_factory=set)

    def number(self, count: int) -> bool:
        """Count numeric constants; True when this crosses the limit."""
        self.numbers += count
        return self.numbers - count <= MAX_NUMBERS < self.numbers

    def text(self, size: int) -> bool:
        self.text_bytes += size
        return self.text_bytes - size <= MAX_STRING_BYTES < self.text_bytes

    def name(self, name: str) -> bool:
        if name in self.names:
            return False
        self.names.add(name)
        return self.text(len(name.encode("utf-8", "surrogatepass")))


_NAME_FIELDS = ("id", "attr", "name", "arg", "asname", "rest")  # where the AST keeps identifiers

# Node types with no rule of their own: what they hold is checked where it is visited (names, attributes, calls,
# constants) and what they bind is followed by the scopes pass. Every other node type has a `visit_` method below;
# a node type in neither place (a newer Python's syntax) fails the file closed, and a test lists them all.
UNCHECKED_NODES = frozenset({
    # modules and statements
    "Module", "Expression", "Interactive", "FunctionType", "TypeIgnore", "ClassDef", "Return", "Delete", "Assign",
    "AugAssign", "AnnAssign", "For", "AsyncFor", "While", "If", "With", "AsyncWith", "Match", "Raise", "Try",
    "TryStar", "Assert", "Global", "Nonlocal", "Expr", "Pass", "Break", "Continue",
    # expressions
    "BoolOp", "NamedExpr", "BinOp", "UnaryOp", "Lambda", "IfExp", "Dict", "Set", "ListComp", "SetComp", "DictComp",
    "GeneratorExp", "Await", "Yield", "YieldFrom", "Compare", "FormattedValue", "JoinedStr", "Starred", "List",
    "Tuple", "Slice",
    # contexts, operators and parts
    "Load", "Store", "Del", "And", "Or", "Add", "Sub", "Mult", "MatMult", "Div", "Mod", "Pow", "LShift", "RShift",
    "BitOr", "BitXor", "BitAnd", "FloorDiv", "Invert", "Not", "UAdd", "USub", "Eq", "NotEq", "Lt", "LtE", "Gt", "GtE",
    "Is", "IsNot", "In", "NotIn", "comprehension", "ExceptHandler", "arguments", "arg", "keyword", "alias",
    "withitem", "match_case",
    # patterns that read no attribute: values and singletons are compared, the rest match items or alternatives
    "MatchValue", "MatchSingleton", "MatchSequence", "MatchMapping", "MatchStar", "MatchAs", "MatchOr",
})


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp, ast.DictComp,
           ast.GeneratorExp)
_MODULE_BASES = frozenset({"torch.nn.Module", "torch.nn.modules.module.Module"})


def _rebinds(function: ast.AST, name: str) -> bool:
    """Whether a function binds `name` anywhere but as its first parameter (assignment, loop, `as`, capture…)."""
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, (ast.Store, ast.Del)):
            return True
        if isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name == name:
            return True
        if isinstance(node, (ast.Global, ast.Nonlocal)) and name in node.names:
            return True
    return False


def _class_names(cls: ast.ClassDef) -> set[str]:
    """What a class defines: its body's functions and assigned names, and what its methods store on self or cls."""
    names: set[str] = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) \
                and node.value.id in ("self", "cls"):
            names.add(node.attr)
    return names


class Checker(ast.NodeVisitor):
    """Pass 2: every rule, over one file."""

    def __init__(self, path: str, tree: ast.Module, resolver: Resolver, budget: Budget) -> None:
        self.path = path
        self.classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        # per class and per (method, receiver): each is walked once however many `self._x` reads it holds
        self.plain: dict[str, set[str] | None] = {}
        self.rebound: dict[tuple[ast.AST, str], bool] = {}
        self.resolver = resolver
        self.budget = budget
        self.reasons: list[Reason] = []
        self.parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        self.shapes = Shapes(resolver, self.parent)
        self.imported = set(resolver.modules)  # module names, for modules this process cannot import (einops)
        for node in ast.walk(tree):
            named = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in named:
                parts = name.split(".")
                self.imported.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        self.docstrings = {node.body[0].value for node in ast.walk(tree)
                           if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                           and node.body and isinstance(node.body[0], ast.Expr)
                           and const_str(node.body[0].value) is not None}

    def report(self, rule: str, node: ast.AST, message: str) -> None:
        self.reasons.append(Reason(rule=rule, message=message, file=self.path, line=getattr(node, "lineno", 1)))

    def visit(self, node: ast.AST) -> None:
        if type(node).__name__ not in KNOWN_NODES:
            self.report("sandbox:syntax", node, f"`{type(node).__name__}` is Python syntax the policy does not check "
                                                "yet; write it another way")
            return
        names = [value for f in _NAME_FIELDS if isinstance(value := getattr(node, f, None), str)]
        names += node.names if isinstance(node, (ast.Global, ast.Nonlocal)) else []
        names += node.kwd_attrs if isinstance(node, ast.MatchClass) else []
        if any([self.budget.name(name) for name in names]):  # a list, not a generator: every name is counted
            self._too_much_text(node)
        super().visit(node)

    # ---- imports

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_module(node, alias.name, f"import {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = absolute_module(node, self.resolver.binder.package)
        statement = code(node)
        if base is None:
            self.report("sandbox:import", node, f"`{statement}` climbs above the bundle; import bundle files by name")
            return
        for alias in node.names:
            full = f"{base}.{alias.name}" if base else alias.name
            if alias.name == "*":
                self.report("sandbox:import", node, f"`{statement}` hides which names it binds; import them by name")
            elif node.level:  # relative imports reach bundle files only
                if base not in self.resolver.modules and full not in self.resolver.modules:
                    self.report("sandbox:import", node, f"`{statement}`: no bundle file provides `{full}`")
            elif base == "__future__":
                continue
            elif full in self.resolver.modules or self._check_module(node, base, statement):
                if self.resolver.bundle_prefix(full) is None:
                    self._check_name(node, alias.name, statement, {full})
                    self._check_api(node, {full}, statement)

    def _check_module(self, node: ast.AST, name: str, statement: str) -> bool:
        """Report a module outside the allowlist; True when importing it is fine."""
        if name in self.resolver.modules:
            return True
        if not allowlisted(name):
            self.report("sandbox:import", node, (
                f"`{statement}`: bundles may import torch, numpy, einops, the PRISM interface, their own files and "
                f"a few standard modules (math, typing, dataclasses, collections, functools, …), not `{name}`"))
            return False
        return not self._check_api(node, {name}, statement)

    # ---- names, attributes and calls

    def visit_Name(self, node: ast.Name) -> None:
        resolver = self.resolver
        if isinstance(node.ctx, ast.Load) and node.id in FORBIDDEN_BUILTINS and resolver.is_builtin(node):
            self.report("sandbox:forbidden_builtin", node,
                        f"`{node.id}` {FORBIDDEN_BUILTINS[node.id]}; bundles may not use it, even by reference")
        elif DUNDER.match(node.id) and node.id not in SAFE_DUNDER_NAMES:
            self.report("sandbox:dunder", node, f"the name `{node.id}` reaches interpreter internals")
        if isinstance(node.ctx, ast.Load):
            if node.id in ATTR_BUILTINS and resolver.is_builtin(node) and not self.shapes.is_callee(node):
                self.report("sandbox:dynamic_attr", node, f"`{node.id}` may only be called directly, with a "
                                                          "constant attribute name")
            self._check_value(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        in_own_dunder = self.shapes.is_super(node.value) and self.shapes.enclosing_def(node) == node.attr
        if node.attr in CONTEXT_DUNDERS and not in_own_dunder:
            self.report("sandbox:dunder", node, (
                f"`{code(node)}` enters or leaves a context by hand; use a `with` statement (a context entered and "
                "never left stays on for the whole process, the harness's code included)"))
        elif node.attr == "__init__" and not self.shapes.init_call(node):
            self.report("sandbox:dunder", node, (
                f"`{code(node)}`: call `__init__` only as `super().__init__(…)` or `Base.__init__(self, …)` inside "
                "your own `__init__` (anything else could hand it an object that is not yours)"))
        self._check_name(node, node.attr, code(node), self.resolver.origins(node))
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._check_patch(node, node.value, f"`{code(node)}`", node.attr)
        elif self.shapes.is_chain_top(node):
            self._check_api(node, self.resolver.origins(node), code(node))
        if isinstance(node.ctx, ast.Load):
            self._check_value(node)
            self._check_format(node, node.value, node.attr)
        self.generic_visit(node)

    def visit_MatchClass(self, node: ast.MatchClass) -> None:
        """`case C(a=x)` reads the attribute `a` of the subject like `subject.a` does, so it gets the same rules."""
        cls = node.cls
        if node.patterns and not (len(node.patterns) == 1 and isinstance(cls, ast.Name) and cls.id in SELF_MATCHING
                                  and self.resolver.is_builtin(cls)):
            self.report("sandbox:dynamic_attr", node, (
                f"`case {code(node)}` reads the attributes that `{code(cls)}.__match_args__` names, which the source "
                "does not show; write keyword patterns (`case Point(x=a, y=b)`)"))
        subject = self.resolver.binder.subjects.get(node)
        for attr in node.kwd_attrs:
            read = ast.Attribute(value=subject, attr=attr, ctx=ast.Load()) if subject is not None else None
            origins = self.resolver.origins(read) if read is not None else set()
            expression = f"case {code(node)}"
            self._check_name(node, attr, expression, origins)
            if attr in CONTEXT_DUNDERS or attr == "__init__":
                self.report("sandbox:dunder", node, f"`{expression}` reaches `{attr}`, which may only be called "
                                                    "directly")
            self._check_api(node, origins, expression)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._check_patch(node, node.value, f"`{code(node)}`", "[…]")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        resolver = self.resolver
        builtin = resolver.builtin_call(node)
        callee = resolver.names(node.func)
        if builtin in ATTR_BUILTINS:
            self._check_attr_call(node, builtin)
        elif (builtin == "type" or "builtins.type" in callee) and len(node.args) + len(node.keywords) > 1:
            self.report("sandbox:forbidden_builtin", node, f"`{code(node)}` builds a class from strings; "
                                                           "write a class statement")
        if "torch.save" in callee:
            self._check_save(node)
        if "torch.compile" in callee and any(k.arg == "options" or (k.arg == "backend" and const_str(k.value) is None)
                                             for k in node.keywords):
            self.report("sandbox:forbidden_api", node, (
                f"`{code(node)}`: torch.compile may take mode=… and a backend name, not options=… (they name "
                "programs to run) or a backend function (it receives editable generated code)"))
        if "functools.wraps" in callee and (len(node.args) > 1 or node.keywords):
            self.report("sandbox:forbidden_api", node, f"`{code(node)}`: functools.wraps may only copy the default "
                                                       "attributes")
        if callee & MUTATORS or (isinstance(node.func, ast.Call) and resolver.names(node.func.func) & MUTATORS):
            for arg in node.args:  # also `dataclasses.dataclass(eq=False)(torch.Tensor)`
                self._check_patch(node, arg, f"`{code(node)}`")
        self.generic_visit(node)

    def _check_attr_call(self, node: ast.Call, builtin: str) -> None:
        name = const_str(node.args[1]) if len(node.args) >= 2 else None
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args) or name is None:
            self.report("sandbox:dynamic_attr", node, f"`{code(node)}`: {builtin} needs a constant attribute name")
            return
        if not name.isidentifier() or DUNDER.match(name):
            self.report("sandbox:dynamic_attr", node, f"`{code(node)}`: {builtin} may not name {name!r}")
            return
        self._check_name(node, name, code(node), self.resolver.origins(node) if builtin == "getattr" else set())
        if builtin in ("setattr", "delattr"):
            self._check_patch(node, node.args[0], f"`{code(node)}`", name)
        elif self.shapes.is_chain_top(node):
            self._check_api(node, self.resolver.origins(node), code(node))
            if builtin == "getattr":
                self._check_value(node)
                self._check_format(node, node.args[0], name)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if DUNDER.match(node.name) and node.name not in SAFE_DEFS:
            self.report("sandbox:dunder", node, f"`def {node.name}` defines a hook that torch, numpy or the harness "
                                                "would call; bundles may not define it")
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Constant(self, node: ast.Constant) -> None:
        value, budget = node.value, self.budget
        if node in self.docstrings:
            return
        if isinstance(value, str):  # dunder names fed to string-driven APIs (format fields, class namespaces)
            unsafe = [name for name in DUNDER_IN_TEXT.findall(value) if name not in SAFE_DUNDERS | {"__main__"}]
            if unsafe:
                self.report("sandbox:dunder", node, f"the string constant names `{unsafe[0]}`, an interpreter "
                                                    "internal")
        if isinstance(value, (str, bytes)):
            if budget.text(len(value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value)):
                self._too_much_text(node)
        elif isinstance(value, (int, float, complex)) and not isinstance(value, bool):
            if budget.number(max(1, (abs(value).bit_length() + 63) // 64) if isinstance(value, int) else 1):
                self.report("sandbox:embedded_data", node, (
                    f"the bundle's files hold more than {MAX_NUMBERS:,} numeric constants together (this one crosses "
                    "the limit); bundles may not embed weights or data (models learn from the stream)"))

    def _too_much_text(self, node: ast.AST) -> None:
        self.report("sandbox:embedded_data", node, (
            f"the bundle's files hold more than {MAX_STRING_BYTES // 1024} KiB of string constants and distinct names "
            "together (this line crosses the limit); bundles may not embed data (models learn from the stream)"))

    # ---- the rules behind the visits

    def _check_name(self, node: ast.AST, name: str, expression: str, origins: set[str]) -> None:
        """Rules on an attribute name, whatever object it is read from (`origins`: what the attribute may be)."""
        if DUNDER.match(name) and name not in SAFE_DUNDERS:
            self.report("sandbox:dunder", node, f"`{expression}` reaches `{name}`, an interpreter internal")
        elif name in INTROSPECTION:
            self.report("sandbox:introspection", node, f"`{expression}` reaches `{name}`: frames and code objects "
                                                       "expose the harness's internals")
        elif name in FORBIDDEN_METHODS:
            self.report("sandbox:forbidden_api", node, f"`{expression}` {FORBIDDEN_METHODS[name]}")
        elif self._resolved(origins):
            return  # what the attribute really holds is judged by _check_api
        elif name in UNSAFE_MODULE_NAMES:
            self.report("sandbox:import", node, f"`{expression}` reaches the module `{name}`, which bundles may "
                                                "not use")
        elif name.startswith("_") and name in metaclass_methods():
            self.report("sandbox:private_api", node, (
                f"`{expression}` reaches `{name}`, a private method classes get from their metaclass (Enum, ABC, …); "
                "private names have no stable or safe contract"))
        elif name.startswith("_") and not DUNDER.match(name) and not self._own_private(node, name, origins):
            self.report("sandbox:private_api", node, (
                f"`{expression}` reads the private name `{name}` of an object the policy cannot follow (a call's "
                "result, a parameter): it may be a library internal, and private names have no stable or safe "
                "contract (some read files). Read private names only as `self._name`/`cls._name` in a method of your "
                "nn.Module-based class that defines `_name` (docs/rules.md, sandbox:private_api); elsewhere use a "
                "public name"))

    def _own_private(self, node: ast.AST, name: str, origins: set[str]) -> bool:
        """A private name read where the object is the bundle's own: a bundle module or class the policy resolved,
        or `self._name`/`cls._name` in a method of a bundle class that defines `_name` and derives from nothing but
        nn.Module and such classes of this file. Red teams defined dummies named like library internals and read
        them on `self` bound to a library object (`self = typing.get_args(…)[0]`, a lambda's `self`, a subclass of
        warnings.catch_warnings): none of these is a method's own receiver of a plain class."""
        if name in FOREIGN_PRIVATE_OK or (origins and not self.resolver.foreign(origins)):
            return True
        receiver = node.value if isinstance(node, ast.Attribute) else None
        if not (isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")):
            return False
        scope = self.parent.get(node)
        while scope is not None and not isinstance(scope, _SCOPES):
            scope = self.parent.get(scope)
        owner = self.parent.get(scope) if scope is not None else None
        if not (isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)) and isinstance(owner, ast.ClassDef)
                and scope.args.args and scope.args.args[0].arg == receiver.id
                and not any(code(d) == "staticmethod" for d in scope.decorator_list)):  # its first argument is any
            return False
        if (scope, receiver.id) not in self.rebound:
            self.rebound[scope, receiver.id] = _rebinds(scope, receiver.id)
        if self.rebound[scope, receiver.id]:
            return False
        if owner.name not in self.plain:
            self.plain[owner.name] = self._plain_names(owner, set())
        defined = self.plain[owner.name]
        return defined is not None and name in defined

    def _plain_names(self, cls: ast.ClassDef, seen: set[str]) -> set[str] | None:
        """What a plain class and its bases define, or None for a class whose instances may hold library state
        other than nn.Module's: a plain class's bases are nn.Module or plain classes of this file, with no
        metaclass or other keyword."""
        if cls.keywords or cls.name in seen:  # `seen`: the classes on the way here (a cycle never ends)
            return None
        names = _class_names(cls)
        for base in cls.bases:
            if self.resolver.origins(base) & _MODULE_BASES:
                continue
            local = self.classes.get(base.id) if isinstance(base, ast.Name) else None
            inherited = self._plain_names(local, seen | {cls.name}) if local is not None else None
            if inherited is None:
                return None
            names |= inherited
        return names

    def _resolved(self, origins: set[str]) -> bool:
        """Whether the policy knows what one of these origins outside the bundle really is."""
        reached = [self.resolver.reached(o) for o in self.resolver.foreign(origins) if not o.startswith("<")]
        return any(r.known or r.problem for r in reached)

    def _check_api(self, node: ast.AST, origins: set[str], expression: str) -> bool:
        found = False
        for origin in self.resolver.foreign(origins):
            reached = self.resolver.reached(origin)
            problem = path_problem(origin) or reached.problem
            if problem:
                rule, why = problem
                shown = origin if reached.name == origin else f"{reached.name} (as {origin})"
                self.report(rule, node, f"`{expression}` uses {shown}, which {why}")
                found = True
        return found

    def _check_patch(self, node: ast.AST, base: ast.AST, expression: str, attr: str = "") -> None:
        """Monkeypatching: changing an imported module or class, or an object reached from one."""
        origins = self.resolver.origins(base)
        foreign = self.resolver.foreign(origins)
        if not foreign and attr in shared_member_names() and not self.shapes.own(base, origins):
            self.report("sandbox:monkeypatch", node, (
                f"{expression}: the policy cannot tell what `{code(base)}` is, and `{attr}` is a method of "
                "torch.Tensor, nn.Module or another class the harness computes with; set such names only on your "
                "own objects (on `self` in your class's `__init__`, on your own classes and functions), or pick "
                "another name"))
            return
        if not foreign or (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                           and {f"{self.resolver.reached(o).name}.{attr}" for o in foreign} <= TORCH_FLAGS):
            return
        if foreign[0] == "<type>":
            target = "a class reached through type(…)"
        else:
            target = foreign[0] + (f".{attr}" if attr and not attr.startswith("[") else attr)
        self.report("sandbox:monkeypatch", node, (
            f"{expression} changes {target}, which comes from an import; bundles may not modify imported modules or "
            "classes (write your own function or subclass instead)"))

    def _check_value(self, node: ast.AST) -> None:
        """Modules may be used only through their attributes, or renamed with `alias = module`."""
        if not self.shapes.is_chain_top(node):
            return
        origins = self.resolver.origins(node)
        names = {self.resolver.reached(o).name for o in origins}
        if "torch.save" in names and not self.shapes.is_callee(node) and not self.shapes.alias_context(node):
            self.report("sandbox:torch_save_path", node, "call torch.save directly, so its path can be checked")
        modules = sorted(o for o in origins if o in self.imported or self.resolver.reached(o).module)
        if modules and not self.shapes.alias_context(node):
            self.report("sandbox:module_value", node, (
                f"`{code(node)}` passes the module {modules[0]} around as a value; use its attributes directly "
                "(the sandbox must see every use of a module)"))

    def _check_format(self, node: ast.AST, receiver: ast.AST, attr: str) -> None:
        """`.format` reads every attribute its fields name (`{0.__doc__}`), so its format string must be written
        out: a constant, a name bound only to constants, or the first argument of `str.format`."""
        if attr not in FORMAT_METHODS or self._constant_text(receiver):
            return
        parent = self.parent.get(node)
        if (isinstance(receiver, ast.Name) and receiver.id == "str" and self.resolver.is_builtin(receiver)
                and isinstance(parent, ast.Call) and parent.func is node and parent.args
                and self._constant_text(parent.args[0])):
            return
        self.report("sandbox:dynamic_attr", node, (
            f"`{code(node)}`: a format string built at run time can read any attribute (`{{0.attr}}`); format with "
            "an f-string or a constant format string"))

    def _constant_text(self, node: ast.AST) -> bool:
        if const_str(node) is not None:
            return True
        found = self.resolver.lookup(node) if isinstance(node, ast.Name) else None
        return found is not None and all(b.kind == "value" and b.expr is not None and const_str(b.expr) is not None
                                         for b in found[1])

    def _check_save(self, node: ast.Call) -> None:
        path = node.args[1] if len(node.args) >= 2 else next((k.value for k in node.keywords if k.arg == "f"), None)
        pieces = self.shapes.path_pieces(path, 0) if path is not None else []
        head = pieces[0] if pieces else None
        text = "".join(p if isinstance(p, str) else "\0" for p in pieces)
        under_artifacts = (isinstance(head, ast.Attribute) and head.attr == "artifacts_dir"
                           and not self.resolver.foreign(self.resolver.origins(head.value)))
        if not under_artifacts or ".." in text:
            self.report("sandbox:torch_save_path", node, (
                f"`{code(node)}`: torch.save may only write under ctx.artifacts_dir, e.g. "
                "torch.save(model.state_dict(), f\"{ctx.artifacts_dir}/model.pt\")"))


KNOWN_NODES = UNCHECKED_NODES | {name.removeprefix("visit_") for name in vars(Checker) if name.startswith("visit_")}


def code(node: ast.AST) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= 70 else text[:69] + "…"
