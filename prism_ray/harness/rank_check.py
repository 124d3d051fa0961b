"""The trusted scorer's check that every trainer rank holds rank 0's weights (docs/architecture.md, "Several ranks").

Rank 0's snapshot is the one scored; the others must be byte for byte the same at every snapshot the parent marks
(every one on CPU; on a GPU a random one in eight, the first and the end of the stream). The comparison runs here,
in the scorer, which runs no miner code: a rank cannot answer for itself.
"""

from __future__ import annotations

import torch

from prism_ray.harness import layout, shared_state


class RankCheck:
    def __init__(self, ranks: list[torch.Tensor], slots: list[layout.Slot]):
        self.ranks, self.slots = ranks, slots
        self.agreed: str | None = None  # the last snapshot at which every rank agreed

    def differs(self, private: torch.Tensor, when: str) -> str | None:
        """A message naming the first rank and tensor that differ from rank 0's snapshot `private`, or None."""
        for rank, theirs in enumerate(self.ranks[1:], start=1):
            copy = theirs.to(private.device) if theirs.device != private.device else theirs.clone()
            if torch.equal(copy, private):
                continue
            name = first_difference(private, copy, self.slots)
            since = f"they last agreed at {self.agreed}" if self.agreed else "they never agreed at a checked snapshot"
            return (f"rank {rank}'s `{name}` differs from rank 0's at {when} ({since}): every rank must hold the "
                    "same weights, as DDP keeps them — average the gradients across ranks (DistributedDataParallel, "
                    "or dist.all_reduce of every gradient divided by ctx.world_size) before each optimizer step")
        self.agreed = when
        return None


def first_difference(mine: torch.Tensor, theirs: torch.Tensor, slots: list[layout.Slot]) -> str:
    """The first slot whose bytes differ between two flat state buffers."""
    for slot, a, b in zip(slots, shared_state.views(mine, slots), shared_state.views(theirs, slots), strict=True):
        if not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            return slot.name
    return "(padding)"
