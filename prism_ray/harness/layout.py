"""The layout of the shared model state, planned by the trusted parent without torch: one 64-byte-aligned slot per
unique parameter and buffer, in the order the runners list them (shared_state.py maps and binds them)."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

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
    """Offsets for a layout of [name, shape, dtype]; the total size in bytes. ValueError for a malformed one."""
    slots, offset = [], 0
    for name, shape, dtype in layout:
        if dtype not in ITEMSIZE:
            raise ValueError(f"unknown dtype {dtype!r}")
        nbytes = ITEMSIZE[dtype] * _numel(shape)
        slots.append(Slot(str(name), tuple(int(d) for d in shape), str(dtype), offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    return slots, max(offset, ALIGN)


def _numel(shape: list[int] | tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        if not isinstance(dim, int) or dim < 0:
            raise ValueError(f"bad shape {shape!r}")
        count *= dim
    return count


def new_memfd(name: str, nbytes: int) -> int:
    """A memfd of `nbytes`, sealed at that size: a sandbox that holds it cannot shrink it under a reader's mapping
    (a SIGBUS in the scorer) or grow it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd
