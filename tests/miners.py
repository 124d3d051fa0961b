"""Miner code for the tests, in one place: the texts of the bundles' architecture.py, training.py and prism.yaml,
and the tiny bundles built from them. One learner serves almost everywhere: a [V, V] bigram table trained through
the harness's forward. A test that needs a twist derives it from these texts (`.replace`); attack bundles stay
beside the tests they attack with."""

from __future__ import annotations

from prism_ray.intake.bundle import Bundle, check_contract

# PRISM's quickstart prism.yaml, verbatim (its miner guide and examples/tiny-1m).
QUICKSTART_YAML = """architecture:
  entrypoint: architecture.py
training:
  entrypoint: training.py
tokenizer: gpt2
"""


def bigram_architecture(init: str = "") -> str:
    """The smallest real learner: a [V, V] table of next-token logits; `init` runs at the end of __init__. Tests
    point at its lines (the forward's body is line 11): keep its shape."""
    return f"""
import torch
from torch import nn

class Bigram(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        {init}
    def forward(self, tokens):
        return self.table(tokens)

def build_model(ctx):
    return Bigram(ctx.vocab_size)
"""


BIGRAM_ARCHITECTURE = bigram_architecture()


def learner_loop(batch_size: int = 4, seq_len: int = 128, optimizer: str = "Adam", lr: float | str = 0.01,
                 pause: float | None = None, any_world_size: bool = False) -> str:
    """An honest training script: backprop through the harness's forward (with_logits=True) on every batch; `lr` may
    be an expression; `pause` sleeps that many seconds after every batch, to stretch a training out;
    `any_world_size` averages the ranks' gradients, so the loop is correct at several ranks too."""
    clock, sleep = ("import time\n", f"\n        time.sleep({pause!r})") if pause is not None else ("", "")
    join, average = ("\n    if ctx.world_size > 1:\n        torch.distributed.init_process_group('gloo')",
                     "\n        if ctx.world_size > 1:  # every rank steps on the whole batch's mean gradient"
                     "\n            for parameter in model.parameters():"
                     "\n                torch.distributed.all_reduce(parameter.grad)"
                     "\n                parameter.grad /= ctx.world_size") if any_world_size else ("", "")
    return f"""
{clock}import torch

def train(ctx):
    model = ctx.build_model(){join}
    optimizer = torch.optim.{optimizer}(model.parameters(), lr={lr})
    for batch in ctx.iter_train_batches(model, batch_size={batch_size}, seq_len={seq_len}, with_logits=True):
        batch.loss.backward(){average}
        optimizer.step()
        optimizer.zero_grad(){sleep}
"""


# The cluster's learner: plain SGD on short rows, so a 20 kB budget trains in seconds.
SGD_TRAINING = learner_loop(seq_len=64, optimizer="SGD", lr=0.5)

# The bigram learner again, renamed and reformatted: a copy of BIGRAM_ARCHITECTURE, not a byte-identical duplicate.
COPIED_ARCHITECTURE = """\
import torch
from torch import nn
class Lookup(nn.Module):
    \"\"\"Next byte from this byte.\"\"\"
    def __init__(self, size: int):
        super().__init__(); self.weights = nn.Embedding(size, size)
    def forward(self, ids):  # logits
        return self.weights(ids)
def build_model(context):
    return Lookup(context.vocab_size)
"""

# A learning rate read from the clock: each run of this code trains differently, so a re-run cannot reproduce it.
CLOCK_LEARNING_RATE = learner_loop(seq_len=64, optimizer="SGD", lr="0.05 + time.time() % 7 / 10", pause=0.0)

INFINITE_LOOP = """\
import time


def train(ctx):
    while True:
        time.sleep(0.1)
"""

FORBIDDEN_IMPORT = """\
import os


def train(ctx):
    os.system("true")
"""


def make_bundle(tag: str, pause: float = 0.0, training: str | None = None,
                architecture: str = BIGRAM_ARCHITECTURE) -> Bundle:
    """A tiny bytes-tokenizer bundle; `tag` makes its code distinct (different fingerprints: neither duplicates
    nor copies of each other); `pause` sleeps after every batch, to stretch a training out."""
    files = {"architecture.py": f"TAG = {tag!r}\n{architecture}".encode(),
             "training.py": (training or learner_loop(seq_len=64, optimizer="SGD", lr=0.5, pause=pause)).encode(),
             "prism.yaml": f"name: {tag}\ntokenizer: bytes\n".encode()}
    return check_contract(files)


def bundle_of(files: dict[str, str] | None = None) -> Bundle:
    """A bytes-tokenizer bundle of exactly these files (the bigram learner when none are given)."""
    files = {"prism.yaml": "tokenizer: bytes\n", **(files or {"architecture.py": BIGRAM_ARCHITECTURE,
                                                            "training.py": SGD_TRAINING})}
    return check_contract({path: text.encode() for path, text in files.items()})
