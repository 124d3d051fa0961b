"""Causality probes, planned by the trusted parent and run by the trusted scorer (docs/rules.md, "The scored
forward"; docs/architecture.md, "Trust boundaries").

A probed batch gets a probe batch of the same [B, L] shape. Half its rows are probe rows, at random row positions:
the real row's tokens up to a random boundary p, then real text from the already-scored stream. The other rows are
already-scored text too. The scorer runs the probe batch on the very snapshot the real
batch was scored on, with the same graph, and compares each probe row's target log-probs before p with the real
row's, at the same row index: a forward whose prediction at position t uses anything after t (the row's future, or
another row of the batch) moves them. The graph keeps no state between calls, so it cannot tell the two calls apart
by anything but their input; which batches, rows and boundaries are probed comes from a secret RNG.

Detection: a cheat at a fraction ρ of the positions of a row is seen by a probe row whose boundary lands just after
a cheating position, so each probe row catches it with probability ≥ ρ and R probe rows miss it with probability at
most (1 − ρ)^R (`escape_probability`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from prism_ray.harness.stream import BatchSlice, StreamPlan

_FILLER_TRIES = 16


@dataclass(frozen=True)
class ProbeBatch:
    index: int  # the real batch it probes
    rows: list[tuple[int, int]]  # (row, boundary p), 1 ≤ p ≤ L−1: the row keeps its real tokens before p
    tokens: np.ndarray  # [B, L]


def probe_rows_per_batch(batch_size: int) -> int:
    """Half the rows: the other half are filler rows, so a row that reads another row's text (row r+1's first token
    is row r's last target) is seen with probability ≥ 1/2 per probe row, at any B ≥ 2."""
    return max(1, batch_size // 2)


class ProbePlan:
    """Which batches are probed (each with probability 1/`every`, the first always) and their probe batches."""

    def __init__(self, plan: StreamPlan, every: int, vocab_size: int):
        self.plan = plan
        self.every = every
        self.vocab_size = vocab_size
        self.random = secrets.SystemRandom()

    def for_batch(self, piece: BatchSlice) -> ProbeBatch | None:
        if self.every <= 0 or (piece.index and self.random.randrange(self.every)):
            return None
        batch_size, seq_len = self.plan.batch_size, self.plan.seq_len
        real = piece.chunk[np.arange(batch_size)[:, None] * (seq_len - 1) + np.arange(seq_len)]
        tokens = np.empty((batch_size, seq_len), dtype=np.uint32)
        probed = sorted(self.random.sample(range(batch_size), probe_rows_per_batch(batch_size)))
        rows = []
        for row in range(batch_size):
            if row in probed:
                boundary = self.random.randint(1, seq_len - 1)
                tokens[row, :boundary] = real[row, :boundary]
                tokens[row, boundary:] = self._filler(piece, seq_len - boundary, avoid=int(real[row, boundary]))
                rows.append((row, boundary))
            else:
                tokens[row] = self._filler(piece, seq_len, avoid=-1)
        return ProbeBatch(piece.index, rows, tokens)

    def _filler(self, piece: BatchSlice, length: int, avoid: int) -> np.ndarray:
        """`length` real tokens from the scored past (batch 0: from this batch), whose first differs from `avoid`,
        the real token at the boundary — otherwise a peek at it would go unnoticed."""
        past = self.plan.tokens[: piece.index * self.plan.span] if piece.index else piece.chunk
        for _ in range(_FILLER_TRIES):
            if len(past) <= length:
                break
            start = self.random.randrange(0, len(past) - length)
            candidate = np.asarray(past[start: start + length])
            if int(candidate[0]) != avoid:
                return candidate
        filler = np.asarray(past[-length:] if len(past) >= length else np.resize(past, length)).copy()
        if int(filler[0]) == avoid:
            filler[0] = (avoid + 1 + self.random.randrange(self.vocab_size - 1)) % self.vocab_size
        return filler


def heldout_probe(tokens: np.ndarray, random: secrets.SystemRandom, vocab_size: int
                  ) -> tuple[list[tuple[int, int]], np.ndarray]:
    """A probe batch for a held-out batch [B, L], built inside the scorer from the batch itself (the held-out text
    never leaves it): probe rows keep their prefix to a random boundary, then another row's text; the other rows
    are other rows' text. Returns the (row, boundary) pairs and the probe tokens."""
    batch_size, seq_len = tokens.shape
    probe = np.empty_like(tokens)
    probed = sorted(random.sample(range(batch_size), probe_rows_per_batch(batch_size)))
    rows = []
    for row in range(batch_size):
        other = tokens[(row + 1 + random.randrange(max(1, batch_size - 1))) % batch_size]
        if row in probed:
            boundary = random.randint(1, seq_len - 1)
            probe[row, :boundary] = tokens[row, :boundary]
            probe[row, boundary:] = other[boundary:]
            if probe[row, boundary] == tokens[row, boundary]:  # a peek at the next token must show
                probe[row, boundary] = (int(tokens[row, boundary]) + 1 + random.randrange(vocab_size - 1)) % vocab_size
            rows.append((row, boundary))
        else:
            probe[row] = np.roll(other, random.randrange(1, seq_len))
    return rows, probe


def drift(real: np.ndarray, probed: np.ndarray) -> float:
    """Largest change between two rows of target log-probs (equal −∞ is no change; NaN is infinite)."""
    real, probed = real.astype(np.float64), probed.astype(np.float64)
    with np.errstate(invalid="ignore"):  # −∞ − −∞ is NaN before np.where discards it
        difference = np.where(real == probed, 0.0, np.abs(real - probed))
    if not len(difference):
        return 0.0
    return float(difference.max()) if np.all(np.isfinite(difference)) else float("inf")


def causality_tolerance(logits_dtype: str, device_type: str) -> float:
    """How far a probe row may move: nothing on CPU, where the same graph on the same shapes is bitwise
    reproducible; on a GPU a few units of rounding of the logits' own dtype, which the scorer computed."""
    if device_type != "cuda":
        return 0.0
    return {"float64": 1e-9, "float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}.get(logits_dtype, 1e-2)


def escape_probability(cheat_fraction: float, probe_rows: int) -> float:
    """The chance that R probe rows all miss a cheat at a fraction ρ of positions: (1 − ρ)^R."""
    return (1.0 - cheat_fraction) ** probe_rows


def non_causal_message(boundary: int, drift: float) -> str:
    return (f"predictions before position {boundary} of a row changed by {drift:.3g} nats when later tokens of the "
            "row (or other rows of the batch) changed: the model sees the future (attention mask, shifts, "
            "cross-row mixing or batch statistics)")
