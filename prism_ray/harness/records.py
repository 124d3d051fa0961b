"""What a run is and what it produced, as the trusted parent keeps them: the spec the runners get, the held-out
passes, the outcome, and the books (targets and bytes counted here; nats taken only from the scorer)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from prism_ray.errors import Reason
from prism_ray.harness.stream import BatchSlice

RETRYABLE_RULES = frozenset({"infra:runner_killed"})  # system failures a run can end with: retried, never charged


@dataclass
class Progress:
    batches: int
    bytes_scored: int
    byte_budget: int
    running_bpb: float
    tokens_per_second: float


@dataclass
class RunSpec:
    """Everything the runners need; sent over their sockets, so they read no files of ours."""

    bundle_dir: Path  # the whole bundle: the trainer's
    exporter_bundle_dir: Path  # the bundle without the training entry file: the exporter's
    architecture: tuple[str, str]
    training: tuple[str, str]
    tokenizer: str
    vocab_size: int
    max_seq_len: int
    max_params: int
    seed: int
    device: str
    byte_budget: int
    artifacts_dir: Path
    data_dir: str
    threads: int
    probe_every: int = 1  # one batch in this many is probed, on average (0: none)
    world_size: int = 1  # trainer ranks in the trainer's sandbox (docs/architecture.md, "Several ranks")
    rank_timeout: float = 120.0  # how long a rank may trail the first one to a step before it is run:rank_hung
    max_batches: int | None = None  # end the stream after this many batches (the unscored contract check)
    scored: bool = True  # False: the contract check, which scores nothing: no export, no graph (contract.py)
    gpu_handoff: Literal["host", "stream"] = "host"  # the GPU hand-off on CUDA runs (docs/architecture.md)

    def runner_spec(self, role: str) -> dict:
        if role == "scorer":  # no bundle, no paths: it runs no miner code and reads no files of ours
            return {"role": role, "vocab_size": self.vocab_size, "max_params": self.max_params, "seed": self.seed,
                    "device": self.device, "threads": self.threads, "probe_every": self.probe_every,
                    "rank_timeout": self.rank_timeout, "scored": self.scored}
        bundle = self.bundle_dir if role == "trainer" else self.exporter_bundle_dir
        return {"role": role, "bundle_dir": str(bundle), "architecture": list(self.architecture),
                "training": list(self.training), "tokenizer": self.tokenizer, "vocab_size": self.vocab_size,
                "max_seq_len": self.max_seq_len, "max_params": self.max_params, "seed": self.seed,
                "device": self.device if role == "trainer" else "cpu",  # the exporter traces on CPU
                "byte_budget": self.byte_budget, "artifacts_dir": str(self.artifacts_dir),
                "data_dir": self.data_dir if role == "trainer" else "",
                # the ranks share the run's cores; the exporter runs alone
                "threads": max(1, self.threads // self.world_size) if role == "trainer" else self.threads,
                "rank": 0, "world_size": self.world_size if role == "trainer" else 1,
                **({"scored": self.scored} if role == "exporter" else {})}  # the trainer is not told


@dataclass
class EvalPass:
    """One held-out pass: score `tokens` (same stream rules) with the trained state or the step-0 state."""

    name: str
    tokens: np.ndarray
    byte_budget: int
    trained: bool
    max_batches: int | None = None


@dataclass
class PassResult:
    nats: float = 0.0
    targets: int = 0
    bytes: int = 0
    batches: int = 0
    non_finite: int = 0


@dataclass
class TrainOutcome:
    status: str = "failed"  # completed | failed
    reasons: list[Reason] = field(default_factory=list)
    before_data: bool = False  # failed in the instantiation probe, before any data: the bundle is rejected
    batch_size: int | None = None
    seq_len: int | None = None
    with_logits: bool | None = None
    batch_nats: list[float] = field(default_factory=list)
    batch_targets: list[int] = field(default_factory=list)
    batch_bytes: list[int] = field(default_factory=list)
    non_finite_batches: int = 0
    planned_batches: int | None = None
    probe_rows: int = 0
    max_probe_drift: float = 0.0
    probe_tolerance: float | None = None
    stopped_reason: str | None = None
    model_params: int | None = None
    wall_seconds: float = 0.0
    stream_seconds: float = 0.0
    device: str | None = None
    world_size: int = 1
    sandboxed: bool = False
    log_tail: str = ""
    heldout: dict[str, PassResult] | None = None
    heldout_reasons: list[Reason] = field(default_factory=list)
    heldout_seconds: float = 0.0

    @property
    def batches(self) -> int:
        return len(self.batch_nats)

    @property
    def retryable(self) -> bool:
        return any(reason.rule in RETRYABLE_RULES for reason in self.reasons)


def charged(nats: float, finite: bool, targets: int, vocab_size: int) -> tuple[float, bool]:
    """The nats a batch counts for: a non-finite or negative loss is charged 2·ln(V) per target (docs/scoring.md).
    Returns (nats, whether it was charged)."""
    if not finite or not math.isfinite(nats) or nats < 0:
        return 2.0 * math.log(vocab_size) * targets, True
    return nats, False


class Books:
    """Per-batch accounting of the parent."""

    def __init__(self, outcome: TrainOutcome, vocab_size: int):
        self.outcome = outcome
        self.vocab_size = vocab_size
        self.nats = 0.0
        self.bytes = 0
        self.targets = 0

    def record(self, piece: BatchSlice, nats: float, finite: bool) -> None:
        nats, penalised = charged(nats, finite, piece.targets, self.vocab_size)
        self.outcome.non_finite_batches += penalised
        self.outcome.batch_nats.append(nats)
        self.outcome.batch_targets.append(piece.targets)
        self.outcome.batch_bytes.append(piece.target_bytes)
        self.nats += nats
        self.bytes += piece.target_bytes
        self.targets += piece.targets

    @property
    def running_bpb(self) -> float:
        return self.nats / math.log(2) / self.bytes if self.bytes else float("nan")


HeldoutPlan = Callable[[TrainOutcome], list[EvalPass]]
