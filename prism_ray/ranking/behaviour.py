"""Copies by behaviour (docs/scoring.md, "Copies"): under the forced seed and the locked data, a functional copy
reproduces its original's per-batch losses, whatever its code looks like. A run's signature is its first few
per-batch nats, as the trusted parent recorded them, with what makes two runs comparable at all (dataset, seed,
byte budget, tokenizer, batch geometry); the store keeps one per completed run and links a later run of another
hotkey whose signature agrees (store/behaviours.py)."""

from __future__ import annotations

import hashlib
import math
import struct

from pydantic import BaseModel, ConfigDict

from prism_ray.evaluation.report import RunReport


class Signature(BaseModel):
    """What a completed run is as a learner, for copy detection."""

    model_config = ConfigDict(frozen=True)

    key: str  # sha256 of the run's conditions: only runs with the same key are compared
    head: list[float]  # the first per-batch nats
    head_sha256: str  # of the key and the head's exact float64 bytes: equal iff bit-identical (the CPU case)
    device: str


def signature(report: RunReport) -> Signature | None:
    """The signature of a completed run's report; None when the report lacks a part of it (a report of an older
    prism-ray, a run without a dataset fingerprint)."""
    head = report.head_nats
    data = report.data
    conditions = [data and data.fingerprint, data and data.split, report.seed, report.byte_budget, report.tokenizer,
                  report.batch_size, report.seq_len]
    if not head or any(part is None for part in conditions) or not all(map(math.isfinite, head)):
        return None
    key = hashlib.sha256(repr([*conditions, len(head)]).encode()).hexdigest()
    exact = hashlib.sha256(key.encode() + struct.pack(f"<{len(head)}d", *head)).hexdigest()
    return Signature(key=key, head=[float(nats) for nats in head], head_sha256=exact,
                     device=report.device or "cpu")


def same_learner(a: list[float], b: list[float], rtol: float) -> bool:
    """Every batch's nats agree: bit for bit when rtol is 0, else within rtol of the larger one."""
    if len(a) != len(b):
        return False
    return all(x == y or abs(x - y) <= rtol * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True))
