"""The static sandbox policy: every rule catches its attack at the right line, and its legitimate twin passes."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from prism_ray.intake.bundle import Bundle, check_contract, load_bundle
from prism_ray.policy import MAX_NUMBERS, MAX_STRING_BYTES, inspect, inspect_source, module_names

HERE = Path(__file__).resolve().parent
CASES = HERE / "sandbox_cases"
EXAMPLES = HERE.parent / "examples"
MODULES = {"architecture", "training", "helpers"}

ARCHITECTURE = '''
import torch
from torch import nn


def build_model(ctx):
    return nn.Linear(4, 4)
'''


def check(source: str) -> list[tuple[str, int]]:
    return [(r.rule, r.line) for r in inspect_source("training.py", textwrap.dedent(source), MODULES)]


def marked(source: str) -> tuple[str, int]:
    """The source and the line carrying the `# <-` marker."""
    source = textwrap.dedent(source)
    return source, next(i for i, line in enumerate(source.splitlines(), 1) if line.rstrip().endswith("# <-"))


def bundle(**files: str) -> Bundle:
    files.setdefault("architecture.py", ARCHITECTURE)
    files.setdefault("training.py", "def train(ctx):\n    pass\n")
    return check_contract({name: textwrap.dedent(text).encode() for name, text in files.items()})


# (rule, attack with the offending line marked `# <-`, legitimate twin)
RULES = {
    "import os": ("sandbox:import", """
        import os  # <-
        """, """
        import math
        import collections.abc
        from typing import Optional
        """),
    "import builtins": ("sandbox:import", """
        import torch
        import builtins  # <-
        """, """
        import torch.nn.functional as F
        import numpy as np
        import einops
        """),
    "module reached through another": ("sandbox:import", """
        import warnings
        modules = warnings.sys.modules  # <-
        """, """
        import warnings
        warnings.warn("slow path")
        """),
    "relative import above the bundle": ("sandbox:import", """
        from .. import secrets  # <-
        """, """
        from . import helpers
        from .helpers import scale
        """),
    "star import": ("sandbox:import", """
        from torch import *  # <-
        """, """
        from torch import nn, optim
        """),
    "missing bundle file": ("sandbox:import", """
        import utilities  # <-
        """, """
        import helpers
        """),
    "__import__": ("sandbox:forbidden_builtin", """
        os = __import__("os")  # <-
        """, """
        import math
        root = math.sqrt(2.0)
        """),
    "exec": ("sandbox:forbidden_builtin", """
        def train(ctx):
            exec("import os")  # <-
        """, """
        def train(ctx):
            model = ctx.build_model()
            model.eval()
        """),
    "open": ("sandbox:forbidden_builtin", """
        def train(ctx):
            rows = open("/data/val.jsonl").read()  # <-
        """, """
        import torch
        def forward(self, input):
            return torch.relu(input)
        """),
    "eval aliased": ("sandbox:forbidden_builtin", """
        run = eval  # <-
        """, """
        def compile(source):
            return source
        compiled = compile("x")
        """),
    "builtin shadowed only on paper": ("sandbox:forbidden_builtin", """
        if False:
            open = print
        data = open("/data/val.jsonl")  # <-
        """, """
        from torch import compile
        def build(model):
            return compile(model)
        """),
    "three-argument type": ("sandbox:forbidden_builtin", """
        Hook = type("Hook", (), {})  # <-
        """, """
        def describe(x):
            return type(x).__name__
        """),
    "dunder walk": ("sandbox:dunder", """
        classes = ().__class__.__bases__[0].__subclasses__()  # <-
        """, """
        import torch.nn as nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.name = type(self).__qualname__
        """),
    "hook definition": ("sandbox:dunder", """
        class Sneaky:
            def __torch_function__(self, func, types, args=(), kwargs=None):  # <-
                return None
        """, """
        class Pair:
            def __init__(self, a, b):
                self.a, self.b = a, b
            def __add__(self, other):
                return Pair(self.a + other.a, self.b + other.b)
            def __len__(self):
                return 2
        """),
    "dunder name in a string": ("sandbox:dunder", """
        names = {"__array_interface__": None}  # <-
        """, """
        if __name__ == "__main__":
            print("ok")
        """),
    "dunder in a format string": ("sandbox:dunder", """
        leak = "{0.__class__.__init__}".format(1)  # <-
        """, """
        label = "{0.real:.3f} in {1}".format(1.5, "__init__.py")
        """),
    "class attribute spoofing": ("sandbox:dunder", """
        import torch
        class Fake:
            __class__ = torch.Tensor  # <-
        """, """
        class Vec:
            __slots__ = ("x",)
            __hash__ = None
        """),
    "getattr with a computed name": ("sandbox:dynamic_attr", """
        import torch
        load = getattr(torch, "lo" + "ad")  # <-
        """, """
        def layers(config):
            return getattr(config, "n_layer", 4)
        """),
    "getattr of a dunder": ("sandbox:dynamic_attr", """
        cls = getattr((), "__class__")  # <-
        """, """
        def ready(model):
            return hasattr(model, "forward")
        """),
    "getattr passed around": ("sandbox:dynamic_attr", """
        import functools
        walk = functools.partial(getattr, ())  # <-
        """, """
        import functools
        import torch.nn.functional as F
        act = functools.partial(F.gelu, approximate="tanh")
        """),
    "patched loss": ("sandbox:monkeypatch", """
        import torch
        import torch.nn.functional as F
        F.cross_entropy = lambda *a, **k: torch.tensor(0.)  # <-
        """, """
        import torch.nn.functional as F
        cross_entropy = F.cross_entropy
        class Head:
            def __init__(self):
                self.loss = F.cross_entropy
        """),
    "patched backward": ("sandbox:monkeypatch", """
        import torch
        def train(ctx):
            torch.Tensor.backward = lambda self: None  # <-
        """, """
        import torch
        class Gate(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.scale = 2.0
                return x * ctx.scale
        """),
    "setattr on an import": ("sandbox:monkeypatch", """
        import torch.nn.functional as F
        setattr(F, "cross_entropy", print)  # <-
        """, """
        class Config:
            pass
        config = Config()
        setattr(config, "width", 128)
        """),
    "patch through an alias": ("sandbox:monkeypatch", """
        import torch
        T = torch
        T.manual_seed = print  # <-
        """, """
        import torch
        T = torch
        T.manual_seed(0)
        """),
    "patch a submodule through an alias": ("sandbox:monkeypatch", """
        import torch
        x = torch.nn
        x.functional = None  # <-
        """, """
        import torch
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        """),
    "del on an import": ("sandbox:monkeypatch", """
        import torch
        del torch.nn.functional.cross_entropy  # <-
        """, """
        import torch
        cache = {"a": torch.zeros(1)}
        del cache["a"]
        """),
    "patch through type()": ("sandbox:monkeypatch", """
        import torch
        type(torch.zeros(1)).add = print  # <-
        """, """
        import torch
        t = torch.zeros(1)
        t.tag = "activations"
        """),
    "patch in a loop": ("sandbox:monkeypatch", """
        from torch import nn
        for cls in (nn.Linear, nn.Embedding):
            cls.forward = print  # <-
        """, """
        from torch import nn
        layers = [nn.Linear(2, 2), nn.Linear(2, 2)]
        for layer in layers:
            layer.weight.requires_grad = False
        """),
    "patch the interface": ("sandbox:monkeypatch", """
        from prism_challenge.evaluator.interface import PrismContext
        PrismContext.iter_train_batches = print  # <-
        """, """
        from prism_challenge.evaluator.interface import PrismContext
        def train(ctx: PrismContext) -> None:
            ctx.build_model()
        """),
    "decorate an imported class": ("sandbox:monkeypatch", """
        import dataclasses
        import torch
        dataclasses.dataclass(torch.Tensor)  # <-
        """, """
        from dataclasses import dataclass
        @dataclass(frozen=True)
        class Config:
            width: int = 128
        """),
    "from_file": ("sandbox:forbidden_api", """
        import torch
        data = torch.from_file("/data/train.bin", size=10)  # <-
        """, """
        import torch
        data = torch.zeros(10)
        """),
    "UntypedStorage.from_file": ("sandbox:forbidden_api", """
        import torch
        data = torch.UntypedStorage.from_file("/data/train.bin", False, 10)  # <-
        """, """
        import torch
        storage = torch.zeros(4).untyped_storage()
        """),
    "tofile": ("sandbox:forbidden_api", """
        import numpy as np
        np.zeros(3).tofile("/tmp/leak")  # <-
        """, """
        import numpy as np
        window = np.lib.stride_tricks.sliding_window_view(np.arange(8), 3)
        """),
    "np.load": ("sandbox:forbidden_api", """
        import numpy as np
        table = np.load("/data/table.npy")  # <-
        """, """
        import numpy as np
        table = np.linspace(0.0, 1.0, 8)
        """),
    "torch.load": ("sandbox:forbidden_api", """
        import torch
        def train(ctx):
            state = torch.load("/data/weights.pt")  # <-
        """, """
        import torch
        def train(ctx):
            model = ctx.build_model()
            model.load_state_dict(model.state_dict())
        """),
    "from torch import load": ("sandbox:forbidden_api", """
        from torch import load  # <-
        """, """
        from torch import tensor
        """),
    "getattr to torch.load": ("sandbox:forbidden_api", """
        import torch
        load = getattr(torch, "load")  # <-
        """, """
        import torch
        zeros = getattr(torch, "zeros")
        """),
    "load_library": ("sandbox:forbidden_api", """
        import torch
        torch.ops.load_library("/tmp/evil.so")  # <-
        """, """
        import torch
        y = torch.ops.aten.relu(torch.zeros(2))
        """),
    "torch.hub": ("sandbox:forbidden_api", """
        import torch
        model = torch.hub.load("someone/repo", "gpt2")  # <-
        """, """
        import torch
        model = torch.compile(torch.nn.Linear(2, 2), mode="max-autotune")
        """),
    "torch.jit": ("sandbox:forbidden_api", """
        import torch
        @torch.jit.script  # <-
        def f(x):
            return x
        """, """
        import torch
        @torch.no_grad()
        def f(x):
            return x
        """),
    "annotations evaluated": ("sandbox:forbidden_api", """
        import typing
        hints = typing.get_type_hints(print)  # <-
        """, """
        from typing import Any, Optional
        def f(x: Optional[int] = None) -> Any:
            return x
        """),
    "attribute walk from strings": ("sandbox:forbidden_api", """
        import string
        field = string.Formatter().get_field("0.real", (1,), {})  # <-
        """, """
        import string
        letters = string.ascii_letters
        """),
    "compiler options": ("sandbox:forbidden_api", """
        import torch
        model = torch.compile(torch.nn.Linear(2, 2), options={"cpp.cxx": ("sh",)})  # <-
        """, """
        import torch
        model = torch.compile(torch.nn.Linear(2, 2), fullgraph=True)
        """),
    "compiler backend function": ("sandbox:forbidden_api", """
        import torch
        def backend(graph_module, example_inputs):
            return graph_module.forward
        model = torch.compile(torch.nn.Linear(2, 2), backend=backend)  # <-
        """, """
        import torch
        model = torch.compile(torch.nn.Linear(2, 2), backend="inductor", dynamic=False)
        """),
    "code generation from strings": ("sandbox:forbidden_api", """
        import torch
        graph = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))  # <-
        """, """
        import torch
        grads = torch.func.grad(lambda x: (x * x).sum())(torch.ones(2))
        """),
    "source lines of any file": ("sandbox:forbidden_api", """
        import warnings
        text = warnings.formatwarning("x", UserWarning, "/etc/passwd", 1)  # <-
        """, """
        import warnings
        warnings.filterwarnings("ignore", category=UserWarning)
        """),
    "raw memory view": ("sandbox:forbidden_api", """
        import numpy as np
        view = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(10**6,))  # <-
        """, """
        import numpy as np
        view = np.zeros((2, 3)).reshape(3, 2)
        """),
    "global module hooks": ("sandbox:forbidden_api", """
        import torch
        torch.nn.modules.module.register_module_forward_hook(print)  # <-
        """, """
        import torch
        layer = torch.nn.Linear(2, 2)
        handle = layer.register_forward_hook(lambda module, inputs, output: None)
        """),
    "torch.save outside artifacts": ("sandbox:torch_save_path", """
        import torch
        def train(ctx):
            torch.save(ctx.build_model(), "/tmp/x.pt")  # <-
        """, """
        import torch
        def train(ctx):
            model = ctx.build_model()
            torch.save(model.state_dict(), f"{ctx.artifacts_dir}/model.pt")
            torch.save(model.state_dict(), ctx.artifacts_dir + "/m.pt")
            path = f"{ctx.artifacts_dir}/step_{1}.pt"
            torch.save(model.state_dict(), path)
        """),
    "torch.save climbing out": ("sandbox:torch_save_path", """
        import torch
        def train(ctx):
            torch.save({}, ctx.artifacts_dir + "/../../x.pt")  # <-
        """, """
        from torch import save
        def train(ctx):
            save({}, f=str(ctx.artifacts_dir) + "/final.pt")
        """),
    "torch.save passed around": ("sandbox:torch_save_path", """
        import torch
        writers = [torch.save]  # <-
        """, """
        import torch
        def train(ctx):
            torch.save({"step": 1}, f"{ctx.artifacts_dir}/state.pt")
        """),
    "module as a value": ("sandbox:module_value", """
        import torch.nn.functional as F
        def patch(module):
            module.cross_entropy = print
        patch(F)  # <-
        """, """
        import torch.nn.functional as F
        import torch
        T = torch
        gelu = F.gelu
        """),
    "module kept on an object": ("sandbox:module_value", """
        import torch
        class Holder:
            def __init__(self):
                self.lib = torch  # <-
        """, """
        import torch
        class Holder:
            def __init__(self):
                self.dtype = torch.bfloat16
        """),
    "private torch internals": ("sandbox:private_api", """
        import torch
        torch._C._set_grad_enabled(False)  # <-
        """, """
        import torch
        params = [torch.zeros(2)]
        torch._foreach_mul_(params, 0.9)
        """),
    "private submodule import": ("sandbox:private_api", """
        import torch._dynamo  # <-
        """, """
        import torch.utils.checkpoint
        """),
    "frame walk": ("sandbox:introspection", """
        def train(ctx):
            stream = ctx.iter_train_batches(ctx.build_model())
            frame = stream.gi_frame  # <-
        """, """
        def train(ctx):
            stream = ctx.iter_train_batches(ctx.build_model())
            first = next(stream)
        """),
    "numbers": ("sandbox:embedded_data", f"""
        import torch
        TABLE = torch.tensor({list(range(MAX_NUMBERS + 5))})  # <-
        """, f"""
        import torch
        TABLE = torch.tensor({list(range(1000))})
        """),
    "big integer": ("sandbox:embedded_data", f"""
        BLOB = 0x{"f" * (MAX_NUMBERS * 16 + 64)}  # <-
        """, """
        SEED = 0xDEADBEEF
        """),
    "strings": ("sandbox:embedded_data", f"""
        BLOB = "{"a" * (MAX_STRING_BYTES + 6 * 1024)}"  # <-
        """, f'''
        """{"Long module documentation. " * 3000}"""
        NOTE = "{"b" * 30_000}"
        '''),
}


@pytest.mark.parametrize("name", RULES)
def test_rule_catches_its_attack_at_its_line(name: str) -> None:
    rule, attack, _ = RULES[name]
    source, line = marked(attack)
    found = check(source)
    assert (rule, line) in found, found


@pytest.mark.parametrize("name", RULES)
def test_legitimate_twin_passes(name: str) -> None:
    assert check(RULES[name][2]) == []


def test_findings_name_the_expression_file_and_line() -> None:
    reasons = inspect_source("training.py", "import torch\ntorch.Tensor.backward = print\n", MODULES)
    assert len(reasons) == 1
    reason = reasons[0]
    assert (reason.rule, reason.file, reason.line) == ("sandbox:monkeypatch", "training.py", 2)
    assert "torch.Tensor.backward" in reason.message


def test_identical_findings_are_reported_once() -> None:
    assert check("import os\nimport os\n") == [("sandbox:import", 1), ("sandbox:import", 2)]
    assert check("x = eval\n") == [("sandbox:forbidden_builtin", 1)]


def test_syntax_errors_and_pathological_files_fail_closed() -> None:
    assert check("import math\ndef broken(:\n") == [("sandbox:syntax", 2)]
    assert check("x = " + "1+" * 5000 + "1\n") == [("sandbox:too_complex", 1)]
    names = [f"x{i}" for i in range(12)]  # every name assigned from every other: alias resolution explodes
    tangled = "".join(f"{a} = {b}\n" for a in names for b in names if a != b)
    assert check("import torch\n" + tangled + "x0 = torch\n") == [("sandbox:too_complex", 1)]


def test_long_alias_chains_are_followed() -> None:
    chain = "".join(f"x{i + 1} = x{i} if flag else x{i}\n" for i in range(300))
    assert check(f"import torch\nflag = True\nx0 = torch\n{chain}x300.manual_seed = print\n") == [
        ("sandbox:monkeypatch", 304)]


# ---- whole bundles


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_ordinary_pytorch_bundles_are_clean(case: str) -> None:
    assert inspect(load_bundle(CASES / case)) == []


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir())
                         if EXAMPLES.is_dir() else [])
def test_shipped_examples_are_clean(example: str) -> None:
    assert inspect(load_bundle(EXAMPLES / example)) == []


def test_bundle_modules_and_packages_are_importable() -> None:
    helpers = bundle(**{"training.py": """
        from architecture import build_model
        from models.blocks import Block
        import models.heads as heads
        def train(ctx):
            return heads.Head(Block(), build_model(ctx))
        """, "models/__init__.py": "", "models/blocks.py": """
        from .heads import Head
        from . import heads
        class Block:
            pass
        """, "models/heads.py": "class Head:\n    def __init__(self, *parts):\n        self.parts = parts\n"})
    assert inspect(helpers) == []
    assert module_names(helpers.python_files) == {"architecture", "training", "models", "models.blocks",
                                                  "models.heads"}


def test_patching_the_miners_own_modules_is_allowed() -> None:
    own = bundle(**{"training.py": """
        import architecture
        from architecture import build_model
        architecture.WIDTH = 8
        build_model.calls = 0
        def train(ctx):
            pass
        """, "architecture.py": "WIDTH = 4\ndef build_model(ctx):\n    return None\n"})
    assert inspect(own) == []


def test_imports_are_followed_across_bundle_files() -> None:
    relay = bundle(**{"training.py": """
        import architecture
        from architecture import F as functional
        functional.cross_entropy = print
        architecture.torch.manual_seed = print
        state = architecture.torch.load("/data/x.pt")
        def train(ctx):
            pass
        """, "architecture.py": ARCHITECTURE + "import torch.nn.functional as F\n"})
    found = [(r.rule, r.file, r.line) for r in inspect(relay)]
    assert found == [("sandbox:monkeypatch", "training.py", 4), ("sandbox:monkeypatch", "training.py", 5),
                     ("sandbox:forbidden_api", "training.py", 6)]


def test_a_file_shadowing_a_real_module_is_rejected() -> None:
    shadowing = bundle(**{"os.py": "def system(command):\n    return 0\n",
                          "training.py": "import os\ndef train(ctx):\n    os.system('x')\n"})
    found = {(r.rule, r.file, r.line) for r in inspect(shadowing)}
    assert found == {("sandbox:shadow", "os.py", 1), ("sandbox:import", "training.py", 1)}


@pytest.mark.parametrize("installed", ["sympy", "yaml", "jinja2"])  # torch and prism-ray need them
def test_a_file_named_like_any_installed_module_is_rejected(installed) -> None:
    """The runner's bundle dir comes last on sys.path: `import cffi` there loads the installed cffi (raw syscalls),
    not the empty cffi.py the policy read as the bundle's own (found by a red team)."""
    shadowing = bundle(**{f"{installed}.py": "",
                          "training.py": f"import {installed}\ndef train(ctx):\n    pass\n"})
    found = {(r.rule, r.file, r.line) for r in inspect(shadowing)}
    assert ("sandbox:shadow", f"{installed}.py", 1) in found, found


def test_the_runners_own_modules_are_no_bundle_names() -> None:
    """`__main__` in the runner is the runner itself, `os` in its namespace: `from __main__ import os` passed as an
    import of the bundle's own `__main__.py` (found by a red team)."""
    for name in ("__main__", "__mp_main__"):
        shadowing = bundle(**{f"{name}.py": "x = 1\n",
                              "training.py": f"from {name} import os\ndef train(ctx):\n    os.system('id')\n"})
        found = {(r.rule, r.file) for r in inspect(shadowing)}
        assert ("sandbox:shadow", f"{name}.py") in found, found


def test_every_rule_id_is_documented_for_miners() -> None:
    source = "".join(path.read_text() for path in (HERE.parent / "prism_ray" / "policy").glob("*.py"))
    rules = set(re.findall(r'"(sandbox:[a-z_]+)"', source))
    documented = set(re.findall(r"`(sandbox:[a-z_]+)`", (HERE.parent / "docs" / "rules.md").read_text()))
    assert rules and rules <= documented
