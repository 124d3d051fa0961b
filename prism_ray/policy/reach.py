"""What a dotted origin really reaches: an allowlist of reachable objects, not a list of bad names.

The allowed modules are imported in this process and an origin (`enum.bltns.exec`) is walked one attribute at a
time through their real namespaces, without running any property or `__getattr__`. Whatever a step reaches is
judged by what it is, not by the name it was reached under:
- a module must itself be on the import allowlist (`torch.nn` is, `torch.os`, `typing.types` and `enum.bltns`,
  which is builtins, are not);
- a function, class or other object must come from an allowed module (`torch.nn.Module` does; a `logging.Logger`
  or `datetime.timedelta` re-exported by torch does not); containers are judged by their items;
- a few objects keep one name whatever path reaches them: forbidden builtins and APIs (`torch.load` re-exported
  elsewhere is still torch.load), `operator.attrgetter`/`methodcaller` (getattr with a computed name), and the
  objects other rules check by name (`torch.save`, `dataclasses.dataclass`, …).
The checker's process and the runner's share one environment, so what is walked here is what the bundle gets.
Verdicts are cached for the life of the process and, where the caller names a directory, on disk for this
environment (remembered.py): then a fresh process checks a bundle whose origins were seen before without importing
torch.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import inspect
import itertools
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from prism_ray.policy.remembered import Remembered
from prism_ray.policy.tables import (
    ATTR_BUILTINS,
    DYNAMIC_ATTR_OBJECTS,
    FORBIDDEN_API,
    FORBIDDEN_BUILTINS,
    INSTANCE_STATE,
    INTERFACE,
    MODE,
    MODE_BASES,
    OPEN_PACKAGES,
    SHARED_CLASSES,
    STDLIB,
    WATCHED,
    allowlisted,
    importable,
    path_problem,
)

Problem = tuple[str, str]  # (rule, why: a clause that follows "which")


@dataclass(frozen=True)
class Reached:
    name: str  # the canonical name: a module's real name, a watched object's own name, else the path itself
    problem: Problem | None = None
    known: bool = False  # the walk found the real object
    module: bool = False


_UNKNOWN: Any = object()
_MAX_ITEMS = 10_000  # items of a container looked at
_UNRESOLVED = (property, functools.cached_property, types.GetSetDescriptorType, types.MemberDescriptorType)
_SCALARS = (str, bytes, int, float, complex, bool, type(None))
_CONTAINERS = (dict, list, tuple, set, frozenset)


remembered = Remembered()


def reach(origin: str) -> Reached:
    """What a dotted origin outside the bundle reaches (`<type>` and bundle origins come back unknown)."""
    known = remembered.get(f"reach:{origin}")
    if isinstance(known, list) and len(known) == 5:
        name, problem, why, found, module = known
        return Reached(name, (problem, why) if problem else None, known=found, module=module)
    verdict = _walk(origin)[0]
    if verdict.known:  # what was not found may be found once more modules are loaded: walked again each time
        problem = verdict.problem or (None, None)
        remembered.put(f"reach:{origin}", [verdict.name, *problem, verdict.known, verdict.module])
    return verdict


@functools.lru_cache(maxsize=1 << 16)
def _walk(origin: str) -> tuple[Reached, tuple[Any, ...]]:
    """The origin's verdict and the objects it may be: an attribute of a package can shadow its submodule
    (`torch.distributed.rendezvous` is a function, and a module to `from torch.distributed.rendezvous import …`),
    so both are walked and either one's problem counts."""
    head, dot, attr = origin.rpartition(".")
    if not dot:
        module = _import(origin) if importable(origin) and origin not in INTERFACE else None
        return (Reached(origin, known=True, module=True), (module,)) if module else (Reached(origin), ())
    parent, objects = _walk(head)
    name = f"{parent.name}.{attr}"
    inherited = parent.problem or path_problem(name)
    values = [value for obj in objects for value in _attributes(obj, attr)]
    if not values:
        return Reached(name, inherited), ()
    verdicts = [_judge(value, name, inherited) for value in values]
    problem = next((verdict.problem for verdict in verdicts if verdict.problem), None)
    return replace(verdicts[0], problem=problem, module=any(v.module for v in verdicts)), tuple(values)


def _judge(value: Any, name: str, inherited: Problem | None) -> Reached:
    special = _specials().get(id(value))
    if special is not None and special[0] is value:  # its own problem first: typing.operator.attrgetter is getattr
        return Reached(special[1], special[2] or inherited, known=True)
    if _is(value, types.ModuleType):
        module_name = _name_of(value)
        return Reached(module_name, inherited or _module_problem(module_name), known=True, module=True)
    return Reached(name, inherited or _object_problem(value, name), known=True)


def _is(value: Any, kinds: type | tuple[type, ...]) -> bool:
    """isinstance by the real type: isinstance may read `__class__` through the object's own code."""
    return issubclass(type(value), kinds)


def _name_of(module: types.ModuleType) -> str:
    name = vars(module).get("__name__")  # read from the namespace: a module `__getattr__` must not answer
    return name if _is(name, str) else "<a module without a name>"


def _import(name: str) -> types.ModuleType | None:
    try:
        with warnings.catch_warnings():  # deprecation notices of the imported module are not the bundle's
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except ImportError:  # not installed here, so not in the runner either: the bundle fails to import there
        return None


def _attributes(obj: Any, attr: str) -> list[Any]:
    """What `obj.attr` may be, read without running code: its stored value, and for a package also the
    submodule of that name; empty when only running code would tell."""
    found = [_unwrap(inspect.getattr_static(obj, attr, _UNKNOWN))]
    if _is(obj, types.ModuleType):
        found += [_unwrap(vars(m)[attr]) for m in _proxied(obj) if attr in vars(m)]
        submodule = f"{_name_of(obj)}.{attr}"
        if "__path__" in vars(obj) and importable(submodule) and (module := _import(submodule)) is not None:
            found.append(module)
    unique = {id(value): value for value in found if value is not _UNKNOWN}
    return list(unique.values())


@functools.lru_cache(maxsize=1024)
def _proxied(module: types.ModuleType) -> tuple[types.ModuleType, ...]:
    """The original of a module that replaced itself in sys.modules by a proxy (torch.backends.cudnn)."""
    return tuple(m for m in vars(module).values()
                 if _is(m, types.ModuleType) and m is not module and _name_of(m) == _name_of(module))


def _unwrap(value: Any) -> Any:
    if _is(value, (staticmethod, classmethod)):
        return value.__func__
    return _UNKNOWN if _is(value, _UNRESOLVED) else value


def _module_problem(name: str) -> Problem | None:
    if not allowlisted(name):
        return "sandbox:import", f"goes through the module {name}, which bundles may not use"
    return path_problem(name)


def _object_problem(value: Any, name: str) -> Problem | None:
    if type(value) in _CONTAINERS:
        items = itertools.chain(value.keys(), value.values()) if type(value) is dict else iter(value)
        for item in itertools.islice(items, _MAX_ITEMS):
            if _is(item, _SCALARS):
                continue
            special = _specials().get(id(item))
            if special is not None and special[0] is item:
                problem = special[2]
            elif _is(item, types.ModuleType):
                problem = _module_problem(_name_of(item))
            else:  # one level deep: a container that holds itself must not loop
                problem = None if type(item) in _CONTAINERS else _object_problem(item, name)
            if problem is not None:
                return problem[0], f"goes through {name}, which holds an object that {problem[1]}"
        return None
    if _is(value, type) and any(issubclass(value, base) for base in _mode_bases()):
        return "sandbox:forbidden_api", f"is a torch mode class, which {MODE}"
    for home in _homes(value):
        if not _home_allowed(home):
            return "sandbox:import", f"comes from the module {home}, which bundles may not use"
        forbidden = next((key for key in FORBIDDEN_API if home == key or home.startswith(key + ".")), None)
        if forbidden is not None:
            return "sandbox:forbidden_api", f"comes from {forbidden}, which {FORBIDDEN_API[forbidden]}"
    return None


def _homes(value: Any) -> list[Any]:
    """The modules an object belongs to: where it was defined, and for bound methods also their object's."""
    if _is(value, types.MethodType):
        return _homes(value.__func__) + _homes(value.__self__)
    if _is(value, functools.partial):
        return _homes(value.func)
    if _is(value, (types.MethodDescriptorType, types.WrapperDescriptorType, types.ClassMethodDescriptorType)):
        return [value.__objclass__.__module__]
    if _is(value, types.MethodWrapperType):
        return _homes(value.__self__)
    if _is(value, types.BuiltinFunctionType):  # a C function, or a C method bound to its object
        owner = value.__self__
        if _is(owner, types.ModuleType):
            return [_name_of(owner)]
        if owner is None or type(owner).__module__ == "pybind11_builtins":  # pybind11 binds to a function record
            return [value.__module__]  # None fails closed
        return [value.__module__, *_homes(owner)] if value.__module__ else _homes(owner)
    if _is(value, (type, types.FunctionType)):
        return [value.__module__]
    module = inspect.getattr_static(value, "__module__", None)
    if _is(module, (types.GetSetDescriptorType, types.MemberDescriptorType)):  # C-level, runs no Python
        module = module.__get__(value, type(value))
    return [module if _is(module, str) else type(value).__module__]


def _home_allowed(home: Any) -> bool:
    if not _is(home, str):
        return False
    if home in STDLIB or home == "builtins" or (home.startswith("_") and home[1:] in STDLIB):  # _functools…
        return True
    return home.split(".")[0] in OPEN_PACKAGES | {"prism_challenge"}


@functools.cache
def _specials() -> dict[int, tuple[Any, str, Problem | None]]:
    """id → (object, its name, the problem it always is) for the objects judged by identity."""
    dynamic = ("sandbox:dynamic_attr", "reads or calls attributes named by a string at run time, like getattr with "
                                       "a computed name")
    named: dict[str, Problem | None] = {
        **dict.fromkeys(WATCHED),
        **{name: ("sandbox:forbidden_api", why) for name, why in FORBIDDEN_API.items()},
        **dict.fromkeys(DYNAMIC_ATTR_OBJECTS, dynamic),
        **{f"builtins.{name}": ("sandbox:forbidden_builtin", f"is the builtin `{name}`: it {why}")
           for name, why in FORBIDDEN_BUILTINS.items()},
        **{f"builtins.{name}": ("sandbox:dynamic_attr", f"is the builtin `{name}`, which may only be called directly, "
                                                        "with a constant attribute name") for name in ATTR_BUILTINS},
    }
    table: dict[int, tuple[Any, str, Problem | None]] = {}
    for name, problem in named.items():
        obj = _resolve(name)
        if obj is not _UNKNOWN and not _is(obj, types.ModuleType):  # modules are judged by their name
            table.setdefault(id(obj), (obj, name, problem))
    return table


@functools.cache
def _mode_bases() -> tuple[type, ...]:
    return tuple(base for name in MODE_BASES if _is(base := _resolve(name), type))


def shared_member_names() -> frozenset[str]:
    """The methods the classes the harness computes with (torch.Tensor, nn.Module, …) define along their MRO.
    Data members (`t.device`, `p.grad`, `m.training`) are per-object state that training code sets freely."""
    return _remembered_names("shared_member_names", _shared_member_names)


_names: dict[str, frozenset[str]] = {}


def _remembered_names(key: str, compute: Callable[[], frozenset[str]]) -> frozenset[str]:
    if key not in _names:
        known = remembered.get(key)
        _names[key] = frozenset(known) if isinstance(known, list) else compute()
    if remembered.get(key) is None:  # a file opened after they were computed gets them too
        remembered.put(key, sorted(_names[key]))
    return _names[key]


@functools.cache
def _shared_member_names() -> frozenset[str]:
    names: set[str] = set()
    for name in SHARED_CLASSES:
        cls = _resolve(name)
        for klass in cls.__mro__ if _is(cls, type) else ():
            if klass is not object:
                names.update(attr for attr, member in vars(klass).items()
                             if callable(member) or _is(member, (staticmethod, classmethod)))
    return frozenset(names - INSTANCE_STATE)


def _resolve(name: str) -> Any:
    root, *attrs = name.split(".")
    obj: Any = builtins if root == "builtins" else (_import(root) or _UNKNOWN)
    for attr in attrs:
        values = _attributes(obj, attr) if obj is not _UNKNOWN else []
        obj = values[0] if values else _UNKNOWN
    return obj


def metaclass_methods() -> frozenset[str]:
    """Private methods that classes get from their metaclass, reachable through any subclass, `cls` or `type(x)`
    (`MyEnum._convert_(…)` rewrites the namespace of any module): those of the metaclasses of the classes in the
    allowed standard modules, torch, torch.nn and numpy."""
    return _remembered_names("metaclass_methods", _metaclass_methods)


@functools.cache
def _metaclass_methods() -> frozenset[str]:
    names: set[str] = set()
    for module_name in [*sorted(STDLIB - {"__future__"}), "torch", "torch.nn", "numpy"]:
        module = _import(module_name)
        classes = [value for value in vars(module).values() if _is(value, type)] if module else []
        for cls in classes:
            for klass in {*type(cls).__mro__, *(cls.__mro__ if issubclass(cls, type) else ())} - {type, object}:
                names.update(name for name, member in vars(klass).items()
                             if name.startswith("_") and not name.endswith("__")
                             and callable(_unwrap(member)))
    return frozenset(names)
