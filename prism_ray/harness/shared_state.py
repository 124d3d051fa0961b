"""The model state the trainer writes and the scorer reads: one flat buffer, zero-copy on both sides.

Every unique parameter and buffer of a model gets a slot (64-byte aligned) in one flat byte buffer; `bind` points
each tensor's `.data` at its slot, so the miner's optimizer, which holds the Parameter objects, writes straight into
the buffer. On CPU the buffer is a memfd that the trusted parent creates and hands to both sandboxes over their
sockets; on CUDA it is a scorer-owned virtual-memory allocation shared the same way, as a descriptor (cuda_ipc.py). The
scorer never scores the shared buffer itself: it copies it into private memory (a snapshot) before the trainer may
see the next batch (docs/architecture.md, "Trust boundaries").
"""

from __future__ import annotations

import mmap
import warnings

import torch

from prism_ray.harness.layout import Slot


def state_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every unique parameter then every unique buffer, in registration order (tied weights appear once)."""
    seen: set[int] = set()
    tensors = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append((name, tensor))
    return tensors


def layout_of(model: torch.nn.Module) -> list[list]:
    """[name, shape, dtype] of each state tensor: what the parent compares and sizes the buffer from."""
    return [[name, list(tensor.shape), dtype_name(tensor.dtype)] for name, tensor in state_tensors(model)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def views(flat: torch.Tensor, slots: list[Slot]) -> list[torch.Tensor]:
    """Typed, shaped views of each slot of a flat uint8 tensor."""
    out = []
    for slot in slots:
        raw = flat.narrow(0, slot.offset, slot.nbytes)
        out.append(raw.view(getattr(torch, slot.dtype)).view(slot.shape))
    return out


def bind(model: torch.nn.Module, slots: list[Slot], flat: torch.Tensor, copy: bool = True) -> None:
    """Point every state tensor of `model` at its slot (copying its current values in when `copy`)."""
    with torch.no_grad():
        for (_, tensor), view in zip(state_tensors(model), views(flat, slots), strict=True):
            if copy:
                view.copy_(tensor)
            tensor.data = view


def bound(model: torch.nn.Module, slots: list[Slot], flat: torch.Tensor) -> str | None:
    """The first state tensor that no longer lives in its slot (reallocated by the trainer), or None."""
    base = flat.data_ptr()
    for (name, tensor), slot in zip(state_tensors(model), slots, strict=True):
        moved = tensor.numel() > 0 and tensor.data_ptr() != base + slot.offset  # an empty tensor's address is 0
        if moved or tuple(tensor.shape) != slot.shape:
            return name
    return None


def map_memfd(fd: int, nbytes: int, writable: bool) -> torch.Tensor:
    """A uint8 tensor over a shared memfd mapping (kept alive by the tensor)."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=prot)
    with warnings.catch_warnings():  # a read-only mapping: the scorer only ever copies out of it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes)
