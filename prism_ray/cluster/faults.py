"""Whose fault an exception out of a stage is. Miner code runs in the sandbox and ends as a typed report, so an
exception that escapes a stage is prism-ray's or the machine's; these are the operator's side — the disk, the
cache directory, Ray's object store, the store, a node lost — and must never cost the miner an attempt
(docs/operator.md, "Operator faults"). Anything else stays `infra:stage_error`."""

from __future__ import annotations

import errno
import re

from prism_ray.errors import Reason
from prism_ray.store import StoreError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
# numpy's tofile and memmap on a full disk raise OSErrors without an errno
_NO_SPACE_TEXT = re.compile(r"\d+ requested and \d+ written|not enough free space", re.IGNORECASE)

RULES = {
    "infra:disk_full": "a disk on the operator's side is full",
    "infra:unwritable": "a cache or run directory cannot be written",
    "infra:io_error": "a file operation on the operator's side failed",
    "infra:object_lost": "Ray lost an object this attempt needed (its node or its store went away)",
    "infra:node_died": "the node running this attempt died or was cut off from the head",
    "infra:store_write": "the store could not write this attempt's result",
}


def operator_fault(error: BaseException) -> Reason | None:
    """The typed reason when `error` (or what caused it) is an operator-side fault, else None."""
    import duckdb
    from ray.exceptions import NodeDiedError, ObjectLostError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ObjectLostError):
            return _reason("infra:object_lost", seen)
        if isinstance(seen, NodeDiedError):  # dead or unreachable: the same partition a lapsed lease reports
            return _reason("infra:node_died", seen)
        if isinstance(seen, duckdb.Error | StoreError):
            return _reason("infra:store_write", seen)
        if isinstance(seen, OSError):
            if seen.errno in _DISK_FULL or _NO_SPACE_TEXT.search(str(seen)):
                return _reason("infra:disk_full", seen)
            return _reason("infra:unwritable" if seen.errno in _UNWRITABLE else "infra:io_error", seen)
        seen = seen.__cause__
    return None


def _reason(rule: str, error: BaseException) -> Reason:
    said = (str(error).strip().splitlines() or [""])[0][:300]
    return Reason(rule=rule, message=f"{RULES[rule]} ({type(error).__name__}: {said}); this attempt is not charged "
                  "to the miner")


def system_failure(error: BaseException) -> Reason:
    """Another system failure (a worker or node lost, …): `infra:<its kind>`, retried and counted."""
    return Reason(rule=f"infra:{_snake(type(error).__name__)}",
                  message=f"a system failure ended this attempt, it is retried: {str(error)[:500]}")


def _snake(name: str) -> str:
    """NodeDiedError → node_died."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name.removesuffix("Error")).lower()
