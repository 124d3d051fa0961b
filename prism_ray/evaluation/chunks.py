"""A run's nats per fixed byte chunk of the scored stream (docs/scoring.md, "Chunks"): what makes two runs with
different batch geometries or tokenizers comparable piece by piece. Every run scores the same bytes in the same
order, so chunk c is the same text for every run: bytes [span·c/K, span·(c+1)/K) of the targets' bytes.

The trusted parent records nats per batch, not per byte, so a batch's nats are spread evenly over its bytes and
split proportionally where it straddles a chunk edge: the chunking is at batch resolution."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict


class ChunkCurve(BaseModel):
    model_config = ConfigDict(frozen=True)

    span: int  # target bytes the chunks cover
    nats: list[float]  # per chunk
    bytes: list[int]  # per chunk: span split into equal parts (they differ by at most one byte)

    def bpb(self) -> list[float]:
        return [nats / math.log(2) / size for nats, size in zip(self.nats, self.bytes, strict=True)]


def chunk_edges(span: int, chunks: int) -> list[int]:
    return [span * index // chunks for index in range(chunks + 1)]


def chunk_curve(batch_nats: Sequence[float], batch_bytes: Sequence[int], byte_budget: int | None,
                chunks: int) -> ChunkCurve | None:
    """The chunks of a run over its byte budget (the whole run when the budget is 0 or unknown); None when the run
    scored fewer bytes than its chunks cover, or too few for one byte per chunk."""
    total = sum(batch_bytes)
    span = byte_budget if byte_budget else total
    if total < span or span < chunks:
        return None
    edges = chunk_edges(span, chunks)
    nats = [0.0] * chunks
    chunk, start = 0, 0
    for batch_nat, size in zip(batch_nats, batch_bytes, strict=True):
        end = start + size
        while size and chunk < chunks and edges[chunk] < end:
            overlap = min(end, edges[chunk + 1]) - max(start, edges[chunk])
            nats[chunk] += batch_nat * overlap / size
            if edges[chunk + 1] > end:
                break
            chunk += 1
        start = end
        if start >= span:
            break
    return ChunkCurve(span=span, nats=nats, bytes=[edges[i + 1] - edges[i] for i in range(chunks)])
