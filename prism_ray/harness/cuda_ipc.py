"""CUDA IPC through the driver API: one process exports device memory, another maps it zero-copy.

torch.multiprocessing's CUDA sharing needs a /dev/shm and a /tmp common to both processes; the scorer and the
trainer run in separate sandboxes that share neither, so this uses the driver calls directly: the owner sends the
64-byte handle of the allocation (and the offset of its tensor in it) over the parent's sockets, the peer opens it
and wraps the pointer with `__cuda_array_interface__`. Only harness code calls this; miner code cannot (ctypes is
outside the static policy).
"""

from __future__ import annotations

import ctypes

import torch

_HANDLE_BYTES = 64


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * _HANDLE_BYTES)]


class CudaIpcError(RuntimeError):
    pass


_driver: ctypes.CDLL | None = None


def _cuda() -> ctypes.CDLL:
    global _driver
    if _driver is None:
        driver = ctypes.CDLL("libcuda.so.1")
        u64p = ctypes.POINTER(ctypes.c_uint64)
        _symbol(driver, "cuMemGetAddressRange", [u64p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64])
        _symbol(driver, "cuIpcGetMemHandle", [ctypes.POINTER(_Handle), ctypes.c_uint64])
        _symbol(driver, "cuIpcOpenMemHandle", [u64p, _Handle, ctypes.c_uint])
        _symbol(driver, "cuMemAlloc", [u64p, ctypes.c_size_t])
        _driver = driver
    return _driver


def _symbol(driver: ctypes.CDLL, name: str, argtypes: list) -> None:
    """Bind `name` to the newest ABI the driver exports (`_v2` where one exists)."""
    function = getattr(driver, f"{name}_v2", None) or getattr(driver, name)
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    setattr(driver, f"prism_{name}", function)


def _check(status: int, call: str) -> None:
    if status != 0:
        raise CudaIpcError(f"{call} failed with CUDA driver error {status}")


def allocate(nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 CUDA tensor in an allocation of its own (never freed before the process exits).

    Exporting an allocation exports all of it: memory from torch's caching allocator can share its allocation with
    other tensors (the scorer's private snapshot), which the peer must never reach.
    """
    _current_context(device)
    pointer = ctypes.c_uint64()
    _check(_cuda().prism_cuMemAlloc(ctypes.byref(pointer), max(nbytes, 1)), "cuMemAlloc")
    return torch.as_tensor(_DeviceArray(pointer.value, nbytes), device=device)


def _current_context(device: torch.device) -> None:
    torch.cuda.init()
    torch.empty(1, device=device)  # makes the device's primary context current on this thread


def export(tensor: torch.Tensor) -> bytes:
    """Handle + offset of a CUDA tensor's memory, for `open_handle` in another process."""
    pointer = ctypes.c_uint64(tensor.data_ptr())
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    _check(_cuda().prism_cuMemGetAddressRange(ctypes.byref(base), ctypes.byref(size), pointer), "cuMemGetAddressRange")
    handle = _Handle()
    _check(_cuda().prism_cuIpcGetMemHandle(ctypes.byref(handle), base), "cuIpcGetMemHandle")
    return bytes(handle.reserved) + (tensor.data_ptr() - base.value).to_bytes(8, "little")


class _DeviceArray:
    """Just enough of `__cuda_array_interface__` for torch.as_tensor to wrap a raw pointer."""

    def __init__(self, pointer: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (pointer, False),
                                         "version": 3, "strides": None}


def open_handle(blob: bytes, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 CUDA tensor over memory another process exported (valid while that process keeps it)."""
    if len(blob) != _HANDLE_BYTES + 8:
        raise CudaIpcError("malformed CUDA IPC handle")
    _current_context(device)
    handle = _Handle()
    handle.reserved = blob[:_HANDLE_BYTES]
    pointer = ctypes.c_uint64()
    lazy_peer_access = 1
    _check(_cuda().prism_cuIpcOpenMemHandle(ctypes.byref(pointer), handle, lazy_peer_access), "cuIpcOpenMemHandle")
    offset = int.from_bytes(blob[_HANDLE_BYTES:], "little")
    return torch.as_tensor(_DeviceArray(pointer.value + offset, nbytes), device=device)
