"""The policy judges what an attribute really reaches, not its name: every escape found by attacking it (issue 14)
and its variants is rejected at its line, and the everyday code of a training script still passes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from prism_ray.intake.bundle import check_contract, load_bundle
from prism_ray.policy import MAX_NUMBERS, MAX_STRING_BYTES, inspect, inspect_source, rules
from prism_ray.policy.rules import UNCHECKED_NODES, Checker

ATTACKS = Path(__file__).resolve().parent / "attacks"
MODULES = {"architecture", "training", "helpers"}

# tests/attacks/<bundle>: the rule it now gets (the line is the one marked `# <-`)
BUNDLES = {
    "bltns_exec": "sandbox:forbidden_builtin",
    "attrgetter_closure": "sandbox:dynamic_attr",
    "format_docstring": "sandbox:dynamic_attr",
    "enum_convert": "sandbox:private_api",
    "reexported_allocator": "sandbox:forbidden_api",
    # issue 21
    "match_globals": "sandbox:dunder",
    "match_positional": "sandbox:dynamic_attr",
    "tensor_holder": "sandbox:monkeypatch",
    "unbound_init": "sandbox:dunder",
    "checkpoint_mode": "sandbox:forbidden_api",
    "autocast_enter": "sandbox:dunder",
}

# (rule, source with the offending line marked `# <-`)
VARIANTS = {
    # modules reached under another name
    "typing.types": ("sandbox:import", "import typing\nmake = typing.types.FunctionType  # <-\n"),
    "typing.contextlib": ("sandbox:import", "import typing\nquiet = typing.contextlib.redirect_stdout(None)  # <-\n"),
    "from dataclasses import types": ("sandbox:import", "from dataclasses import types  # <-\n"),
    "re.copyreg": ("sandbox:import", "import re\nre.copyreg.dispatch_table.clear()  # <-\n"),
    "torch.glob": ("sandbox:import", "import torch\nfiles = torch.glob.glob('/data/*')  # <-\n"),
    "torch.platform": ("sandbox:import", "import torch\nhost = torch.platform.node()  # <-\n"),
    "torch.textwrap": ("sandbox:import", "import torch\ntext = torch.textwrap.dedent('x')  # <-\n"),
    "torch.os through an alias": ("sandbox:import", "import torch.nn.functional as F\nF.torch.os.system('id')  # <-\n"),
    "module alias kept in a name": ("sandbox:import", "import dataclasses\nsystem = dataclasses.sys  # <-\n"),
    "numpy.core forwards to private numpy._core": ("sandbox:forbidden_api",
                                                   "import numpy as np\ndata = np.core.multiarray.fromfile('x')  # <-\n"),
    # file readers of the open packages (a red team pretrained on the Python docs of the sandbox's own install)
    "np.rec.fromfile": ("sandbox:forbidden_api",
                        "import numpy as np\ntext = np.rec.fromfile('/usr/lib/os-release', dtype='u1')  # <-\n"),
    "np.ma.mrecords.fromtextfile": ("sandbox:forbidden_api",
                                    "from numpy.ma import mrecords\nrows = mrecords.fromtextfile('/etc/hosts')  # <-\n"),
    "np.ma.mrecords.openfile": ("sandbox:forbidden_api", "from numpy.ma.mrecords import openfile  # <-\n"),
    "torch.utils.jit.log_extract": ("sandbox:forbidden_api",
                                    "from torch.utils.jit.log_extract import extract_ir  # <-\n"),
    "torch.utils.hipify": ("sandbox:forbidden_api", "from torch.utils.hipify import hipify_python  # <-\n"),
    "torch.utils.model_dump": ("sandbox:forbidden_api", "import torch.utils.model_dump  # <-\n"),
    "a flight-recorder dump is a pickle": ("sandbox:forbidden_api", "from torch.distributed.flight_recorder."
                                           "components.loader import read_dump  # <-\n"),
    "torch.cuda.tunable": ("sandbox:forbidden_api", "import torch\ntorch.cuda.tunable.tune_gemm_in_file('x')  # <-\n"),
    "torch.cuda.gds": ("sandbox:forbidden_api", "from torch.cuda.gds import GdsFile  # <-\n"),
    "torch.backends.xeon": ("sandbox:forbidden_api", "from torch.backends.xeon.run_cpu import main  # <-\n"),
    "torch.mps.compile_shader": ("sandbox:forbidden_api", "import torch\nlib = torch.mps.compile_shader('x')  # <-\n"),
    "a private method of a call's result reads a file": (
        "sandbox:private_api", "import torch.nn as nn\n\ndef leak(schedule, path):\n"
        "    return schedule._read(path)  # <-\n"),
    "a dummy of the same name unlocks nothing": (
        "sandbox:private_api", "import typing\n\ndef _secret(*args):\n    return None\n\n"
        "ref = typing.get_args(typing.List['open'])[0]\nvalue = ref._secret({}, {}, frozenset())  # <-\n"),
    "a private attribute of a library object's instance": (
        "sandbox:private_api", "import warnings\n\nclass Holder:\n    def __init__(self):\n        self._secret = None\n\n"
        "mod = warnings.catch_warnings()._secret  # <-\n"),
    "a library object bound to a local named self": (
        "sandbox:private_api", "import typing\nclass Helper:\n    def __init__(self):\n        self._secret = None\n"
        "def train(model):\n    self = typing.get_args(typing.List['1 + 2'])[0]\n"
        "    return self._secret({}, {}, recursive_guard=frozenset())  # <-\n"),
    "a function's parameter named self": (
        "sandbox:private_api", "import warnings\nclass Helper:\n    def __init__(self):\n        self._secret = None\n"
        "def get(self):\n    return self._secret  # <-\n"),
    "a comprehension's self": (
        "sandbox:private_api", "import warnings\nclass Helper:\n    _secret = None\n"
        "    def get(self):\n        return [self._secret for self in [warnings.catch_warnings()]]  # <-\n"),
    "a method that rebinds self": (
        "sandbox:private_api", "import warnings\nclass Helper:\n    _secret = None\n"
        "    def get(self):\n        self = warnings.catch_warnings()\n        return self._secret  # <-\n"),
    "a subclass of a library class": (
        "sandbox:private_api", "import warnings\nclass W(warnings.catch_warnings):\n"
        "    def __init__(self):\n        super().__init__()\n        if False:\n            self._secret = None\n"
        "    def get(self):\n        return self._secret  # <-\n"),
    "typing.ForwardRef's string eval, named": (
        "sandbox:forbidden_api", "import typing\nref = typing.get_args(typing.List['1'])[0]\n"
        "value = ref._evaluate({}, {}, frozenset())  # <-\n"),
    "a plain class's method called with a library object as self": (
        "sandbox:forbidden_api", "import warnings\nclass P:\n    def __init__(self):\n        self._module = None\n"
        "    def get(self):\n        return self._module  # <-\n\nm = P.get(warnings.catch_warnings())\n"),
    "a staticmethod's parameter named cls": (
        "sandbox:private_api", "class P:\n    _cache = None\n\n    @staticmethod\n"
        "    def get(cls):\n        return cls._cache  # <-\n"),
    "warnings' line reader on an object the policy cannot follow": (
        "sandbox:forbidden_api", "def lines(mod):\n    return mod.formatwarning('m', UserWarning, '/etc/hosts', 1)  # <-\n"),
    "torch.distributed.pipelining": ("sandbox:forbidden_api",
                                     "from torch.distributed.pipelining.schedules import PipelineScheduleMulti  # <-\n"),
    "torch.xpu's pluggable allocator loads a library": (
        "sandbox:forbidden_api", "import torch\nalloc = torch.xpu.XPUPluggableAllocator('lib.so', 'a', 'b')  # <-\n"),
    "np.lib.add_newdoc imports by name": ("sandbox:forbidden_api",
                                          "import numpy as np\nnp.lib.add_newdoc('this', 'x', 'doc')  # <-\n"),
    "torch.set_default_tensor_type imports by name": (
        "sandbox:forbidden_api", "import torch\ntorch.set_default_tensor_type('this.s')  # <-\n"),
    "torch.distributed.debug": ("sandbox:forbidden_api", "from torch.distributed.debug import start_debug_server  # <-\n"),
    "torch.distributed.nn.jit": ("sandbox:forbidden_api", "import torch.distributed.nn.jit.instantiator  # <-\n"),
    "a __main__ module runs a program on import": ("sandbox:import", "import torch.utils.model_dump.__main__  # <-\n"),
    "builtins under a short name": ("sandbox:import", "from enum import bltns  # <-\n"),
    "builtins module, open": ("sandbox:forbidden_builtin", "import enum\nB = enum.bltns\ntext = B.open('/etc/hosts')  # <-\n"),
    "builtins module, getattr": ("sandbox:dynamic_attr", "import enum\nget = enum.bltns.getattr  # <-\n"),
    # functions and objects of modules outside the allowlist, re-exported by allowed ones
    "logging.Logger in torch": ("sandbox:import", "import torch\ntorch.distributed.log.info('x')  # <-\n"),
    "inspect.signature in torch": ("sandbox:import", "from torch.cuda.memory import signature  # <-\n"),
    "urllib in torch": ("sandbox:import", "from torch.distributed.rendezvous import urlparse  # <-\n"),
    "_thread in functools": ("sandbox:import", "import functools\nlock = functools.RLock()  # <-\n"),
    "a container of copyreg functions": ("sandbox:import", "import copy\ncopy.dispatch_table.update({})  # <-\n"),
    # collectives that unpickle what another rank sends (a red team ran code in rank 0 through them)
    "broadcast_object_list": ("sandbox:forbidden_api", "import torch.distributed as dist\n"
                              "box = [None]\ndist.broadcast_object_list(box, src=1)  # <-\n"),
    "all_gather_object from c10d": ("sandbox:forbidden_api", "from torch.distributed.distributed_c10d import "
                                    "all_gather_object  # <-\n"),
    "recv_object_list": ("sandbox:forbidden_api", "import torch\ntorch.distributed.recv_object_list([None], 1)  # <-\n"),
    "rpc": ("sandbox:forbidden_api", "import torch.distributed.rpc as rpc  # <-\n"),
    # forbidden APIs re-exported under paths that are not on the list
    "get_type_hints in torch": ("sandbox:forbidden_api",
                                "import torch\nhints = torch.utils.checkpoint.get_type_hints(print)  # <-\n"),
    "ForwardRef in torch": ("sandbox:forbidden_api", "from torch.utils.checkpoint import ForwardRef  # <-\n"),
    "update_wrapper in torch": ("sandbox:forbidden_api",
                                "import torch\ntorch.distributions.utils.update_wrapper(print, len)  # <-\n"),
    "FileStore in torch": ("sandbox:forbidden_api",
                           "import torch.distributed.rendezvous as r\nstore = r.FileStore('/tmp/x', 1)  # <-\n"),
    "torch.overrides function in autograd": ("sandbox:forbidden_api",
                                             "import torch\nhook = torch.autograd.handle_torch_function  # <-\n"),
    # attribute access by computed names
    "methodcaller": ("sandbox:dynamic_attr", "import typing\ncall = typing.operator.methodcaller('step')  # <-\n"),
    "attrgetter re-exported by torch": ("sandbox:dynamic_attr",
                                        "from torch.autograd.profiler_util import attrgetter  # <-\n"),
    "format string from a variable": ("sandbox:dynamic_attr", "def leak(f, u):\n"
                                                              "    fmt = '{0.' + u + 'doc' + u + '}'\n"
                                                              "    return fmt.format(f)  # <-\n"),
    "str.format with a built string": ("sandbox:dynamic_attr", "def leak(f, name):\n"
                                                               "    return str.format('{0.' + name + '}', f)  # <-\n"),
    "format_map from getattr": ("sandbox:dynamic_attr", "def leak(fmt, f):\n"
                                                        "    return getattr(fmt, 'format_map')({'f': f})  # <-\n"),
    "str.format passed around": ("sandbox:dynamic_attr", "import functools\n"
                                                         "read = functools.partial(str.format, '{0}')  # <-\n"),
    # modules rewritten through the enum machinery
    "_convert_ through cls": ("sandbox:private_api", "import enum\nclass E(enum.IntEnum):\n    A = 1\n"
                                                     "    @classmethod\n    def patch(cls):\n"
                                                     "        cls._convert_('relu', 'torch.nn.functional', bool)  # <-\n"),
    "_convert_ through type()": ("sandbox:private_api", "import enum\nclass E(enum.IntEnum):\n    A = 1\n"
                                                        "type(E.A)._convert_('relu', 'torch', bool)  # <-\n"),
    "global_enum": ("sandbox:forbidden_api", "import enum\nE = enum.Enum('E', {'relu': 1}, module='torch')\n"
                                             "enum.global_enum(E)  # <-\n"),
    "a class rewritten by a configured decorator": ("sandbox:monkeypatch", "import dataclasses\nimport torch\n"
                                                   "dataclasses.dataclass(eq=False)(torch.Tensor)  # <-\n"),
    # checks by name follow the object, whatever path reaches it
    "torch.save through an alias": ("sandbox:torch_save_path", "import torch.nn.functional as F\n"
                                                               "def train(ctx):\n"
                                                               "    F.torch.save({}, '/tmp/x.pt')  # <-\n"),
    "compile options through an alias": ("sandbox:forbidden_api", "import torch.nn.functional as F\n"
                                                                  "m = F.torch.compile(print, options={})  # <-\n"),
    "a module reached as a value": ("sandbox:module_value", "import typing\nprint(typing.functools)  # <-\n"),
    # class patterns read attributes (issue 21)
    "pattern keyword, dunder": ("sandbox:dunder", "def f(g):\n    match g:\n"
                                                  "        case object(__builtins__=b):  # <-\n            return b\n"),
    "pattern keyword, nested": ("sandbox:dunder", "def f(g):\n    match g:\n        case object(__wrapped__=object("
                                                  "__globals__=n)):  # <-\n            return n\n"),
    "pattern keyword in an alternative": ("sandbox:introspection", "def f(g):\n    match g:\n"
                                                                  "        case int() | object(gi_frame=fr):  # <-\n"
                                                                  "            return fr\n"),
    "pattern keyword, frame": ("sandbox:introspection", "def f(e):\n    match e:\n"
                                                        "        case object(tb_frame=fr):  # <-\n            return fr\n"),
    "pattern keyword, private torch": ("sandbox:private_api", "import torch\nmatch torch.Tensor:\n"
                                                              "    case object(_make_subclass=m):  # <-\n        pass\n"),
    "pattern keyword, metaclass private": ("sandbox:private_api", "def f(e):\n    match e:\n"
                                                                  "        case object(_convert_=c):  # <-\n"
                                                                  "            return c\n"),
    "pattern keyword, module name": ("sandbox:import", "def f(ctx):\n    match ctx:\n"
                                                       "        case object(sys=s):  # <-\n            return s\n"),
    "pattern keyword, context by hand": ("sandbox:dunder", "def f(cm):\n    match cm:\n"
                                                           "        case object(__enter__=enter):  # <-\n"
                                                           "            enter()\n"),
    "pattern positional on a class": ("sandbox:dynamic_attr", "import dataclasses\n@dataclasses.dataclass\n"
                                                              "class P:\n    x: int\ndef f(p):\n    match p:\n"
                                                              "        case P(x):  # <-\n            return x\n"),
    "pattern capture, then a patch": ("sandbox:monkeypatch", "import torch\nmatch torch.Tensor:\n    case t:\n"
                                                             "        t.double = print  # <-\n"),
    "pattern keyword capture, then a patch": ("sandbox:monkeypatch", "import torch\nclass H:\n    kind = torch.Tensor\n"
                                                                     "match H:\n    case object(kind=k):\n"
                                                                     "        k.double = print  # <-\n"),
    # stores into objects the policy cannot resolve (issue 21)
    "a method replaced through a parameter": ("sandbox:monkeypatch", "def patch(cls, f):\n    cls.forward = f  # <-\n"),
    "setattr through a parameter": ("sandbox:monkeypatch", "def patch(cls, f):\n    setattr(cls, 'item', f)  # <-\n"),
    "augmented through a call's result": ("sandbox:monkeypatch", "def patch(get):\n    get().float += 1  # <-\n"),
    "deleted through an item": ("sandbox:monkeypatch", "def patch(classes):\n    del classes[0].backward  # <-\n"),
    "__call__ replaced through a parameter": ("sandbox:monkeypatch", "def patch(module_cls, f):\n"
                                                                     "    module_cls.__call__ = f  # <-\n"),
    "an optimizer's step replaced through a parameter": ("sandbox:monkeypatch", "def patch(opt_cls):\n"
                                                                                "    opt_cls.step = print  # <-\n"),
    "self outside __init__": ("sandbox:monkeypatch", "class Setter:\n    def put(self, f):\n"
                                                     "        self.double = f  # <-\n"),
    "self rebound in __init__": ("sandbox:monkeypatch", "import torch\nclass K:\n    def __init__(self, f):\n"
                                                        "        self = torch.Tensor\n        self.double = f  # <-\n"),
    "__init__ passed around": ("sandbox:dunder", "import functools\nclass K:\n    def __init__(self):\n"
                                                 "        pass\nsetup = functools.partial(K.__init__)  # <-\n"),
    "__init__ through super(C, C)": ("sandbox:dunder", "import torch\nclass B:\n    def __init__(self):\n"
                                                       "        self.double = print\nclass K(B):\n    pass\n"
                                                       "super(K, K).__init__(torch.Tensor)  # <-\n"),
    "__init__ through a bound method's class": ("sandbox:dunder", "import torch\nclass K:\n    def __init__(self):\n"
                                                                  "        self.double = print\n"
                                                                  "type(K()).__init__(torch.Tensor)  # <-\n"),
    # modes and contexts entered by hand (issue 21)
    "mode factory imported": ("sandbox:forbidden_api",
                              "from torch.utils.checkpoint import create_selective_checkpoint_contexts  # <-\n"),
    "mode class re-exported by checkpoint": ("sandbox:forbidden_api", "import torch.utils.checkpoint as c\n"
                                                                      "class Spy(c.TorchDispatchMode):  # <-\n    pass\n"),
    "mode class re-exported by autograd.graph": ("sandbox:forbidden_api",
                                                 "from torch.autograd.graph import TorchDispatchMode  # <-\n"),
    "a test mode re-exported by checkpoint": ("sandbox:forbidden_api",
                                              "import torch\nmode = torch.utils.checkpoint.LoggingTensorMode()  # <-\n"),
    "flop counter mode": ("sandbox:forbidden_api", "import torch\ncounter = torch.utils.flop_counter.FlopCounterMode()  # <-\n"),
    "module tracker hooks": ("sandbox:forbidden_api", "from torch.utils.module_tracker import ModuleTracker  # <-\n"),
    "comm debug mode": ("sandbox:forbidden_api", "from torch.distributed.tensor.debug import CommDebugMode  # <-\n"),
    "a module handed out by a function": ("sandbox:forbidden_api",
                                          "import torch\ncpu = torch.get_device_module('cpu')  # <-\n"),
    "saved-tensor hooks entered by hand": ("sandbox:dunder", "import torch\n"
                                                             "hooks = torch.autograd.graph.saved_tensors_hooks(id, id)\n"
                                                             "hooks.__enter__()  # <-\n"),
    "no_grad entered by hand": ("sandbox:dunder", "import torch\ntorch.no_grad().__enter__()  # <-\n"),
    "a context left by hand": ("sandbox:dunder", "import torch\ntorch.enable_grad().__exit__(None, None, None)  # <-\n"),
    "enter reached through an alias": ("sandbox:dunder", "import torch\nenter = torch.autocast('cpu').__enter__  # <-\n"),
    "super().__enter__ outside __enter__": ("sandbox:dunder", "import torch\nclass A(torch.autocast):\n"
                                                              "    def go(self):\n        super().__enter__()  # <-\n"),
    # objects the policy cannot resolve keep the name backstop
    "module name on an unknown object": ("sandbox:import", "def train(ctx):\n    ctx.sys.exit()  # <-\n"),
}

# Everyday code: none of these may be rejected.
HONEST = {
    "private names the bundle defines, on self": (
        "import torch\nclass Block(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self._cache = None\n\n    def reset(self):\n        self._cache = None\n        return self._cache\n"),
    "private names of a plain class's own, through a subclass of it": (
        "import torch\nclass Base(torch.nn.Module):\n    def _reset(self):\n        return None\n"
        "class Block(Base):\n    def forward(self, x):\n        self._reset()\n        return x\n"),
    "what torch.compile wraps": "import torch\ncompiled = torch.compile(torch.nn.Linear(2, 2))\n"
                                "weights = compiled._orig_mod.state_dict()\n",
    "compile": "import torch\nmodel = torch.compile(torch.nn.Linear(2, 2), mode='max-autotune', fullgraph=True)\n",
    "attention": "from torch import nn\nattn = nn.MultiheadAttention(64, 4, batch_first=True)\n",
    "one cycle": "import torch\nfrom torch.optim.lr_scheduler import OneCycleLR\n"
                 "opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())\n"
                 "sched = OneCycleLR(opt, max_lr=1e-3, total_steps=100)\n",
    "dataclasses": "import dataclasses\n@dataclasses.dataclass\nclass C:\n    x: int = dataclasses.field(default=1)\n"
                   "c = dataclasses.replace(C(), x=2)\n",
    "typing": "from typing import Callable, NamedTuple, Optional, Protocol\nimport typing\nT = typing.TypeVar('T')\n",
    "functools": "import functools\nimport torch.nn.functional as F\nact = functools.partial(F.gelu, approximate='tanh')\n"
                 "total = functools.reduce(lambda a, b: a + b, [1, 2])\n",
    "math": "import math\nscale = math.sqrt(2) * math.pi / math.log(10)\n",
    "ddp collectives": "import torch.distributed as dist\nimport torch\ng = torch.zeros(3)\n"
                       "dist.all_reduce(g, op=dist.ReduceOp.SUM)\ndist.broadcast(g, src=0)\ndist.barrier()\n",
    "einops": "import einops\nfrom einops.layers.torch import Rearrange\nsplit = Rearrange('b t (h d) -> b h t d', h=4)\n",
    "functional aliases": "import torch.nn.functional as F\nimport torch.nn.functional as Fn\nce = F.cross_entropy\n"
                          "y = Fn.scaled_dot_product_attention\n",
    "sdp flags": "import torch\nwith torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False):\n    pass\n"
                 "torch.backends.cuda.enable_flash_sdp(True)\ntorch.backends.cuda.matmul.allow_tf32 = True\n"
                 "from torch.nn.attention import SDPBackend, sdpa_kernel\nctx = sdpa_kernel(SDPBackend.MATH)\n",
    "warnings": "import warnings\nwarnings.warn('slow path', stacklevel=2)\nwarnings.filterwarnings('ignore')\n",
    "numpy random": "import numpy as np\nrng = np.random.default_rng(0)\nx = np.random.Generator(np.random.PCG64(1))\n",
    "standard helpers": "import collections, copy, itertools, random, re, string, time, enum, abc, numbers\n"
                        "d = collections.OrderedDict()\nq = collections.deque(maxlen=3)\nc = copy.deepcopy([1])\n"
                        "r = random.Random(0)\nt = time.perf_counter()\np = re.compile('x')\ns = string.ascii_letters\n"
                        "e = enum.auto\nb = abc.ABC\nn = numbers.Number\ni = itertools.islice([], 1)\n",
    "constant format strings": "LINE = 'step {} loss {:.3f}'\nx = LINE.format(1, 2.0)\ny = '{:>4}'.format(3)\n"
                               "z = str.format('{}', 1)\n",
    "own private names": "class Cache:\n    def __init__(self):\n        self._store = {}\n"
                         "    def _get(self, k):\n        return self._store.get(k)\n",
    "enum with hooks": "import enum\nclass Mode(enum.Enum):\n    A = 1\n    @classmethod\n"
                       "    def _missing_(cls, value):\n        return cls.A\nm = Mode(3).name\n",
    "foreach": "import torch\ntorch._foreach_mul_([torch.zeros(2)], 0.5)\n",
    "match statements": "def kind(x, point):\n    match x:\n        case int(n) | float(n):\n            return n\n"
                        "        case {'a': [1, *rest], **others}:\n            return rest, others\n"
                        "        case (first, second):\n            return first\n        case str() as s:\n"
                        "            return s\n    match point:\n        case object(x=0, y=py):\n            return py\n",
    "own objects keep their names": "import torch\nfrom torch import nn\nclass Block(nn.Module):\n"
                                    "    def __init__(self, d):\n        super().__init__()\n"
                                    "        self.norm = nn.LayerNorm(d)\n        self.split = 2\n"
                                    "        self.head = nn.Linear(d, d)\n        self.step = 0\n"
                                    "class Tied(Block):\n    def __init__(self, d):\n        super(Tied, self).__init__(d)\n"
                                    "        Block.__init__(self, d)\n        nn.Module.__init__(self)\n"
                                    "        setattr(self, 'forward', self.norm)\n"
                                    "def build(model):\n    model.head.weight = model.norm.weight\n"
                                    "    for p in model.parameters():\n        p.grad = None\n"
                                    "        p.requires_grad = False\n        p.data = p.data * 2\n"
                                    "    model.training = False\n    model.head.lr_scale = 0.5\n"
                                    "Tied.forward = Block.forward\ndef helper():\n    pass\nhelper.step = 1\n",
    "own context managers": "import torch\nclass Timer:\n    def __enter__(self):\n        return self\n"
                            "    def __exit__(self, *exc):\n        return None\nclass Quiet(Timer):\n"
                            "    def __enter__(self):\n        return super().__enter__()\n"
                            "    def __exit__(self, *exc):\n        return super().__exit__(*exc)\n"
                            "with Quiet(), torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):\n    pass\n"
                            "with torch.autograd.graph.save_on_cpu():\n    pass\n",
    "checkpoint and amp": "import torch\nfrom torch.utils.checkpoint import checkpoint\n"
                          "scaler = torch.amp.GradScaler()\nwith torch.autocast('cpu', dtype=torch.bfloat16):\n"
                          "    pass\n",
}


def check(source: str) -> list[tuple[str, int]]:
    return [(r.rule, r.line) for r in inspect_source("training.py", textwrap.dedent(source), MODULES)]


def marker(source: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if line.rstrip().endswith("# <-"))


@pytest.mark.parametrize("name", BUNDLES)
def test_attack_bundle_is_rejected_at_its_line(name: str) -> None:
    directory = ATTACKS / name
    marked = [(path.name, marker(path.read_text())) for path in sorted(directory.glob("*.py"))
              if "# <-" in path.read_text()]
    found = [(r.rule, r.file, r.line) for r in inspect(load_bundle(directory))]
    assert [(BUNDLES[name], *where) for where in marked] == [f for f in found if f[1:] in marked], found


def test_every_node_type_is_checked_or_declared_harmless() -> None:
    """A node type the checker neither visits nor lists as harmless (a newer Python's syntax) forces a decision."""
    import _ast
    import ast

    classes = [value for value in vars(_ast).values() if isinstance(value, type) and issubclass(value, ast.AST)]
    concrete = {cls.__name__ for cls in classes if not any(other is not cls and issubclass(other, cls)
                                                           for other in classes)}
    visited = {name.removeprefix("visit_") for name in vars(Checker) if name.startswith("visit_")}
    assert concrete - visited - UNCHECKED_NODES == set()
    assert visited & UNCHECKED_NODES == set()  # one place decides each node type
    assert (visited | UNCHECKED_NODES) - concrete == set()  # and none is stale


def test_a_node_type_the_policy_does_not_know_fails_closed(monkeypatch) -> None:
    monkeypatch.setattr(rules, "KNOWN_NODES", rules.KNOWN_NODES - {"While"})
    assert check("while True:\n    break\n") == [("sandbox:syntax", 1)]


def test_every_attack_bundle_is_covered() -> None:
    assert {p.name for p in ATTACKS.iterdir() if p.is_dir()} == set(BUNDLES) | {"split_prior"}


def test_a_prior_split_over_files_is_counted_as_one_bundle() -> None:
    directory = ATTACKS / "split_prior"
    modules = {path.stem for path in directory.glob("*.py")}
    for path in directory.glob("*.py"):  # each file alone is under the limit
        assert inspect_source(path.name, path.read_text(), modules) == [], path.name
    found = [(r.rule, r.file) for r in inspect(load_bundle(directory))]
    assert found == [("sandbox:embedded_data", "prior_b.py")]


def test_strings_split_over_files_are_counted_as_one_bundle() -> None:
    half = f"TEXT = {'x' * (MAX_STRING_BYTES // 2 + 1024)!r}\n"
    numbers = f"TABLE = {list(range(MAX_NUMBERS // 2 + 10))}\n"
    files = {"architecture.py": "def build_model(ctx):\n    return None\n", "training.py": "def train(ctx):\n    pass\n",
             "text_a.py": half, "text_b.py": half, "table_a.py": numbers, "table_b.py": numbers}
    assert all(check(source) == [] for source in files.values())
    found = [(r.rule, r.file) for r in inspect(check_contract({k: v.encode() for k, v in files.items()}))]
    assert found == [("sandbox:embedded_data", "table_b.py"), ("sandbox:embedded_data", "text_b.py")]


def test_names_count_as_embedded_text() -> None:
    """A function's `__name__` and an Enum member's `.name` read back as strings: long names carry data too."""
    names = [[f"p{part}_{i}_{'ab' * 2000}" for i in range(9)] for part in range(2)]
    files = {"architecture.py": "def build_model(ctx):\n    return None\n",
             **{f"names_{part}.py": "".join(f"def {name}():\n    pass\n" for name in names[part]) for part in range(2)},
             "training.py": f"import names_0\ndef train(ctx):\n    prior = names_0.{names[0][0]}.__name__\n"}
    modules = {path.removesuffix(".py") for path in files}
    assert all(inspect_source(path, source, modules) == [] for path, source in files.items())
    found = [(r.rule, r.file) for r in inspect(check_contract({k: v.encode() for k, v in files.items()}))]
    assert found == [("sandbox:embedded_data", "names_1.py")]


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_is_rejected_at_its_line(name: str) -> None:
    rule, source = VARIANTS[name]
    found = check(source)
    assert (rule, marker(source)) in found, found


@pytest.mark.parametrize("name", HONEST)
def test_everyday_code_passes(name: str) -> None:
    assert check(HONEST[name]) == []


def test_findings_name_what_the_alias_really_is() -> None:
    [reason] = inspect_source("training.py", "import enum\nenum.bltns.exec('import os')\n", MODULES)
    assert "builtins.exec" in reason.message and "enum.bltns.exec" in reason.message
