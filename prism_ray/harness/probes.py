"""Causality probes, decided and judged by the trusted parent (docs/architecture.md, "Trust boundaries").

Each scored batch gets `rows_per_batch` probe rows, drawn from a secret RNG after the batch was scored. A probe row
is one row of the batch with every token from a random boundary p on replaced by real stream text taken from what
was already scored (so the filler looks like text and leaks no future). The prober — a process that never sees a
real batch — scores it on the very snapshot the batch was scored on; the parent compares its log-probs of the
targets before p with the scorer's for the same row. A model whose prediction at position t uses anything after t
(the row's future, or another row of the batch) fails with `run:non_causal`.

Why another process: inside one process a model can keep state across calls (a module-level cache) and replay its
first answer for the second input, whatever the order of the two calls. The prober cannot see the scorer's input,
and the scorer cannot know which row or boundary will be probed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from prism_ray.harness.stream import BatchSlice, StreamPlan

_FILLER_TRIES = 16


@dataclass(frozen=True)
class ProbeRow:
    index: int  # the batch
    row: int
    boundary: int  # first replaced position of the row, 1 ≤ p ≤ L−1
    tokens: np.ndarray  # L probe-input tokens, then the real token at the boundary


class ProbePlan:
    def __init__(self, plan: StreamPlan, rows_per_batch: int, vocab_size: int):
        self.plan = plan
        self.rows_per_batch = min(rows_per_batch, plan.batch_size)
        self.vocab_size = vocab_size
        self.random = secrets.SystemRandom()

    def rows_for(self, piece: BatchSlice) -> list[ProbeRow]:
        if self.rows_per_batch <= 0:
            return []
        chosen = self.random.sample(range(self.plan.batch_size), self.rows_per_batch)
        return [self._probe_row(piece, row) for row in sorted(chosen)]

    def _probe_row(self, piece: BatchSlice, row: int) -> ProbeRow:
        seq_len = self.plan.seq_len
        start = row * (seq_len - 1)
        real = piece.chunk[start: start + seq_len]
        boundary = self.random.randint(1, seq_len - 1)
        filler = self._filler(piece, seq_len - boundary, int(real[boundary]))
        tokens = np.concatenate([real[:boundary], filler, real[boundary: boundary + 1]])
        return ProbeRow(piece.index, row, boundary, tokens)

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
        filler[0] = (avoid + 1 + self.random.randrange(self.vocab_size - 1)) % self.vocab_size
        return filler


class ProbeError(Exception):
    """A runner answered for a probe row that was not asked of it (a protocol breach)."""


class ProbeDesk:
    """The probes in flight, as the parent tracks them. A probed batch waits in line until the prober is free; then
    the scorer stages that batch's snapshot for the prober and sends its own log-probs of each probed row; once all
    are in, the rows go to the prober, and each of its answers is paired with the scorer's. The prober holds one
    staged snapshot, so one probed batch is staged or probed at a time."""

    def __init__(self) -> None:
        self.waiting: list[list[ProbeRow]] = []  # probed batches whose snapshot is not staged yet
        self._staged: list[ProbeRow] = []  # the batch being staged
        self._staging: set[tuple[int, int]] = set()  # its rows whose scorer log-probs have not arrived
        self._scored: dict[tuple[int, int], np.ndarray] = {}
        self._probing: dict[tuple[int, int], ProbeRow] = {}  # sent to the prober

    @property
    def idle(self) -> bool:
        return not (self.waiting or self._staging or self._probing)

    @property
    def prober_free(self) -> bool:
        return not self._probing

    def add(self, rows: list[ProbeRow]) -> None:
        self.waiting.append(rows)

    def next_batch(self) -> list[ProbeRow] | None:
        """The rows of the next batch to stage, once the prober is free and one waits."""
        if self._probing or self._staging or not self.waiting:
            return None
        self._staged = self.waiting.pop(0)
        self._staging = {(row.index, row.row) for row in self._staged}
        return self._staged

    def scorer_row(self, index: int, row: int, log_probs: np.ndarray) -> list[ProbeRow]:
        """Keep the scorer's log-probs of a staged row; the batch's rows, for the prober, once all of them are in."""
        if (index, row) not in self._staging:
            raise ProbeError(f"log-probs of row {row} of batch {index} were not asked for")
        self._staging.discard((index, row))
        self._scored[(index, row)] = log_probs
        if self._staging:
            return []
        ready, self._staged = self._staged, []
        self._probing.update(((probe.index, probe.row), probe) for probe in ready)
        return ready

    def prober_row(self, index: int, row: int, log_probs: np.ndarray) -> tuple[ProbeRow, float]:
        """The probe the prober answered, and how far its log-probs moved from the scorer's before the boundary."""
        probe = self._probing.pop((index, row), None)
        if probe is None:
            raise ProbeError(f"the prober answered for row {row} of batch {index}, which was not probed")
        return probe, drift(self._scored.pop((index, row)), log_probs, probe.boundary)


def drift(scorer_row: np.ndarray, prober_row: np.ndarray, boundary: int) -> float:
    """Largest change of a target log-prob before the boundary between the batch and its probe (∞ if malformed)."""
    if len(prober_row) != boundary or len(scorer_row) < boundary:
        return float("inf")
    scored, probed = scorer_row[:boundary].astype(np.float64), prober_row.astype(np.float64)
    with np.errstate(invalid="ignore"):  # −∞ − −∞ is NaN before np.where discards it
        difference = np.where(scored == probed, 0.0, np.abs(scored - probed))  # equal −∞ is no drift
    return float(difference.max()) if np.all(np.isfinite(difference)) else float("inf")


def causality_tolerance(dtypes: list[str], device_type: str) -> float:
    """How far a row's log-probs may move between two forwards of different batch shapes (rounding only): one ulp of
    a bfloat16 logit near 16 is 0.0625; GPU kernels for different batch shapes may reduce in other orders."""
    if any(d.removeprefix("torch.") in ("float16", "bfloat16") for d in dtypes):
        return 0.25
    return 1e-2 if device_type == "cuda" else 1e-3


def non_causal_message(boundary: int, drift: float) -> str:
    return (f"predictions before position {boundary} of a row changed by {drift:.3g} nats when later tokens of the "
            "row (or other rows of the batch) changed: the model sees the future (attention mask, shifts, "
            "cross-row mixing or batch statistics), or its eval-mode output is not a deterministic function of "
            "its input")
