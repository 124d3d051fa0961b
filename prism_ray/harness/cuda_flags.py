"""CUDA stream memory operations: a stream writes a 32-bit word in device memory, or waits until one reaches a value.

The GPU hand-off orders the scorer's GPU work and a trainer rank's through such words in memory both processes map
(docs/architecture.md, "The GPU hand-off"): CUDA events cannot cross the sandboxes' PID namespaces, a word in a
shared allocation can. The driver is opened on first use, so a CPU node never loads libcuda. Not run on a machine
without a GPU.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from prism_ray.harness.cuda_ipc import CudaIpcError, driver

_WAIT_GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ: until (int32)(*word − value) ≥ 0, a comparison that survives wrap-around
_WRITE_FENCED = 0  # CU_STREAM_WRITE_VALUE_DEFAULT: a memory fence first, so the stream's earlier writes land before it
_HINT = ("the GPU hand-off (PRISM_GPU_HANDOFF=stream) needs cuStreamWaitValue32_v2 (drivers of CUDA 11.7 or later) or "
         "a driver loaded with NVreg_EnableStreamMemOPs=1; set PRISM_GPU_HANDOFF=host on this node")


@dataclass(frozen=True)
class MemOps:
    wait: Any  # cuStreamWaitValue32(stream, address, value, flags)
    write: Any  # cuStreamWriteValue32(stream, address, value, flags)


def bind(library: Any) -> MemOps:
    """The `_v2` entry points where the driver has them (enabled on every platform), else the unsuffixed ones (v1,
    which the driver enables only with NVreg_EnableStreamMemOPs=1: a call then fails with the hint)."""
    for suffix in ("_v2", ""):
        wait = getattr(library, f"cuStreamWaitValue32{suffix}", None)
        write = getattr(library, f"cuStreamWriteValue32{suffix}", None)
        if wait is None or write is None:
            continue
        for function in (wait, write):
            function.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            function.restype = ctypes.c_int
        return MemOps(wait, write)
    raise CudaIpcError(f"the CUDA driver has no cuStreamWaitValue32: {_HINT}")


_bound: MemOps | None = None


def _ops() -> MemOps:
    global _bound
    if _bound is None:
        _bound = bind(driver())
    return _bound


def wait_geq(stream: int, address: int, value: int) -> None:
    """Work enqueued on `stream` after this runs once the word at `address` has reached `value`."""
    _check(_ops().wait(stream, address, value & 0xFFFFFFFF, _WAIT_GEQ), "cuStreamWaitValue32")


def write(stream: int, address: int, value: int) -> None:
    """`stream` writes `value` to the word at `address` once its earlier work has landed."""
    _check(_ops().write(stream, address, value & 0xFFFFFFFF, _WRITE_FENCED), "cuStreamWriteValue32")


def _check(status: int, call: str) -> None:
    if status != 0:
        raise CudaIpcError(f"{call} failed with CUDA driver error {status}: {_HINT}")
