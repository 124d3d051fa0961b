"""The trainer's ranks as the trusted parent and the scorer see them: one channel per rank (the parent's control
channel, the scorer's batch channel), who has reached which step, and the rows of a batch each rank gets
(docs/architecture.md, "Several ranks").

Rank r of N gets the contiguous block of rows [r·B/N, (r+1)·B/N) of every batch (batch_size is the global batch).
Every rank must reach each step (iter_train_batches, the next batch, the end) within `timeout` seconds of the
first rank that did: a rank that hangs gets `run:rank_hung`, naming it, instead of waiting out the run's clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from prism_ray.errors import Reason
from prism_ray.harness.protocol import Channel

MAX_WORLD_SIZE = 8  # one node's GPUs; also bounds the descriptors one frame carries (protocol.py)


@dataclass
class Rank:
    index: int
    channel: Channel
    geometry: dict | None = None  # its iter_train_batches call; the layout is kept for rank 0 only
    layout_digest: str = ""  # the layout's, compared with rank 0's
    reached: set[str] = field(default_factory=set)  # the steps this rank has reached


class Ranks:
    def __init__(self, world_size: int, timeout: float):
        if not 1 <= world_size <= MAX_WORLD_SIZE:
            raise ValueError(f"world size {world_size} is outside 1..{MAX_WORLD_SIZE}")
        self.world_size, self.timeout = world_size, timeout
        self.members: list[Rank] = []
        self.clock: tuple[float, str] | None = None  # since when, and which step, some rank waits for the others

    @staticmethod
    def key(index: int) -> str:
        return f"trainer:{index}"

    def label(self, index: int) -> str:
        """How a message names the rank: with one rank, it is simply the trainer."""
        return "trainer" if self.world_size == 1 else f"rank {index}"

    def add(self, channel: Channel) -> Rank:
        rank = Rank(len(self.members), channel)
        self.members.append(rank)
        return rank

    # --- steps every rank must reach --------------------------------------------------------------------------

    def reach(self, index: int, step: str) -> bool:
        """Rank `index` reached `step`; True once every rank has."""
        self.members[index].reached.add(step)
        if self.all_reached(step):
            self.clock = None
            for rank in self.members:
                rank.reached.discard(step)
            return True
        if self.clock is None or self.clock[1] != step:
            self.clock = (time.monotonic(), step)
        return False

    def all_reached(self, step: str) -> bool:
        return all(step in rank.reached for rank in self.members)

    def overdue_at(self) -> float | None:
        return None if self.clock is None else self.clock[0] + self.timeout

    def overdue(self, now: float) -> Reason | None:
        """The ranks that have not followed the first one to a step within the timeout."""
        if self.clock is None or now < self.clock[0] + self.timeout:
            return None
        step = self.clock[1]
        late = [rank.index for rank in self.members if step not in rank.reached]
        first = next(rank.index for rank in self.members if step in rank.reached)
        names = ", ".join(str(index) for index in late)
        return Reason(rule="run:rank_hung", message=f"rank {names} did not reach {_describe(step)} within "
                      f"{self.timeout:g} s of rank {first}: every rank must ask for each batch (the trainer "
                      "releases batch k to all ranks at once); a rank that stops, or waits in a collective the "
                      "others never join, stalls the run")

    # --- geometry and shards ------------------------------------------------------------------------------------

    def disagreement(self) -> str | None:
        """Where a rank's iter_train_batches call differs from rank 0's, if it does."""
        first = self.members[0].geometry or {}
        for rank in self.members[1:]:
            theirs = rank.geometry or {}
            for name in ("batch_size", "seq_len", "with_logits"):
                if theirs.get(name) != first.get(name):
                    return f"rank {rank.index} asked for {name} {_short(theirs.get(name))}, rank 0 for " \
                           f"{_short(first.get(name))}"
            if rank.layout_digest != self.members[0].layout_digest:
                return f"rank {rank.index}'s model has other parameters or buffers than rank 0's (names, shapes or " \
                       "dtypes)"
            if str(theirs.get("device", "")).split(":")[0] != str(first.get("device", "")).split(":")[0]:
                return f"rank {rank.index} trains on {theirs.get('device')}, rank 0 on {first.get('device')}"
        return None

    def shard(self, chunk: np.ndarray, batch_size: int, seq_len: int, index: int) -> tuple[int, np.ndarray]:
        """Rank `index`'s rows of a batch: (rows, the B/N·(L−1)+1 tokens that unfold into them)."""
        rows = batch_size // self.world_size
        step = seq_len - 1
        return rows, chunk[index * rows * step: (index + 1) * rows * step + 1]


def next_step(batch: int) -> str:
    """The step of asking for batch `batch` (every rank asks for it after its step on the batch before)."""
    return f"next {batch}"


def _describe(step: str) -> str:
    if step.startswith("next "):
        return f"its request for batch {step.removeprefix('next ')}"
    return {"geometry": "ctx.iter_train_batches", "ready": "ctx.iter_train_batches",
            "done": "the end of train(ctx) after the stream ended"}.get(step, step)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
