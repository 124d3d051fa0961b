"""The scored stream's geometry (docs/architecture.md, "Scoring contract"), computed by the trusted parent.

Row g is stream[g·(L−1) : g·(L−1)+L], so consecutive rows overlap by one token and every token after
the first is a target exactly once. Batch k covers rows kB … kB+B−1, i.e. the contiguous token span
[kB(L−1), (k+1)B(L−1)+1). Targets and their bytes are counted here, never taken from the runner.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from prism_ray.errors import PrismError


@dataclass(frozen=True)
class BatchSlice:
    index: int
    chunk: np.ndarray  # B·(L−1)+1 consecutive tokens; the runner unfolds it into [B, L]
    targets: int
    target_bytes: int


def check_geometry(batch_size: object, seq_len: object, max_seq_len: int, max_batch_tokens: int) -> tuple[int, int]:
    # the range first: a runner may send any JSON integer, and one of 4,300 digits cannot even be formatted
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= max_batch_tokens:
        raise PrismError("run:bad_geometry", f"batch_size must be an integer in [1, {max_batch_tokens:,}], got "
                         f"{repr(batch_size)[:40]}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 2 <= seq_len <= max_seq_len:
        raise PrismError("run:bad_geometry", f"seq_len must be an integer in [2, {max_seq_len}], got "
                         f"{repr(seq_len)[:40]}")
    if batch_size * seq_len > max_batch_tokens:
        raise PrismError("run:bad_geometry",
                         f"batch_size·seq_len = {batch_size * seq_len:,} is over {max_batch_tokens:,} tokens")
    return batch_size, seq_len


class StreamPlan:
    """Yields complete batches until the byte budget is reached or the stream cannot fill another."""

    def __init__(self, tokens: np.ndarray, byte_lengths: np.ndarray, batch_size: int, seq_len: int,
                 byte_budget: int):
        self.tokens = tokens
        self.byte_lengths = byte_lengths
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.byte_budget = byte_budget
        self.span = batch_size * (seq_len - 1)
        self.available_batches = max(0, (len(tokens) - 1) // self.span)

    def batch(self, index: int) -> BatchSlice:
        start = index * self.span
        chunk = self.tokens[start: start + self.span + 1]
        target_bytes = int(self.byte_lengths[chunk[1:]].sum())
        return BatchSlice(index=index, chunk=chunk, targets=self.span, target_bytes=target_bytes)

    def planned_batches(self) -> int:
        """How many batches `batches()` yields: known before the run, so the scorer's count can be checked."""
        if not self.available_batches:
            return 0
        if not self.byte_budget:
            return self.available_batches
        block = max(1, (1 << 22) // self.span)  # batches per step: memory stays flat on a huge split
        scored = 0
        for first in range(0, self.available_batches, block):
            last = min(first + block, self.available_batches)
            targets = self.tokens[first * self.span + 1: last * self.span + 1]
            per_batch = np.add.reduceat(self.byte_lengths[targets], np.arange(0, len(targets), self.span))
            reached = np.flatnonzero(scored + np.cumsum(per_batch) >= self.byte_budget)
            if len(reached):
                return first + int(reached[0]) + 1
            scored += int(per_batch.sum())
        return self.available_batches

    def batches(self) -> Iterator[BatchSlice]:
        scored_bytes = 0
        for index in range(self.available_batches):
            piece = self.batch(index)
            scored_bytes += piece.target_bytes
            yield piece
            if self.byte_budget and scored_bytes >= self.byte_budget:
                return
