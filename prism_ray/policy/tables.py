"""The policy's tables: what a bundle may import, which APIs inside allowed packages are off limits, which names
reach interpreter internals. docs/rules.md explains every entry to miners; keep the two in step.
"""

from __future__ import annotations

import re
import sys

MAX_NUMBERS = 4096  # numeric constants in the whole bundle (a big int counts once per 64 bits)
MAX_STRING_BYTES = 64 * 1024  # str/bytes constants in the whole bundle, docstrings excepted

STDLIB = frozenset({"__future__", "abc", "collections", "collections.abc", "copy", "dataclasses", "enum",
                    "functools", "itertools", "math", "numbers", "random", "re", "string", "time", "typing",
                    "warnings"})
OPEN_PACKAGES = frozenset({"torch", "numpy", "einops"})  # any submodule, minus FORBIDDEN_API and private ones
INTERFACE = frozenset({"prism_challenge", "prism_challenge.evaluator", "prism_challenge.evaluator.interface"})

_FILES = "reads or writes files"
_NATIVE = "loads native code"
_EVAL = "evaluates strings as code"
_PROCESS = "starts processes"
MODE = "installs a dispatch mode that sees and can change every torch operation of the process, the harness's too"
FORBIDDEN_API: dict[str, str] = {
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
    "torch.utils.jit": _FILES, "torch.utils.hipify": _FILES, "torch.utils.model_dump": _FILES,
    "torch.distributed.flight_recorder": "unpickles files", "torch.cuda.tunable": _FILES, "torch.cuda.gds": _FILES,
    "torch.backends.xeon": _PROCESS, "torch.mps.compile_shader": "compiles GPU code from strings",
    "torch.distributed.pipelining": _FILES, "torch.distributed.debug": _PROCESS,
    "torch.distributed.nn.jit": "generates and compiles code from strings",
    "torch.autograd.profiler.load_nvprof": _FILES,
    "torch.xpu.memory.XPUPluggableAllocator": _NATIVE, "torch.xpu.memory.change_current_allocator": _NATIVE,
    "torch.set_default_tensor_type": "imports modules by name", "numpy.lib.add_newdoc": "imports modules by name",
    "torch.compiler.load_cache_artifacts": "unpickles bytes", "torch.distributed.FileStore": _FILES,
    "torch.utils.checkpoint.create_selective_checkpoint_contexts": MODE,
    "torch.utils.flop_counter.FlopCounterMode": MODE,  # (every mode class is caught by MODE_BASES)
    "torch.utils.module_tracker": "installs hooks on every module, the harness's included",
    "torch.distributed.breakpoint": "starts a debugger",
    "torch.distributed.rpc": "unpickles what other ranks send, which runs any code it names",
    "torch.get_device_module": "hands out a module as a value, which the policy could not follow",
    "torch.fx": "generates and runs Python code from strings",
    "torch.ao.quantization.quantize_fx": "generates and runs Python code from strings",
    "torch.cuda.caching_allocator_delete": "frees arbitrary GPU memory",
    "torch.cuda.memory.caching_allocator_delete": "frees arbitrary GPU memory",
    **dict.fromkeys(("numpy.load", "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.fromfile",
                     "numpy.memmap", "numpy.loadtxt", "numpy.genfromtxt", "numpy.savetxt", "numpy.fromregex",
                     "numpy.DataSource", "numpy.lib.format", "numpy.lib.npyio", "numpy.source", "numpy.rec.fromfile",
                     "numpy.ma.mrecords", "numpy.ma.fromfile"), _FILES),
    "numpy.core": "is a deprecated alias that forwards any name to numpy's private numpy._core (use numpy.…)",
    "numpy.ctypeslib": _NATIVE, "numpy.f2py": _NATIVE, "numpy.distutils": _NATIVE, "numpy.testing": _PROCESS,
    "numpy.test": "runs numpy's test suite (imports pytest and reads files)",
    "numpy.info": "imports modules by name",
    "numpy.lib.stride_tricks.as_strided": "reads and writes memory outside the array",
    "numpy.lib.stride_tricks.DummyArray": "reads and writes memory outside the array",
    "typing.get_type_hints": _EVAL, "typing.ForwardRef": _EVAL, "typing.evaluate_forward_ref": _EVAL,
    "functools.singledispatch": "evaluates annotations as code",
    "functools.singledispatchmethod": "evaluates annotations as code",
    "functools.update_wrapper": "rewrites attributes (even __code__) of another function",
    "dataclasses.make_dataclass": "builds classes from strings",
    "enum.global_enum": "writes into the namespace of any module, torch's included",
    "string.Formatter": "walks attributes named in strings",
    **dict.fromkeys(("warnings.formatwarning", "warnings.showwarning", "warnings.warn_explicit"),
                    "reads source lines from any file"),
}
# Torch's mode classes: an instance entered once sees and can rewrite every torch operation of the process. Every
# subclass is forbidden, whatever name reaches it (torch.utils.checkpoint re-exports TorchDispatchMode).
MODE_BASES = ("torch.utils._python_dispatch.TorchDispatchMode", "torch.overrides.TorchFunctionMode")
# Objects that read or call attributes named by a string at run time, whatever name they are reached under.
DYNAMIC_ATTR_OBJECTS = ("operator.attrgetter", "operator.methodcaller")
FORBIDDEN_METHODS = {  # on any object
    "from_file": "maps a file into memory; all data comes from ctx.iter_train_batches",
    "tofile": "writes a file; save with torch.save under ctx.artifacts_dir",
    "py_impl": "overrides a torch operator for the whole process, the harness included",
    # warnings' source-line readers, also where the module is reached as an object the policy cannot follow
    **dict.fromkeys(("formatwarning", "showwarning", "warn_explicit"), "reads source lines from any file"),
    # Library internals red teams reached on objects handed to a method as its `self` (rename your own attribute)
    "_evaluate": "is typing.ForwardRef's, which evaluates a string as code",
    "_module": "is warnings.catch_warnings's, which holds the warnings module",
    "_getcategory": "is the warnings module's, which imports a module by name",
    "_load_csv": "reads a file", "_dump_csv": "writes a file",
}
# Private names a bundle may read on any object the policy cannot follow (a call's result, a parameter); the others
# only as `self._x` of its own plain classes (rules.py, `_own_private`): any other could be a library internal (a red
# team read any file through a private method, `PipelineScheduleMulti(...)._load_csv(path)`).
FOREIGN_PRIVATE_OK = frozenset({"_orig_mod"})  # torch.compile's wrapper → the module it wraps
# `.format` reads any attribute a format field names (`{0.__doc__}`), so its format string must be a constant.
FORMAT_METHODS = frozenset({"format", "format_map"})
# Performance switches a training script may set; every other assignment into torch is monkeypatching.
TORCH_FLAGS = frozenset({"torch.backends.cudnn.benchmark", "torch.backends.cudnn.deterministic",
                         "torch.backends.cudnn.allow_tf32", "torch.backends.cuda.matmul.allow_tf32",
                         "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction",
                         "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction"})
# Calls that modify the class or function they are given.
MUTATORS = frozenset({"dataclasses.dataclass", "functools.total_ordering", "typing.final", "typing.no_type_check",
                      "typing.runtime_checkable", "abc.update_abstractmethods"})
# Objects whose use other rules check by name, so they keep that name whatever path reaches them.
WATCHED = frozenset({"torch.save", "torch.compile", "functools.wraps", "builtins.type"}) | MUTATORS

FORBIDDEN_BUILTINS = {
    "eval": "runs a string as code", "exec": "runs a string as code", "compile": "turns a string into code",
    "__import__": "imports any module", "open": "opens files", "input": "reads the process's stdin",
    "breakpoint": "starts a debugger", "help": "imports modules by name", "globals": "exposes module internals",
    "locals": "exposes frame internals", "vars": "exposes object internals",
}
ATTR_BUILTINS = frozenset({"getattr", "setattr", "delattr", "hasattr"})
# Attribute names that lead from any object to a frame, a code object or a base class.
INTROSPECTION = frozenset({"gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "cr_origin",
                           "ag_frame", "ag_code", "ag_await", "f_back", "f_globals", "f_locals", "f_builtins",
                           "f_code", "f_trace", "tb_frame", "tb_next", "co_code", "co_consts", "co_names",
                           "mro"})  # `MyModel.mro()[1]` is nn.Module itself
# Backstop for objects the policy cannot resolve (a parameter, a call's result): these names are modules nobody
# needs (`x.sys`). Where the object is known, what the attribute really holds decides instead (reach.py).
UNSAFE_MODULE_NAMES = frozenset({"os", "sys", "subprocess", "builtins", "importlib", "inspect", "ctypes", "io", "_io",
                                 "pathlib", "shutil", "socket", "pickle", "marshal", "gc", "posix", "nt", "threading",
                                 "_thread", "multiprocessing", "runpy", "linecache", "pdb", "pydoc", "mmap",
                                 "tempfile", "zipimport", "pkgutil", "_posixsubprocess", "_imp", "imp", "asyncio",
                                 "shelve"})

# Classes whose objects the harness computes with. A store into an object the policy cannot resolve (a parameter,
# a call's result) may not use one of their member names: the object could be the class itself (issue 21:
# `holder.kind.double = …` with `kind = torch.Tensor`). Your own objects are exempt (docs/rules.md, monkeypatch).
SHARED_CLASSES = ("torch.Tensor", "torch.nn.Parameter", "torch.nn.Module", "torch.optim.Optimizer",
                  "torch.optim.lr_scheduler.LRScheduler", "torch.autograd.Function", "torch.no_grad",
                  "torch.enable_grad", "torch.inference_mode", "torch.set_grad_enabled", "torch.autocast")
# Per-object state that training code sets on parameters and modules through those classes' descriptors.
INSTANCE_STATE = frozenset({"grad", "data", "requires_grad", "training"})
# Entering a context by hand can leave it on for the whole process: contexts are entered with `with` only.
CONTEXT_DUNDERS = frozenset({"__enter__", "__exit__", "__aenter__", "__aexit__"})
# Builtin classes whose one positional pattern matches the subject itself (`case int(n)`); any other positional
# pattern reads the attributes that the class's `__match_args__` names, which the source does not show.
SELF_MATCHING = frozenset({"bool", "bytearray", "bytes", "dict", "float", "frozenset", "int", "list", "set", "str",
                           "tuple"})

DUNDER = re.compile(r"^__\w+__$")
DUNDER_IN_TEXT = re.compile(r"(?<![A-Za-z0-9])__[A-Za-z]\w*?__(?![A-Za-z0-9])")
SAFE_DUNDERS = frozenset({"__init__", "__call__", "__name__", "__qualname__", "__len__", "__getitem__",
                          "__setitem__", "__iter__", "__next__", "__enter__", "__exit__", "__repr__", "__str__",
                          "__eq__", "__hash__", "__post_init__", "__version__", "__contains__", "__bool__",
                          "__module__"})
SAFE_DUNDER_NAMES = frozenset({"__name__", "__all__", "__slots__", "__version__", "__author__", "__hash__",
                               "__match_args__"})
# Methods a class may define; the rest (__torch_function__, __reduce__, __array_interface__, __del__, __class__…)
# are hooks that C code or the harness would call.
SAFE_DEFS = SAFE_DUNDERS | frozenset(
    f"__{name}__" for name in (
        "new ne lt le gt ge neg pos abs invert int float index round delitem missing reversed getattr setattr "
        "delattr dir get set delete set_name init_subclass class_getitem format copy deepcopy array aenter aexit "
        "aiter anext await".split()
        + [f"{prefix}{op}" for op in "add sub mul truediv floordiv mod pow matmul and or xor lshift rshift".split()
           for prefix in ("", "r", "i")]))
RESERVED_MODULE_NAMES = frozenset(sys.stdlib_module_names) | OPEN_PACKAGES | {"prism_challenge", "prism_ray"}
MAX_RESOLUTION_STEPS = 200_000  # far above any real script; a file crafted to explode the alias analysis fails


def path_problem(origin: str) -> tuple[str, str] | None:
    """(rule, why) when a dotted name inside an allowed package is off limits by its name."""
    parts = origin.split(".")
    for i in range(1, len(parts) + 1):
        if (why := FORBIDDEN_API.get(".".join(parts[:i]))) is not None:
            return "sandbox:forbidden_api", why
    for part in parts[1:]:
        if part.startswith("_") and not DUNDER.match(part) and not part.startswith("_foreach_"):
            return "sandbox:private_api", f"uses the private name `{part}`, which has no stable or safe contract"
    if parts[0] == "torch" and parts[-1].startswith("register_module_"):
        return "sandbox:forbidden_api", "installs a hook on every module, the harness's included"
    if parts[:2] == ["torch", "distributed"] and parts[-1].endswith(("_object", "_object_list")):
        return "sandbox:forbidden_api", ("unpickles what another rank sends, which runs any code it names; send "
                                         "tensors (dist.broadcast, dist.all_reduce) instead")
    return None


def allowlisted(name: str) -> bool:
    """Whether a module name is on the import allowlist (its APIs may still be forbidden or private)."""
    if any(DUNDER.match(part) for part in name.split(".")):  # `torch.utils.model_dump.__main__` runs a program
        return False
    return name in STDLIB or name in INTERFACE or name.split(".")[0] in OPEN_PACKAGES


def importable(name: str) -> bool:
    """Whether `import name` passes every rule (bundle files aside)."""
    return allowlisted(name) and path_problem(name) is None
