"""A real small filesystem for disk-full and read-only tests: a tmpfs mounted with `size=` (and `ro`), as root."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def small_filesystem(path: Path, size: str, readonly: bool = False) -> Iterator[Path]:
    """`path` as the mount point of a tmpfs of `size` bytes (e.g. "4m"); unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, capture_output=True)


def fill(path: Path) -> None:
    """Write zeros into `path` until its filesystem is full."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 65536):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def resize(path: Path, size: str) -> None:
    """Give the tmpfs at `path` a new size (the operator freed space)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)
