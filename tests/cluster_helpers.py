"""Bundles, settings and waiting helpers for the cluster tests and bench/cluster.py (real bundles, real Ray)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from prism_ray.bundle import Bundle, check_contract
from prism_ray.config import AuditSettings, ClusterSettings, GateSettings, ReplicaSettings, Settings
from prism_ray.data.dataset import open_dataset
from prism_ray.data.token_cache import load_token_stream

ARCHITECTURE = """\
from torch import nn


class Bigram(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, tokens):
        return self.table(tokens)


def build_model(ctx):
    return Bigram(ctx.vocab_size)
"""

TRAINING = """\
import time

import torch


def train(ctx):
    model = ctx.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for batch in ctx.iter_train_batches(model, batch_size=4, seq_len=64, with_logits=True):
        batch.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        time.sleep(PAUSE)
"""

# The bigram learner again, renamed and reformatted: a copy of TRAINING's bundle, not a byte-identical duplicate.
COPIED_ARCHITECTURE = """\
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
CLOCK_LEARNING_RATE = TRAINING.replace("lr=0.5", "lr=0.05 + time.time() % 7 / 10").replace("PAUSE", "0.0")

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


def make_bundle(tag: str, pause: float = 0.0, training: str | None = None, architecture: str = ARCHITECTURE) -> Bundle:
    """A tiny bytes-tokenizer bundle; `tag` makes its code distinct (different fingerprints: neither duplicates
    nor copies of each other); `pause` sleeps after every batch, to stretch a training out."""
    files = {"architecture.py": f"TAG = {tag!r}\n{architecture}".encode(),
             "training.py": (training or TRAINING.replace("PAUSE", repr(pause))).encode(),
             "prism.yaml": f"name: {tag}\ntokenizer: bytes\n".encode()}
    return check_contract(files)


def tiny_settings(cache_dir: Path, store_path: Path, audits: bool = False, replicas: bool = False,
                  **cluster: object) -> Settings:
    """A 20 kB byte budget, one runner thread, the gate off, fast heartbeats, and re-execution audits and seed
    replicas only for the tests about them (elsewhere they would re-run every top score beside the work under test)."""
    return Settings(cache_dir=cache_dir, byte_budget=20_000, runner_threads=1, time_limit=120,
                    gate=GateSettings(mode="off"), audit=AuditSettings(mode="on" if audits else "off"),
                    replicas=ReplicaSettings(mode="on" if replicas else "off", top_k=1, count=1),
                    cluster=ClusterSettings(store_path=store_path, heartbeat_seconds=1.0, **cluster))


def warm_token_cache(cache_dir: Path) -> None:
    """Build the bytes token cache once, so no training pays for it."""
    settings = Settings(cache_dir=cache_dir)
    load_token_stream(open_dataset(settings.data_dir), "train", "bytes", cache_dir)


def wait_until(predicate, timeout: float, poll: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def pids(pattern: str) -> set[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}
