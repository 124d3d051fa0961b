"""The static policy: AST rules over every .py file of a bundle, before any of its code runs.

Defence in depth, not the boundary (the process sandbox and a scorer process that never runs training.py are; see
docs/rules.md, "Threat model"). It rejects, with a file:line a miner can act on, code that imports outside a short
allowlist, reaches modules or functions outside it under another name, walks interpreter internals, reads
attributes by computed names, turns strings into code, touches files, modifies imported modules and classes, or
embeds data. Every rule id is documented for miners in docs/rules.md.

- tables.py: the allowlists and the forbidden tables;
- scopes.py: pass 1, every scope's bindings;
- resolver.py: names and attribute chains → the dotted origins they may hold (`F.cross_entropy` →
  torch.nn.functional.cross_entropy);
- reach.py: what an origin really reaches, by walking the allowed modules' real namespaces;
- remembered.py: those verdicts kept on disk for this environment, so a fresh process need not import torch;
- rules.py: pass 2, the rules.
"""

from __future__ import annotations

import ast
import importlib.machinery
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from prism_ray.errors import Reason
from prism_ray.intake.bundle import Bundle
from prism_ray.policy import reach
from prism_ray.policy.resolver import Resolver, TooComplex
from prism_ray.policy.rules import Budget, Checker
from prism_ray.policy.scopes import Binder, module_name
from prism_ray.policy.tables import MAX_NUMBERS, MAX_STRING_BYTES, RESERVED_MODULE_NAMES

__all__ = ["MAX_NUMBERS", "MAX_STRING_BYTES", "inspect", "inspect_source", "module_names"]


def inspect(bundle: Bundle, remember_in: Path | None = None) -> list[Reason]:
    """Every policy finding over every .py file of the bundle; empty means clean. `remember_in`: a directory (the
    operator's cache) where what the walks found is kept for later processes (remembered.py)."""
    if remember_in is not None:
        reach.remembered.open(remember_in)
    try:
        return _inspect(bundle)
    finally:
        reach.remembered.save()


def _inspect(bundle: Bundle) -> list[Reason]:
    # the bytes, parsed as the importer compiles them: a declared encoding and bare `\r` line ends count the same
    sources = {path: bundle.files[path] for path in bundle.python_files}
    modules = module_names(sources)
    reasons: list[Reason] = []
    tables: dict[str, tuple[ast.Module, Binder]] = {}
    for path, source in sources.items():
        shadowed = _shadowed(path)
        if shadowed is not None:
            reasons.append(shadowed)
        parsed = _parse(path, source)
        if isinstance(parsed, Reason):
            reasons.append(parsed)
        else:
            tables[path] = (parsed, _bind(parsed, path))
    # What each bundle module binds to imports, so `from architecture import torch` resolves across files.
    exports: dict[str, dict[str, set[str]]] = {}
    for path, (_, binder) in tables.items():
        name = module_name(path)
        if name in modules:
            resolver = Resolver(binder, modules, {})
            try:
                exports[name] = {symbol: found for symbol in binder.module.bindings
                                 if (found := resolver.module_origins(symbol))}
            except (RecursionError, TooComplex):  # reported when the file itself is checked
                continue
    budget = Budget()
    for path, (tree, binder) in tables.items():
        reasons += _check(path, tree, binder, modules, exports, budget)
    return _dedupe(reasons)


def inspect_source(path: str, source: str, bundle_modules: set[str],
                   exports: dict[str, dict[str, set[str]]] | None = None) -> list[Reason]:
    """Findings for one file. Without `exports`, names imported from other bundle modules count as the miner's own."""
    parsed = _parse(path, source)
    if isinstance(parsed, Reason):
        return [parsed]
    return _dedupe(_check(path, parsed, _bind(parsed, path), bundle_modules, exports or {}, Budget()))


def _shadowed(path: str) -> Reason | None:
    """A file whose top-level module name is a real module's, or one the interpreter already holds (`__main__` is
    the runner itself, with `os` in its namespace)."""
    top = (module_name(path) or "").split(".")[0]
    if top in RESERVED_MODULE_NAMES or (top.startswith("__") and top.endswith("__")):
        return Reason(rule="sandbox:shadow", file=path, line=1, message=f"{path} shadows the module `{top}`; "
                      "rename the file")
    if top and _installed(top):
        return Reason(rule="sandbox:shadow", file=path, line=1, message=(
            f"{path} has the name of the installed module `{top}`, which Python imports instead of your file "
            "(your files come after the installed modules); rename the file"))
    return None


def _installed(name: str) -> bool:
    """Whether `import name` finds a module outside the bundle where the runner runs: the bundle dir comes last on
    its path, so such a module, whose code this policy never reads, would be imported instead of the bundle's file
    (a red team got `cffi` past the policy with an empty `cffi.py`). The working directory is left out: the runner
    does not have it, and a miner may check a bundle from inside it."""
    here = os.getcwd()
    paths = [entry for entry in sys.path if entry and os.path.abspath(entry) != here]
    for finder in sys.meta_path:  # builtins, frozen modules, editable installs' finders, then sys.path
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec(name, paths)
        else:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, None) if find_spec is not None else None
        if spec is not None:
            return True
    return False


def module_names(paths: Iterable[str]) -> set[str]:
    """The importable bundle modules (`a/b.py` → a.b, `a/__init__.py` → a) and their packages.

    Names that would shadow the standard library or an allowed package are left out: importing them resolves to
    the real module, so they must pass the allowlist like any other import (`inspect` reports them).
    """
    names: set[str] = set()
    for path in paths:
        name = module_name(path)
        if name and name.split(".")[0] not in RESERVED_MODULE_NAMES:
            parts = name.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


def _parse(path: str, source: str | bytes) -> ast.Module | Reason:
    try:
        return ast.parse(source, filename=path)
    except SyntaxError as error:
        return Reason(rule="sandbox:syntax", message=f"syntax error: {error.msg}", file=path, line=error.lineno or 1)
    except ValueError as error:  # e.g. a NUL byte
        return Reason(rule="sandbox:syntax", message=f"the file cannot be parsed ({error})", file=path, line=1)
    except (RecursionError, MemoryError):
        return _too_complex(path)


def _bind(tree: ast.Module, path: str) -> Binder:
    name = module_name(path) or ""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    binder = Binder(package)
    try:
        binder.run(tree)
    except RecursionError:
        binder.too_deep = True
    return binder


def _check(path: str, tree: ast.Module, binder: Binder, modules: set[str],
           exports: dict[str, dict[str, set[str]]], budget: Budget) -> list[Reason]:
    if binder.too_deep:
        return [_too_complex(path)]
    checker = Checker(path, tree, Resolver(binder, modules, exports), budget)
    try:
        checker.visit(tree)
    except (RecursionError, TooComplex):
        return [_too_complex(path)]
    return checker.reasons


def _too_complex(path: str) -> Reason:
    return Reason(rule="sandbox:too_complex", file=path, line=1, message=(
        f"{path} is nested too deeply, or its names are aliased in too tangled a way, to analyse; split long "
        "expressions and avoid chains of names assigned to each other"))


def _dedupe(reasons: list[Reason]) -> list[Reason]:
    unique = {(r.rule, r.message, r.file, r.line): r for r in reasons}
    return sorted(unique.values(), key=lambda r: (r.file or "", r.line or 0, r.rule))
