"""What `prism-ray serve` and `demo` check before starting Ray, so a state dir that cannot work ends the command in
seconds with one line saying what to do, instead of Ray tracebacks (docs/operator.md, "Liveness and failures"):
the directory is writable, its disk is above the floor, the store file is not held by another server, and every
block of it reads back."""

from __future__ import annotations

import errno
import re
import shutil
import tempfile
from pathlib import Path

from prism_ray.config import Settings
from prism_ray.store import Store, StoreLocked


class StartupError(Exception):
    """One line: what is wrong and what to do."""


def store_file(settings: Settings) -> Path:
    return settings.cluster.store_path or settings.cache_dir / "prism.duckdb"


def check_state(settings: Settings) -> None:
    """Raise StartupError when this state dir cannot run a server; returns in well under a second on a sound one
    (plus one read of the store file)."""
    path = store_file(settings)
    for directory in dict.fromkeys((path.parent, settings.cache_dir)):
        _writable(directory)
        _above_floor(directory, settings.cluster.min_free_bytes)
    check_store(path)


def check_store(path: Path) -> None:
    """The file opens for writing (no other process holds it) and every block reads back with its checksum."""
    try:
        store = Store(path)
    except StoreLocked as error:
        holder = re.search(r"PID \d+", str(error))
        raise StartupError(f"the store {path} is in use by another process{f' ({holder.group(0)})' if holder else ''}"
                           ": another `prism-ray serve` runs on this state dir; stop it, or give this one its own "
                           "--state-dir") from None
    except Exception as error:
        raise _damaged(path, error) from None
    try:
        store.check_integrity()
    except Exception as error:
        raise _damaged(path, error) from None
    finally:
        store.close()


def _damaged(path: Path, error: Exception) -> StartupError:
    said = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return StartupError(f"the store {path} is damaged ({said}): restore it from your last `prism-ray export` "
                        "(docs/store.md), or move it aside to start with an empty store; `prism-ray check-store "
                        f"{path}` checks a file")


def _writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".prism-write-check-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise StartupError(f"the disk of {directory} is full: free space there, or give --state-dir a "
                               "directory on another disk") from None
        raise StartupError(f"cannot write to {directory} ({error.strerror}): give --state-dir a writable "
                           "directory, or fix its permissions") from None


def _above_floor(directory: Path, floor: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < floor:
        raise StartupError(f"the disk of {directory} has {free:,} bytes free, below the floor of {floor:,} "
                           "(PRISM_CLUSTER_MIN_FREE_BYTES): free space there (old run dirs under runs/ can go), "
                           "or lower the floor")
