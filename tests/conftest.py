"""Shared test helpers: real bundles on disk, real runner processes over synthetic token streams."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from prism_ray.bundle import Bundle, load_bundle
from prism_ray.harness.isolation import SandboxPolicy
from prism_ray.harness.records import RunSpec, TrainOutcome
from prism_ray.harness.session import run_session
from prism_ray.report import RunReport

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

BYTE_LENGTHS = np.ones(257, dtype=np.int64)
BYTE_LENGTHS[256] = 0


# PRISM's quickstart prism.yaml, verbatim (its miner guide and examples/tiny-1m).
QUICKSTART_YAML = """architecture:
  entrypoint: architecture.py
training:
  entrypoint: training.py
tokenizer: gpt2
"""


def bigram_architecture(init: str = "") -> str:
    """The smallest real learner: a [V, V] table of next-token logits; `init` runs at the end of __init__."""
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


def learner_loop(batch_size: int = 4, seq_len: int = 128, optimizer: str = "Adam", lr: float = 0.01) -> str:
    """An honest training script: backprop through the harness's forward (with_logits=True) on every batch."""
    return f"""
import torch

def train(ctx):
    model = ctx.build_model()
    optimizer = torch.optim.{optimizer}(model.parameters(), lr={lr})
    for batch in ctx.iter_train_batches(model, batch_size={batch_size}, seq_len={seq_len}, with_logits=True):
        batch.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""


def write_bundle(directory: Path, architecture: str, training: str, prism_yaml: str | None = None,
                 extra: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "architecture.py").write_text(textwrap.dedent(architecture))
    (directory / "training.py").write_text(textwrap.dedent(training))
    if prism_yaml is not None:
        (directory / "prism.yaml").write_text(textwrap.dedent(prism_yaml))
    for name, text in (extra or {}).items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def byte_stream(text: str) -> np.ndarray:
    """The `bytes` tokenizer's stream of one document: its UTF-8 bytes then end-of-text."""
    return np.append(np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16), np.uint16(256))


def train_on_stream(bundle: Bundle, tokens: np.ndarray, run_dir: Path, byte_budget: int = 0,
                    time_limit: float = 120.0, seed: int = 1337, max_params: int = 150_000_000,
                    byte_lengths: np.ndarray = BYTE_LENGTHS, vocab_size: int = 257,
                    policy: SandboxPolicy | None = None, probe_every: int = 1, heldout=None) -> TrainOutcome:
    spec = RunSpec(
        bundle_dir=bundle.write_to(run_dir / "bundle"),
        exporter_bundle_dir=bundle.write_to(run_dir / "exporter-bundle", without_training=True),
        architecture=(bundle.config.architecture_entry.file, bundle.config.architecture_entry.symbol),
        training=(bundle.config.training_entry.file, bundle.config.training_entry.symbol),
        tokenizer=bundle.config.tokenizer, vocab_size=vocab_size, max_seq_len=1024, max_params=max_params,
        seed=seed, device="cpu", byte_budget=byte_budget, artifacts_dir=run_dir / "artifacts", data_dir="",
        threads=1, probe_every=probe_every,
    )
    return run_session(spec, tokens, byte_lengths, run_dir, time_limit, policy=policy, heldout=heldout)


@pytest.fixture
def bundle_factory(tmp_path):
    counter = iter(range(1000))

    def make(architecture: str, training: str, prism_yaml: str | None = "tokenizer: bytes\n",
             extra: dict[str, str] | None = None) -> Bundle:
        return load_bundle(write_bundle(tmp_path / f"bundle{next(counter)}", architecture, training, prism_yaml,
                                        extra))

    return make


def scored_report(bpb: float | None, final_score: float | None = None, curve: list[dict] | None = None,
                  **fields) -> RunReport:
    """A completed run's report with this bpb, final_score (1/(1+bpb) unless given) and curve: what the store
    reads a scores row and a curve off."""
    if final_score is None and bpb is not None:
        final_score = 1 / (1 + bpb)
    return RunReport(status="completed", stage="score", bpb=bpb, final_score=final_score, curve=curve or [],
                     **fields)
