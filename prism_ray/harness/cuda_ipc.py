"""GPU memory shared between sandboxes: CUDA virtual memory exported as a file descriptor.

The scorer and the trainer live in separate PID namespaces, which legacy CUDA IPC handles (cudaIpcGetMemHandle)
cannot cross. The driver's virtual-memory API can: the owner creates an allocation whose shareable handle is a POSIX
file descriptor, the parent passes that descriptor over the runners' sockets (SCM_RIGHTS, like the CPU memfd), and
the peer imports and maps it. Each exported buffer is an allocation of its own, so a peer never reaches any other
memory of the owner. Only harness code calls this; miner code cannot (ctypes is outside the static policy).
"""

from __future__ import annotations

import ctypes

import torch

_POSIX_FD = 1  # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
_ON_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE
_READ_WRITE = 3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class CudaIpcError(RuntimeError):
    pass


_driver: ctypes.CDLL | None = None


def driver() -> ctypes.CDLL:
    """The CUDA driver, opened on first use: a CPU node never loads it."""
    global _driver
    if _driver is None:
        try:
            library = ctypes.CDLL("libcuda.so.1")
        except OSError as error:
            raise CudaIpcError(f"no CUDA driver on this node: {error}") from None
        u64, u64p = ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)
        signatures = {
            "cuCtxGetDevice": [ctypes.POINTER(ctypes.c_int)],
            "cuMemGetAllocationGranularity": [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(_AllocationProp),
                                              ctypes.c_int],
            "cuMemCreate": [u64p, ctypes.c_size_t, ctypes.POINTER(_AllocationProp), u64],
            "cuMemAddressReserve": [u64p, ctypes.c_size_t, ctypes.c_size_t, u64, u64],
            "cuMemMap": [u64, ctypes.c_size_t, ctypes.c_size_t, u64, u64],
            "cuMemSetAccess": [u64, ctypes.c_size_t, ctypes.POINTER(_AccessDesc), ctypes.c_size_t],
            "cuMemExportToShareableHandle": [ctypes.c_void_p, u64, ctypes.c_int, u64],
            "cuMemImportFromShareableHandle": [u64p, ctypes.c_void_p, ctypes.c_int],
        }
        for name, argtypes in signatures.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = ctypes.c_int
        _driver = library
    return _driver


def _check(status: int, call: str) -> None:
    if status != 0:
        raise CudaIpcError(f"{call} failed with CUDA driver error {status}")


class _DeviceArray:
    """Just enough of `__cuda_array_interface__` for torch.as_tensor to wrap a raw pointer."""

    def __init__(self, pointer: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (pointer, False),
                                         "version": 3, "strides": None}


def _location(device: torch.device) -> tuple[_Location, _AllocationProp]:
    torch.cuda.init()
    torch.empty(1, device=device)  # makes the device's primary context current on this thread
    ordinal = ctypes.c_int()
    _check(driver().cuCtxGetDevice(ctypes.byref(ordinal)), "cuCtxGetDevice")
    location = _Location(_ON_DEVICE, ordinal.value)
    return location, _AllocationProp(type=_PINNED, requestedHandleTypes=_POSIX_FD, location=location)


def _map(handle: int, nbytes: int, device: torch.device) -> torch.Tensor:
    location, prop = _location(device)
    granularity = ctypes.c_size_t()
    _check(driver().cuMemGetAllocationGranularity(ctypes.byref(granularity), ctypes.byref(prop), 0),
           "cuMemGetAllocationGranularity")
    size = _rounded(nbytes, granularity.value)
    pointer = ctypes.c_uint64()
    _check(driver().cuMemAddressReserve(ctypes.byref(pointer), size, 0, 0, 0), "cuMemAddressReserve")
    _check(driver().cuMemMap(pointer.value, size, 0, handle, 0), "cuMemMap")
    access = _AccessDesc(location, _READ_WRITE)
    _check(driver().cuMemSetAccess(pointer.value, size, ctypes.byref(access), 1), "cuMemSetAccess")
    return torch.as_tensor(_DeviceArray(pointer.value, nbytes), device=device)


def _rounded(nbytes: int, granularity: int) -> int:
    return max(1, -(-nbytes // granularity)) * granularity


def allocate(nbytes: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """A zeroed uint8 CUDA tensor in an allocation of its own, and the file descriptor that shares it (never freed
    before the process exits). Zeroed whole, to the allocation's rounded size: a peer can map all of it, and fresh
    device memory is not promised to be clean."""
    _, prop = _location(device)
    granularity = ctypes.c_size_t()
    _check(driver().cuMemGetAllocationGranularity(ctypes.byref(granularity), ctypes.byref(prop), 0),
           "cuMemGetAllocationGranularity")
    handle = ctypes.c_uint64()
    _check(driver().cuMemCreate(ctypes.byref(handle), _rounded(nbytes, granularity.value), ctypes.byref(prop), 0),
           "cuMemCreate")
    fd = ctypes.c_int(-1)
    _check(driver().cuMemExportToShareableHandle(ctypes.byref(fd), handle.value, _POSIX_FD, 0),
           "cuMemExportToShareableHandle")
    mapped = _map(handle.value, nbytes, device)
    torch.as_tensor(_DeviceArray(mapped.data_ptr(), _rounded(nbytes, granularity.value)), device=device).zero_()
    return mapped, fd.value


def open_fd(fd: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 CUDA tensor over an allocation another process shared as `fd`."""
    handle = ctypes.c_uint64()
    _check(driver().cuMemImportFromShareableHandle(ctypes.byref(handle), ctypes.c_void_p(fd), _POSIX_FD),
           "cuMemImportFromShareableHandle")
    return _map(handle.value, nbytes, device)
