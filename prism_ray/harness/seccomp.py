"""The sandbox's seccomp filter: the system calls that reach kernel state shared beyond the sandbox are refused.

The kernel's key store is per uid, not per namespace: every as-root sandbox runs as one unprivileged uid, so a key
one run adds (add_key) another run reads back (keyctl) — a red team passed the contract check's batches to the
scored run that way, and it would carry stream text from any run to a later one on the node. These calls answer
EPERM. Programs for other ABIs of the machine (32-bit x86, x32) are refused whole: nothing we run uses them.

The filter is classic BPF in the form bubblewrap's `--seccomp FD` reads (an array of struct sock_filter).
docs/rules.md, "Threat model".
"""

from __future__ import annotations

import errno
import os
import platform
import struct

# per machine: (its AUDIT_ARCH, the numbers of add_key, request_key and keyctl)
_NATIVE = {
    "x86_64": (0xC000003E, (248, 249, 250)),
    "aarch64": (0xC00000B7, (217, 218, 219)),
}
_X32_BIT = 0x40000000  # x86_64's x32 ABI: the same calls under other numbers

_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_NR, _ARCH = 0, 4  # offsets in struct seccomp_data
_ALLOW = 0x7FFF0000
_REFUSE = 0x00050000 | errno.EPERM  # SECCOMP_RET_ERRNO


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(machine: str | None = None) -> bytes | None:
    """The filter for this machine, or None where we have no table for it (the sandbox then runs without one)."""
    machine = machine or platform.machine()
    if machine not in _NATIVE:
        return None
    arch, refused = _NATIVE[machine]
    ops = [_op(_LD_W_ABS, _ARCH), _op(_JEQ_K, arch, jt=1), _op(_RET_K, _REFUSE), _op(_LD_W_ABS, _NR)]
    if machine == "x86_64":
        ops.append(_op(_JGE_K, _X32_BIT, jf=1))
        ops.append(_op(_RET_K, _REFUSE))
    for index, number in enumerate(refused):
        # equal: jump to the REFUSE after the remaining checks and the ALLOW
        ops.append(_op(_JEQ_K, number, jt=len(refused) - index))
    ops += [_op(_RET_K, _ALLOW), _op(_RET_K, _REFUSE)]
    return b"".join(ops)


def program_fd() -> int | None:
    """A descriptor holding the filter, at offset 0, for `bwrap --seccomp FD` (the caller closes it)."""
    filter_bytes = program()
    if filter_bytes is None:
        return None
    fd = os.memfd_create("prism-seccomp", os.MFD_CLOEXEC)
    os.write(fd, filter_bytes)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
