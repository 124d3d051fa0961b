"""The GPU hand-off (PRISM_GPU_HANDOFF=stream; docs/architecture.md, "The GPU hand-off"): per batch, the order
"a rank's work before its request has landed → the scorer's snapshot → the rank's rows of the batch" is kept by
the GPUs' streams, through two words in a buffer each rank shares with the scorer (layout.py), instead of two
host syncs and the rows in a frame.

Request n of a rank is its n-th NEXT: batch n of the stream, or the end.
- The rank: its hand-off stream follows its current stream, then writes `stepped = n + 1`; NEXT.
- The scorer, once every rank asked: each rank's stream waits `stepped ≥ n + 1`; its own stream copies the weights
  into the snapshot after all of them; then each rank's stream copies the rank's rows, staged on the GPU earlier,
  into its buffer and writes `released = n + 1`. BATCH headers (no tokens) go out at once; the scorer's forward
  follows the snapshot on its current stream.
- The rank, on the header: its hand-off stream waits `released ≥ n + 1` and copies the rows out (the scorer
  overwrites them at the next batch); its current stream follows that copy.
Neither host waits for a GPU, except the scorer's bounded poll (`late`) before it reads a result.

The order is written against `Ops`, the stream primitives it needs: `CudaOps` on a GPU (not run on a machine
without one); the tests run this same code on a simulation of streams.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from prism_ray.harness import cuda_flags
from prism_ray.harness.layout import RELEASED, STEPPED, TOKENS, HandoffSpec

_POLL_FIRST, _POLL_MOST = 20e-6, 1e-3  # seconds between two looks at the ranks' events: short first, then backing off


class Ops(Protocol):
    def stream(self, device: torch.device) -> Any: ...
    def current(self, device: torch.device) -> Any: ...
    def wait_value(self, stream: Any, word: torch.Tensor, value: int) -> None: ...
    def write_value(self, stream: Any, word: torch.Tensor, value: int) -> None: ...
    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None: ...
    def record(self, stream: Any) -> Any: ...
    def wait_event(self, stream: Any, event: Any) -> None: ...
    def done(self, event: Any) -> bool: ...
    def keep(self, tensor: torch.Tensor, stream: Any) -> None: ...
    def upload(self, host: torch.Tensor, device: torch.device) -> torch.Tensor: ...


class CudaOps:
    """The primitives on CUDA: torch's streams and events, the driver's stream memory operations (cuda_flags.py)."""

    def __init__(self) -> None:
        self.uploads: dict[torch.device, torch.cuda.Stream] = {}

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.Stream(device)

    def current(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.current_stream(device)

    def wait_value(self, stream: torch.cuda.Stream, word: torch.Tensor, value: int) -> None:
        with torch.cuda.device(stream.device):  # the driver call runs in the stream's context
            cuda_flags.wait_geq(stream.cuda_stream, word.data_ptr(), value)

    def write_value(self, stream: torch.cuda.Stream, word: torch.Tensor, value: int) -> None:
        with torch.cuda.device(stream.device):
            cuda_flags.write(stream.cuda_stream, word.data_ptr(), value)

    def copy(self, stream: torch.cuda.Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        return stream.record_event()

    def wait_event(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def done(self, event: torch.cuda.Event) -> bool:
        return event.query()

    def keep(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        tensor.record_stream(stream)  # allocated on another stream: not reused before `stream` is done with it

    def upload(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """On a side stream: a copy from pageable memory first waits for its stream's earlier work, which on a
        hand-off stream would be a rank's step."""
        if device not in self.uploads:
            self.uploads[device] = torch.cuda.Stream(device)
        with torch.cuda.stream(self.uploads[device]):
            return host.to(device)


@dataclass
class Staged:
    """A batch on the scorer's GPUs before its request: all its rows (scored) and each rank's block (handed over)."""

    tokens: torch.Tensor
    ranks: list[torch.Tensor]


def words(buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The `stepped` and `released` words of a hand-off buffer (uint8)."""
    return buffer[STEPPED:STEPPED + 4].view(torch.int32), buffer[RELEASED:RELEASED + 4].view(torch.int32)


def rows(buffer: torch.Tensor, spec: HandoffSpec) -> torch.Tensor:
    return buffer[TOKENS:spec.nbytes].view(torch.int64).view(spec.rows, spec.seq_len)


class ScorerHandoff:
    """The scorer's side: one buffer per rank (on the rank's GPU) and one stream per rank there."""

    def __init__(self, ops: Ops, buffers: list[torch.Tensor], spec: HandoffSpec, device: torch.device):
        self.ops, self.spec, self.device = ops, spec, device
        self.words = [words(buffer) for buffer in buffers]
        self.rows = [rows(buffer, spec) for buffer in buffers]
        self.streams = [ops.stream(buffer.device) for buffer in buffers]
        self.own = ops.stream(device)  # the snapshot copy
        self.stepped: list[Any] = []  # per rank: its stream has passed its `stepped` wait of the last request
        self.snapped: Any = None  # the last snapshot copy is done

    def stage(self, tokens: torch.Tensor) -> Staged:
        """A batch's rows [B, L] from host memory onto the GPUs, before its request."""
        scored = self.ops.upload(tokens, self.device)
        count = self.spec.rows
        blocks = [scored[rank * count:(rank + 1) * count] if mine.device == self.device
                  else self.ops.upload(tokens[rank * count:(rank + 1) * count], mine.device)
                  for rank, mine in enumerate(self.rows)]
        return Staged(scored, blocks)

    def snapshot(self, request: int, shared: torch.Tensor, private: torch.Tensor) -> None:
        """Enqueue: every rank's work before `request` has landed → `private` ← `shared`; the scorer's current
        stream (its checks and forward) follows the copy."""
        self.stepped = []
        for (stepped, _), stream in zip(self.words, self.streams, strict=True):
            self.ops.wait_value(stream, stepped, request + 1)
            self.stepped.append(self.ops.record(stream))
        for event in self.stepped:
            self.ops.wait_event(self.own, event)
        current = self.ops.current(self.device)
        self.ops.wait_event(self.own, self.ops.record(current))  # the last forward has done reading `private`
        self.ops.copy(self.own, private, shared)
        self.snapped = self.ops.record(self.own)
        self.ops.wait_event(current, self.snapped)

    def late(self, timeout: float) -> list[int]:
        """The ranks whose work before the last snapshot's request has not landed within `timeout` seconds. Polled:
        a rank that never writes its word must not hold the scorer's host; once none is late, everything the
        scorer enqueued depends only on its own work."""
        deadline = time.monotonic() + timeout
        pause = _POLL_FIRST
        while True:
            behind = [rank for rank, event in enumerate(self.stepped) if not self.ops.done(event)]
            if not behind or time.monotonic() >= deadline:
                return behind
            time.sleep(pause)
            pause = min(2 * pause, _POLL_MOST)

    def release(self, request: int, staged: Staged) -> None:
        """Enqueue, per rank, after the snapshot copy: its rows into its buffer, then `released`."""
        for (_, released), mine, block, stream in zip(self.words, self.rows, staged.ranks, self.streams, strict=True):
            self.ops.wait_event(stream, self.snapped)
            self.ops.copy(stream, mine, block)
            self.ops.keep(block, stream)
            self.ops.write_value(stream, released, request + 1)

    def scored(self, staged: Staged) -> torch.Tensor:
        """The batch for the forward, on the scorer's current stream (which follows the snapshot)."""
        self.ops.keep(staged.tokens, self.ops.current(self.device))
        return staged.tokens


class TrainerHandoff:
    """A rank's side: its buffer, and a stream of its own, so that what the scorer orders against does not depend
    on which stream the miner's code makes current between two batches."""

    def __init__(self, ops: Ops, buffer: torch.Tensor, spec: HandoffSpec):
        self.ops, self.spec, self.device = ops, spec, buffer.device
        self.stepped, self.released = words(buffer)
        self.rows = rows(buffer, spec)
        self.stream = ops.stream(buffer.device)

    def asking(self, request: int) -> None:
        """Before the rank's request (NEXT): its work so far, then `stepped = request + 1`."""
        self.ops.wait_event(self.stream, self.ops.record(self.ops.current(self.device)))
        self.ops.write_value(self.stream, self.stepped, request + 1)

    def take(self, request: int) -> torch.Tensor:
        """The rows of `request` (its BATCH header came): a copy of its own once the scorer released them, which
        the rank's current stream follows."""
        current = self.ops.current(self.device)
        tokens = torch.empty_like(self.rows)  # memory of the current stream's, which the copy below follows
        self.ops.wait_event(self.stream, self.ops.record(current))
        self.ops.wait_value(self.stream, self.released, request + 1)
        self.ops.copy(self.stream, tokens, self.rows)
        self.ops.wait_event(current, self.ops.record(self.stream))
        return tokens
