"""Static sandbox policy (DESIGN §6): AST rules over every .py file of a bundle.

This is defence in depth, not the boundary (bubblewrap and the harness's pre-bound loss are). It rejects,
with a file:line a miner can act on, code that imports outside a short allowlist, walks interpreter
internals, turns strings into code, touches files, or modifies imported modules and classes. Every rule
id is documented for miners in docs/rules.md.

How it works: pass 1 (`_Binder`) records every scope's bindings, so pass 2 (`_Checker`) can resolve any
name or attribute chain to the dotted origins it may hold (`F.cross_entropy` → torch.nn.functional.
cross_entropy), following aliases, getattr with constant names and literal containers.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from prism_ray.bundle import Bundle
from prism_ray.errors import Reason

MAX_NUMBERS = 4096  # numeric constants per file (a big int counts once per 64 bits)
MAX_STRING_BYTES = 64 * 1024  # str/bytes constants per file, docstrings excepted

_STDLIB = frozenset({"__future__", "abc", "collections", "collections.abc", "copy", "dataclasses", "enum",
                     "functools", "itertools", "math", "numbers", "random", "re", "string", "time", "typing",
                     "warnings"})
_OPEN_PACKAGES = frozenset({"torch", "numpy", "einops"})  # any submodule, minus _FORBIDDEN_API and private ones
_INTERFACE = frozenset({"prism_challenge", "prism_challenge.evaluator", "prism_challenge.evaluator.interface"})
# Modules that can be used as values only as `alias = module` (so every use stays trackable).
_KNOWN_MODULES = _STDLIB | _OPEN_PACKAGES | _INTERFACE | frozenset(
    f"torch.{name}" for name in (
        "nn", "nn.functional", "nn.init", "nn.utils", "nn.modules", "nn.parallel", "nn.attention", "optim",
        "optim.lr_scheduler", "utils", "utils.data", "utils.checkpoint", "cuda", "cuda.amp", "amp", "backends",
        "backends.cuda", "backends.cudnn", "autograd", "distributed", "linalg", "fft", "special", "distributions",
        "func", "compiler", "random", "types", "testing", "nested", "sparse", "masked", "profiler", "cpu", "mps",
    )) | frozenset({"numpy.random", "numpy.linalg", "numpy.fft", "numpy.lib", "numpy.ma", "numpy.typing",
                    "einops.layers", "einops.layers.torch"})

_FILES = "reads or writes files"
_NATIVE = "loads native code"
_EVAL = "evaluates strings as code"
_PROCESS = "starts processes"
_FORBIDDEN_API: dict[str, str] = {
    "torch.hub": "downloads and runs code", "torch.utils.model_zoo": "downloads and runs code",
    "torch.utils.cpp_extension": _NATIVE, "torch.ops.load_library": _NATIVE, "torch.classes": _NATIVE,
    "torch.ops.import_module": "imports modules by name", "torch.cuda.jiterator": "compiles GPU code from strings",
    "torch.cuda.memory.CUDAPluggableAllocator": _NATIVE, "torch.cuda.memory.change_current_allocator": _NATIVE,
    "torch.library": "overrides torch operators for the whole process, the harness included",
    "torch.overrides": "intercepts every torch call, the harness's included",
    "torch.jit": "evaluates type comments as code and loads files (use torch.compile)",
    "torch.load": "unpickles a file", "torch.serialization": "unpickles files", "torch.package": _FILES,
    "torch.export": _FILES, "torch.onnx": _FILES, "torch.utils.tensorboard": _FILES, "torch.utils.file_baton": _FILES,
    "torch.utils.data.datapipes": _FILES, "torch.distributed.checkpoint": _FILES, "torch.utils.show_pickle": _FILES,
    "torch.utils.benchmark": _EVAL, "torch.utils.collect_env": "runs shell commands",
    "torch.utils.bottleneck": _PROCESS,
    "torch.multiprocessing": _PROCESS, "torch.distributed.elastic": _PROCESS, "torch.distributed.run": _PROCESS,
    "torch.distributed.launch": _PROCESS, "torch.distributed.launcher": _PROCESS,
    "torch.compiler.load_cache_artifacts": "unpickles bytes", "torch.distributed.FileStore": _FILES,
    "torch.fx": "generates and runs Python code from strings",
    "torch.ao.quantization.quantize_fx": "generates and runs Python code from strings",
    "torch.cuda.caching_allocator_delete": "frees arbitrary GPU memory",
    "torch.cuda.memory.caching_allocator_delete": "frees arbitrary GPU memory",
    **dict.fromkeys(("numpy.load", "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.fromfile",
                     "numpy.memmap", "numpy.loadtxt", "numpy.genfromtxt", "numpy.savetxt", "numpy.fromregex",
                     "numpy.DataSource", "numpy.lib.format", "numpy.lib.npyio", "numpy.source"), _FILES),
    "numpy.ctypeslib": _NATIVE, "numpy.f2py": _NATIVE, "numpy.distutils": _NATIVE, "numpy.testing": _PROCESS,
    "numpy.info": "imports modules by name",
    "numpy.lib.stride_tricks.as_strided": "reads and writes memory outside the array",
    "numpy.lib.stride_tricks.DummyArray": "reads and writes memory outside the array",
    "typing.get_type_hints": _EVAL, "typing.ForwardRef": _EVAL, "typing.evaluate_forward_ref": _EVAL,
    "functools.singledispatch": "evaluates annotations as code",
    "functools.singledispatchmethod": "evaluates annotations as code",
    "functools.update_wrapper": "rewrites attributes (even __code__) of another function",
    "dataclasses.make_dataclass": "builds classes from strings",
    "string.Formatter": "walks attributes named in strings",
    **dict.fromkeys(("warnings.formatwarning", "warnings.showwarning", "warnings.warn_explicit"),
                    "reads source lines from any file"),
}
_FORBIDDEN_METHODS = {  # on any object
    "from_file": "maps a file into memory; all data comes from ctx.iter_train_batches",
    "tofile": "writes a file; save with torch.save under ctx.artifacts_dir",
    "py_impl": "overrides a torch operator for the whole process, the harness included",
}
# Performance switches a training script may set; every other assignment into torch is monkeypatching.
_TORCH_FLAGS = frozenset({"torch.backends.cudnn.benchmark", "torch.backends.cudnn.deterministic",
                          "torch.backends.cudnn.allow_tf32", "torch.backends.cuda.matmul.allow_tf32",
                          "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction",
                          "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction"})
# Calls that modify the class or function they are given.
_MUTATORS = frozenset({"dataclasses.dataclass", "functools.total_ordering", "typing.final", "typing.no_type_check",
                       "typing.runtime_checkable", "abc.update_abstractmethods"})

_FORBIDDEN_BUILTINS = {
    "eval": "runs a string as code", "exec": "runs a string as code", "compile": "turns a string into code",
    "__import__": "imports any module", "open": "opens files", "input": "reads the process's stdin",
    "breakpoint": "starts a debugger", "help": "imports modules by name", "globals": "exposes module internals",
    "locals": "exposes frame internals", "vars": "exposes object internals",
}
_ATTR_BUILTINS = frozenset({"getattr", "setattr", "delattr", "hasattr"})
# Attribute names that lead from any object to a frame, a code object or a base class.
_INTROSPECTION = frozenset({"gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "cr_origin",
                            "ag_frame", "ag_code", "ag_await", "f_back", "f_globals", "f_locals", "f_builtins",
                            "f_code", "f_trace", "tb_frame", "tb_next", "co_code", "co_consts", "co_names",
                            "mro"})  # `MyModel.mro()[1]` is nn.Module itself
# Module names that must not be reached as an attribute of anything (`warnings.sys`, `array.ctypes`).
_UNSAFE_MODULES = frozenset({"os", "sys", "subprocess", "builtins", "importlib", "inspect", "ctypes", "io", "_io",
                             "pathlib", "shutil", "socket", "pickle", "marshal", "gc", "posix", "nt", "threading",
                             "_thread", "multiprocessing", "runpy", "linecache", "pdb", "pydoc", "mmap", "tempfile",
                             "zipimport", "pkgutil", "_posixsubprocess", "_imp", "imp", "asyncio", "shelve"})

_DUNDER = re.compile(r"^__\w+__$")
_DUNDER_IN_TEXT = re.compile(r"(?<![A-Za-z0-9])__[A-Za-z]\w*?__(?![A-Za-z0-9])")
_SAFE_DUNDERS = frozenset({"__init__", "__call__", "__name__", "__qualname__", "__len__", "__getitem__",
                           "__setitem__", "__iter__", "__next__", "__enter__", "__exit__", "__repr__", "__str__",
                           "__eq__", "__hash__", "__post_init__", "__version__", "__contains__", "__bool__",
                           "__module__"})
_SAFE_DUNDER_NAMES = frozenset({"__name__", "__all__", "__slots__", "__version__", "__author__", "__hash__",
                                "__match_args__"})
# Methods a class may define; the rest (__torch_function__, __reduce__, __array_interface__, __del__, __class__…)
# are hooks that C code or the harness would call.
_SAFE_DEFS = _SAFE_DUNDERS | frozenset(
    f"__{name}__" for name in (
        "new ne lt le gt ge neg pos abs invert int float index round delitem missing reversed getattr setattr "
        "delattr dir get set delete set_name init_subclass class_getitem format copy deepcopy array aenter aexit "
        "aiter anext await".split()
        + [f"{prefix}{op}" for op in "add sub mul truediv floordiv mod pow matmul and or xor lshift rshift".split()
           for prefix in ("", "r", "i")]))
_RESERVED_MODULE_NAMES = frozenset(sys.stdlib_module_names) | _OPEN_PACKAGES | {"prism_challenge", "prism_ray"}
_MAX_RESOLUTION_STEPS = 200_000  # far above any real script; a file crafted to explode the alias analysis fails


class _TooComplex(Exception):
    """The file is too deeply nested, or too tangled, to analyse."""


def module_names(paths: Iterable[str]) -> set[str]:
    """The importable bundle modules (`a/b.py` → a.b, `a/__init__.py` → a) and their packages.

    Names that would shadow the standard library or an allowed package are left out: importing them resolves to
    the real module, so they must pass the allowlist like any other import (`inspect` reports them).
    """
    names: set[str] = set()
    for path in paths:
        name = _module_name(path)
        if name and name.split(".")[0] not in _RESERVED_MODULE_NAMES:
            parts = name.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


def _module_name(path: str) -> str | None:
    pure = PurePosixPath(path)
    if pure.suffix != ".py":
        return None
    parts = [*pure.parent.parts, pure.stem]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts and all(part.isidentifier() for part in parts) else None


def inspect(bundle: Bundle) -> list[Reason]:
    """Every sandbox finding over every .py file of the bundle; empty means clean."""
    sources = bundle.python_files
    modules = module_names(sources)
    reasons: list[Reason] = []
    tables: dict[str, tuple[ast.Module, _Binder]] = {}
    for path, source in sources.items():
        name = _module_name(path)
        if name and name.split(".")[0] in _RESERVED_MODULE_NAMES:
            reasons.append(Reason(rule="sandbox:shadow", file=path, line=1, message=(
                f"{path} shadows the module `{name.split('.')[0]}`; rename the file")))
        parsed = _parse(path, source)
        if isinstance(parsed, Reason):
            reasons.append(parsed)
        else:
            tables[path] = (parsed, _bind(parsed, path))
    # What each bundle module binds to imports, so `from architecture import torch` resolves across files.
    exports: dict[str, dict[str, set[str]]] = {}
    for path, (_, binder) in tables.items():
        name = _module_name(path)
        if name in modules:
            resolver = _Resolver(binder, modules, {})
            try:
                exports[name] = {symbol: found for symbol in binder.module.bindings
                                 if (found := resolver.module_origins(symbol))}
            except (RecursionError, _TooComplex):  # reported when the file itself is checked
                continue
    for path, (tree, binder) in tables.items():
        reasons += _check(path, tree, binder, modules, exports)
    return _dedupe(reasons)


def inspect_source(path: str, source: str, bundle_modules: set[str],
                   exports: dict[str, dict[str, set[str]]] | None = None) -> list[Reason]:
    """Findings for one file. Without `exports`, names imported from other bundle modules count as the miner's own."""
    parsed = _parse(path, source)
    if isinstance(parsed, Reason):
        return [parsed]
    return _dedupe(_check(path, parsed, _bind(parsed, path), bundle_modules, exports or {}))


def _parse(path: str, source: str) -> ast.Module | Reason:
    try:
        return ast.parse(source, filename=path)
    except SyntaxError as error:
        return Reason(rule="sandbox:syntax", message=f"syntax error: {error.msg}", file=path, line=error.lineno or 1)
    except ValueError as error:  # e.g. a NUL byte
        return Reason(rule="sandbox:syntax", message=f"the file cannot be parsed ({error})", file=path, line=1)
    except (RecursionError, MemoryError):
        return _too_complex(path)


def _bind(tree: ast.Module, path: str) -> _Binder:
    name = _module_name(path) or ""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    binder = _Binder(package)
    try:
        binder.run(tree)
    except RecursionError:
        binder.too_deep = True
    return binder


def _check(path: str, tree: ast.Module, binder: _Binder, modules: set[str],
           exports: dict[str, dict[str, set[str]]]) -> list[Reason]:
    if binder.too_deep:
        return [_too_complex(path)]
    checker = _Checker(path, tree, _Resolver(binder, modules, exports))
    try:
        checker.visit(tree)
    except (RecursionError, _TooComplex):
        return [_too_complex(path)]
    return checker.reasons


def _too_complex(path: str) -> Reason:
    return Reason(rule="sandbox:too_complex", file=path, line=1, message=(
        f"{path} is nested too deeply, or its names are aliased in too tangled a way, to analyse; split long "
        "expressions and avoid chains of names assigned to each other"))


def _dedupe(reasons: list[Reason]) -> list[Reason]:
    unique = {(r.rule, r.message, r.file, r.line): r for r in reasons}
    return sorted(unique.values(), key=lambda r: (r.file or "", r.line or 0, r.rule))


# --------------------------------------------------------------------------------------------------- pass 1


@dataclass(frozen=True)
class _Binding:
    kind: str  # import | value (the expression's object) | element (an item of it) | local | deleted
    origin: str = ""
    expr: ast.expr | None = None
    line: int = 0
    unconditional: bool = False  # a direct statement of a module or class body


@dataclass(eq=False)
class _Scope:
    kind: str  # module | function | class (lambdas and comprehensions are functions)
    parent: _Scope | None = None
    comprehension: bool = False
    bindings: dict[str, list[_Binding]] = field(default_factory=dict)
    declared_global: set[str] = field(default_factory=set)
    declared_nonlocal: set[str] = field(default_factory=set)


class _Binder(ast.NodeVisitor):
    """Pass 1: each scope's bindings and the scope every node is evaluated in."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.module = _Scope("module")
        self.scope = self.module
        self.scope_of: dict[ast.AST, _Scope] = {}
        self.too_deep = False
        self._direct: set[ast.AST] = set()  # statements directly in a module or class body
        self._statement: ast.AST | None = None
        self._bound: set[ast.AST] = set()  # Name targets already bound with their value

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
             scope: _Scope | None = None) -> None:
        scope = scope or self.scope
        binding = _Binding(kind, origin, expr, getattr(self._statement, "lineno", 0), self._statement in self._direct)
        homes = [scope]
        if name in scope.declared_global:
            homes = [self.module]
        elif name in scope.declared_nonlocal:  # every enclosing function: over-approximate, never miss
            homes = [s for s in _ancestors(scope) if s.kind == "function"] or [scope]
        for home in homes:
            home.bindings.setdefault(name, []).append(binding)

    def _enter(self, kind: str, body: Iterable[ast.AST], params: Iterable[str] = ()) -> None:
        outer, self.scope = self.scope, _Scope(kind, self.scope)
        for param in params:
            self.bind(param, "local")
        for node in body:
            self.visit(node)
        self.scope = outer

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for part in [*node.decorator_list, node.args, *([node.returns] if node.returns else [])]:
            self.visit(part)  # defaults and annotations belong to the enclosing scope
        self.bind(node.name, "local")
        self._enter("function", [*getattr(node, "type_params", []), *node.body], _params(node.args))

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.visit(node.args)
        self._enter("function", [node.body], _params(node.args))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for part in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(part)
        self.bind(node.name, "local")
        self._direct.update(node.body)
        self._enter("class", [*getattr(node, "type_params", []), *node.body])

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> None:
        self.visit(node.generators[0].iter)  # the first iterable is evaluated outside
        outer, self.scope = self.scope, _Scope("function", self.scope, comprehension=True)
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
        base = _absolute_module(node, self.package)
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

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.name:
            self.bind(node.name, "local")
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self.bind(node.name, "local")

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        if node.rest:
            self.bind(node.rest, "local")
        self.generic_visit(node)


def _params(args: ast.arguments) -> list[str]:
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    return [arg.arg for arg in every if arg is not None]


def _ancestors(scope: _Scope) -> Iterable[_Scope]:
    while scope.parent is not None:
        scope = scope.parent
        yield scope


def _absolute_module(node: ast.ImportFrom, package: str) -> str | None:
    """The absolute module a `from … import` names; None when a relative import climbs above the bundle."""
    if node.level == 0:
        return node.module or ""
    parts = package.split(".") if package else []
    if node.level - 1 > len(parts):
        return None
    base = parts[:len(parts) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


# --------------------------------------------------------------------------------------------------- resolution


class _Resolver:
    """What an expression may evaluate to, as canonical dotted origins (`<type>` marks `type(x)`)."""

    def __init__(self, binder: _Binder, modules: set[str], exports: dict[str, dict[str, set[str]]]) -> None:
        self.binder = binder
        self.modules = modules
        self.exports = exports
        # Name results are cached (alias chains would otherwise cost exponential time), except those computed
        # while a cycle (`a = b; b = a`) was cut short, which may be incomplete.
        self._cache: dict[tuple[str, int, str], set[str]] = {}
        self._busy: set[tuple[str, int, str]] = set()
        self._cut = False
        self._steps = 0

    def scope(self, node: ast.AST) -> _Scope:
        return self.binder.scope_of.get(node, self.binder.module)

    def lookup(self, node: ast.Name) -> tuple[_Scope, list[_Binding]] | None:
        scope = self.scope(node)
        if node.id in scope.declared_global:
            scope = self.binder.module
        for index, candidate in enumerate([scope, *_ancestors(scope)]):
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
            found = {_extend(origin, node.attr) for origin in self.origins(node.value)}
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
            name = _const_str(node.args[1]) if len(node.args) >= 2 else None
            if builtin == "getattr" and name is not None:
                found = {_extend(origin, name) for origin in self.origins(node.args[0])}
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

    def _through_bindings(self, want: str, found: tuple[_Scope, list[_Binding]] | None, name: str) -> set[str]:
        if found is None:
            return set()
        self._steps += 1
        if self._steps > _MAX_RESOLUTION_STEPS:
            raise _TooComplex
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
        return set().union(*(self.canonical(_extend(target, rest) if rest else target, depth + 1)
                             for target in targets))

    def foreign(self, origins: Iterable[str]) -> list[str]:
        """Origins outside the bundle: imported modules, their contents, and `type(x)` (any class)."""
        return sorted(o for o in origins if o.startswith("<") or self.bundle_prefix(o) is None)


def _extend(origin: str, attr: str) -> str:
    return origin if origin.startswith("<") else f"{origin}.{attr}"


def _const_str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _api_problem(origin: str) -> tuple[str, str] | None:
    """(rule, why) when a dotted origin outside the bundle is off limits."""
    parts = origin.split(".")
    for i in range(1, len(parts) + 1):
        if (why := _FORBIDDEN_API.get(".".join(parts[:i]))) is not None:
            return "sandbox:forbidden_api", why
    for part in parts[1:]:
        if part.startswith("_") and not _DUNDER.match(part) and not part.startswith("_foreach_"):
            return "sandbox:private_api", f"uses the private name `{part}`, which has no stable or safe contract"
    if parts[0] == "torch" and parts[-1].startswith("register_module_"):
        return "sandbox:forbidden_api", "installs a hook on every module, the harness's included"
    return None


def _code(node: ast.AST) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= 70 else text[:69] + "…"


# --------------------------------------------------------------------------------------------------- pass 2


class _Checker(ast.NodeVisitor):
    """Pass 2: every rule, over one file."""

    def __init__(self, path: str, tree: ast.Module, resolver: _Resolver) -> None:
        self.path = path
        self.resolver = resolver
        self.reasons: list[Reason] = []
        self.parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        self.module_names = set(_KNOWN_MODULES) | resolver.modules
        for node in ast.walk(tree):
            named = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in named:
                parts = name.split(".")
                self.module_names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        self.docstrings = {node.body[0].value for node in ast.walk(tree)
                           if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                           and node.body and isinstance(node.body[0], ast.Expr)
                           and _const_str(node.body[0].value) is not None}
        self.numbers = 0
        self.string_bytes = 0

    def report(self, rule: str, node: ast.AST, message: str) -> None:
        self.reasons.append(Reason(rule=rule, message=message, file=self.path, line=getattr(node, "lineno", 1)))

    # ---- imports

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_module(node, alias.name, f"import {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _absolute_module(node, self.resolver.binder.package)
        statement = _code(node)
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
                    self._check_name(node, alias.name, statement)
                    self._check_api(node, {full}, statement)

    def _check_module(self, node: ast.AST, name: str, statement: str) -> bool:
        """Report a module outside the allowlist; True when importing it is fine."""
        if name in self.resolver.modules:
            return True
        if not (name in _STDLIB or name in _INTERFACE or name.split(".")[0] in _OPEN_PACKAGES):
            self.report("sandbox:import", node, (
                f"`{statement}`: bundles may import torch, numpy, einops, the PRISM interface, their own files and "
                f"a few standard modules (math, typing, dataclasses, collections, functools, …), not `{name}`"))
            return False
        return not self._check_api(node, {name}, statement)

    # ---- names, attributes and calls

    def visit_Name(self, node: ast.Name) -> None:
        resolver = self.resolver
        if isinstance(node.ctx, ast.Load) and node.id in _FORBIDDEN_BUILTINS and resolver.is_builtin(node):
            self.report("sandbox:forbidden_builtin", node,
                        f"`{node.id}` {_FORBIDDEN_BUILTINS[node.id]}; bundles may not use it, even by reference")
        elif _DUNDER.match(node.id) and node.id not in _SAFE_DUNDER_NAMES:
            self.report("sandbox:dunder", node, f"the name `{node.id}` reaches interpreter internals")
        if isinstance(node.ctx, ast.Load):
            if node.id in _ATTR_BUILTINS and resolver.is_builtin(node) and not self._is_callee(node):
                self.report("sandbox:dynamic_attr", node, f"`{node.id}` may only be called directly, with a "
                                                          "constant attribute name")
            self._check_value(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._check_name(node, node.attr, _code(node))
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._check_patch(node, node.value, f"`{_code(node)}`", node.attr)
        elif self._is_chain_top(node):
            self._check_api(node, self.resolver.origins(node), _code(node))
        if isinstance(node.ctx, ast.Load):
            self._check_value(node)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._check_patch(node, node.value, f"`{_code(node)}`", "[…]")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        resolver = self.resolver
        builtin = resolver.builtin_call(node)
        if builtin in _ATTR_BUILTINS:
            self._check_attr_call(node, builtin)
        elif builtin == "type" and len(node.args) + len(node.keywords) > 1:
            self.report("sandbox:forbidden_builtin", node, f"`{_code(node)}` builds a class from strings; "
                                                           "write a class statement")
        callee = resolver.origins(node.func)
        if "torch.save" in callee:
            self._check_save(node)
        if "torch.compile" in callee and any(k.arg == "options" or (k.arg == "backend" and _const_str(k.value) is None)
                                             for k in node.keywords):
            self.report("sandbox:forbidden_api", node, (
                f"`{_code(node)}`: torch.compile may take mode=… and a backend name, not options=… (they name "
                "programs to run) or a backend function (it receives editable generated code)"))
        if "functools.wraps" in callee and (len(node.args) > 1 or node.keywords):
            self.report("sandbox:forbidden_api", node, f"`{_code(node)}`: functools.wraps may only copy the default "
                                                       "attributes")
        if callee & _MUTATORS:
            for arg in node.args:
                self._check_patch(node, arg, f"`{_code(node)}`")
        self.generic_visit(node)

    def _check_attr_call(self, node: ast.Call, builtin: str) -> None:
        name = _const_str(node.args[1]) if len(node.args) >= 2 else None
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args) or name is None:
            self.report("sandbox:dynamic_attr", node, f"`{_code(node)}`: {builtin} needs a constant attribute name")
            return
        if not name.isidentifier() or _DUNDER.match(name):
            self.report("sandbox:dynamic_attr", node, f"`{_code(node)}`: {builtin} may not name {name!r}")
            return
        self._check_name(node, name, _code(node))
        if builtin in ("setattr", "delattr"):
            self._check_patch(node, node.args[0], f"`{_code(node)}`", name)
        elif self._is_chain_top(node):
            self._check_api(node, self.resolver.origins(node), _code(node))
            if builtin == "getattr":
                self._check_value(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if _DUNDER.match(node.name) and node.name not in _SAFE_DEFS:
            self.report("sandbox:dunder", node, f"`def {node.name}` defines a hook that torch, numpy or the harness "
                                                "would call; bundles may not define it")
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if node in self.docstrings:
            return
        if isinstance(value, str):  # dunder names fed to string-driven APIs (format fields, class namespaces)
            unsafe = [name for name in _DUNDER_IN_TEXT.findall(value) if name not in _SAFE_DUNDERS | {"__main__"}]
            if unsafe:
                self.report("sandbox:dunder", node, f"the string constant names `{unsafe[0]}`, an interpreter "
                                                    "internal")
        if isinstance(value, (str, bytes)):
            before = self.string_bytes
            self.string_bytes += len(value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value)
            if before <= MAX_STRING_BYTES < self.string_bytes:
                self.report("sandbox:embedded_data", node, (
                    f"{self.path} holds more than {MAX_STRING_BYTES // 1024} KiB of string constants; bundles may "
                    "not embed data (models learn from the stream)"))
        elif isinstance(value, (int, float, complex)) and not isinstance(value, bool):
            before = self.numbers
            self.numbers += max(1, (abs(value).bit_length() + 63) // 64) if isinstance(value, int) else 1
            if before <= MAX_NUMBERS < self.numbers:
                self.report("sandbox:embedded_data", node, (
                    f"{self.path} holds more than {MAX_NUMBERS:,} numeric constants; bundles may not embed weights "
                    "or data (models learn from the stream)"))

    # ---- the rules behind the visits

    def _check_name(self, node: ast.AST, name: str, expression: str) -> None:
        """Rules on an attribute name, whatever object it is read from."""
        if _DUNDER.match(name) and name not in _SAFE_DUNDERS:
            self.report("sandbox:dunder", node, f"`{expression}` reaches `{name}`, an interpreter internal")
        elif name in _INTROSPECTION:
            self.report("sandbox:introspection", node, f"`{expression}` reaches `{name}`: frames and code objects "
                                                       "expose the harness's internals")
        elif name in _UNSAFE_MODULES:
            self.report("sandbox:import", node, f"`{expression}` reaches the module `{name}`, which bundles may "
                                                "not use")
        elif name in _FORBIDDEN_METHODS:
            self.report("sandbox:forbidden_api", node, f"`{expression}` {_FORBIDDEN_METHODS[name]}")

    def _check_api(self, node: ast.AST, origins: set[str], expression: str) -> bool:
        found = False
        for origin in self.resolver.foreign(origins):
            problem = _api_problem(origin)
            if problem:
                rule, why = problem
                self.report(rule, node, f"`{expression}` uses {origin}, which {why}")
                found = True
        return found

    def _check_patch(self, node: ast.AST, base: ast.AST, expression: str, attr: str = "") -> None:
        """Monkeypatching: changing an imported module or class, or an object reached from one."""
        foreign = self.resolver.foreign(self.resolver.origins(base))
        if not foreign or (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                           and {f"{o}.{attr}" for o in foreign} <= _TORCH_FLAGS):
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
        if not self._is_chain_top(node):
            return
        origins = self.resolver.origins(node)
        if "torch.save" in origins and not self._is_callee(node) and not self._alias_context(node):
            self.report("sandbox:torch_save_path", node, "call torch.save directly, so its path can be checked")
        modules = sorted(o for o in origins if o in self.module_names)
        if modules and not self._alias_context(node):
            self.report("sandbox:module_value", node, (
                f"`{_code(node)}` passes the module {modules[0]} around as a value; use its attributes directly "
                "(the sandbox must see every use of a module)"))

    def _check_save(self, node: ast.Call) -> None:
        path = node.args[1] if len(node.args) >= 2 else next((k.value for k in node.keywords if k.arg == "f"), None)
        pieces = self._path_pieces(path, 0) if path is not None else []
        head = pieces[0] if pieces else None
        text = "".join(p if isinstance(p, str) else "\0" for p in pieces)
        under_artifacts = (isinstance(head, ast.Attribute) and head.attr == "artifacts_dir"
                           and not self.resolver.foreign(self.resolver.origins(head.value)))
        if not under_artifacts or ".." in text:
            self.report("sandbox:torch_save_path", node, (
                f"`{_code(node)}`: torch.save may only write under ctx.artifacts_dir, e.g. "
                "torch.save(model.state_dict(), f\"{ctx.artifacts_dir}/model.pt\")"))

    def _path_pieces(self, node: ast.expr, depth: int) -> list[ast.expr | str]:
        """A path expression as constant text and opaque parts, in order (locals followed once bound once)."""
        if depth > 8:
            return [node]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return [*self._path_pieces(node.left, depth + 1), *self._path_pieces(node.right, depth + 1)]
        if isinstance(node, ast.JoinedStr):
            pieces: list[ast.expr | str] = []
            for value in node.values:
                if isinstance(value, ast.Constant):
                    pieces.append(str(value.value))
                elif isinstance(value, ast.FormattedValue) and value.conversion == -1 and value.format_spec is None:
                    pieces += self._path_pieces(value.value, depth + 1)
                else:
                    pieces.append(value)
            return pieces
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Call) and self.resolver.builtin_call(node) == "str" and len(node.args) == 1:
            return self._path_pieces(node.args[0], depth + 1)
        if isinstance(node, ast.Name) and (found := self.resolver.lookup(node)):
            bindings = found[1]
            if len(bindings) == 1 and bindings[0].kind == "value" and bindings[0].expr is not None:
                return self._path_pieces(bindings[0].expr, depth + 1)
        return [node]

    # ---- where a node sits

    def _is_callee(self, node: ast.AST) -> bool:
        parent = self.parent.get(node)
        return isinstance(parent, ast.Call) and parent.func is node

    def _is_chain_top(self, node: ast.AST) -> bool:
        """Whether this node ends an attribute chain (`torch.hub.load` is checked once, at `.load`)."""
        parent = self.parent.get(node)
        if isinstance(parent, ast.Attribute):
            return False
        return not (isinstance(parent, ast.Call) and parent.args and parent.args[0] is node
                    and self.resolver.builtin_call(parent) in _ATTR_BUILTINS)

    def _alias_context(self, node: ast.AST) -> bool:
        """`alias = value` into a plain name outside a class body: the alias is tracked like the original."""
        child, parent = node, self.parent.get(node)
        while isinstance(parent, (ast.IfExp, ast.BoolOp, ast.NamedExpr)) and child is not getattr(parent, "test", None):
            child, parent = parent, self.parent.get(parent)
        if self.resolver.scope(node).kind == "class":
            return False
        if isinstance(parent, ast.Assign) and parent.value is child:
            return all(isinstance(target, ast.Name) for target in parent.targets)
        return isinstance(parent, ast.AnnAssign) and parent.value is child and isinstance(parent.target, ast.Name)
