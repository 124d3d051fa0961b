"""The layout of the shared model state, planned by the trusted parent without torch: one 64-byte-aligned slot per
unique parameter and buffer, in the order the runners list them (shared_state.py maps and binds them); and the
layout of a rank's hand-off buffer on its GPU (docs/architecture.md, "The GPU hand-off")."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from prism_ray.graph.format import MAX_DIM, MAX_DIMS

ALIGN = 64
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "complex128": 16, "complex64": 8, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8,
            "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1}


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    offset: int
    nbytes: int


def plan_slots(layout: list[list]) -> tuple[list[Slot], int]:
    """Offsets for a layout of [name, shape, dtype] lists, as a runner sends it (JSON); the total size in bytes.
    ValueError for anything else: the parent compares layouts entry by entry, and a malformed one must not reach it
    (a red team's exporter sent dicts, which unpack into three keys)."""
    if not isinstance(layout, list):
        raise ValueError("a state layout is a list of [name, shape, dtype]")
    slots, offset = [], 0
    for entry in layout:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], list) and isinstance(entry[2], str)):
            raise ValueError(f"a state layout entry is [name, shape, dtype], got {str(entry)[:80]}")
        name, shape, dtype = entry
        if dtype not in ITEMSIZE:
            raise ValueError(f"unknown dtype {dtype!r}")
        nbytes = ITEMSIZE[dtype] * _numel(shape)
        slots.append(Slot(str(name), tuple(int(d) for d in shape), str(dtype), offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    return slots, max(offset, ALIGN)


# A rank's hand-off buffer: two 32-bit words, each written by one side's GPU stream, then the rank's rows of a batch.
STEPPED = 0  # the rank's stream writes n + 1 once its work before its request n has landed
RELEASED = 4  # the scorer's stream writes n + 1 once the rows of request n are in place, after its snapshot
TOKENS = 128  # the rows, int64 [rows, seq_len]


class HandoffSpec(BaseModel):
    """The stream hand-off of a GPU run, as the parent asks for it in SHARE: each rank's rows of one batch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rows: int = Field(ge=1)
    seq_len: int = Field(ge=2)

    @property
    def nbytes(self) -> int:
        return TOKENS + 8 * self.rows * self.seq_len


def _numel(shape: list[int] | tuple[int, ...]) -> int:
    if len(shape) > MAX_DIMS:
        raise ValueError(f"a shape of {len(shape)} dimensions (at most {MAX_DIMS})")
    count = 1
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim < MAX_DIM:
            raise ValueError(f"bad shape {str(shape)[:80]}")
        count *= dim
    return count


def new_memfd(name: str, nbytes: int) -> int:
    """A memfd of `nbytes`, sealed at that size: a sandbox that holds it cannot shrink it under a reader's mapping
    (a SIGBUS in the scorer) or grow it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd
