"""Reach verdicts kept on disk, so that a check in a fresh process need not import torch to walk it again.

What an origin reaches depends only on the installed packages, the Python build and the policy's own tables, so the
verdicts are stored in a file named by a fingerprint of those three (each `*.dist-info` name carries its version):
an upgrade, a new package or an edited table starts a new file and nothing stale is ever read. The file lives in the
operator's cache dir, which no sandbox can see. A miss is walked for real and added (docs/rules.md, "What a bundle
may import").
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

_MAX_ENTRIES = 200_000  # a file past this is started afresh rather than grown without end


@functools.cache
def fingerprint() -> str:
    digest = hashlib.sha256(sys.version.encode())
    for entry in sys.path:
        try:
            names = sorted(name for name in os.listdir(entry) if name.endswith((".dist-info", ".egg-info")))
        except OSError:  # a zip, or a path that does not exist
            continue
        digest.update(f"\0{entry}\0{','.join(names)}".encode())
    for table in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(table.read_bytes())
    return digest.hexdigest()[:24]


class Remembered:
    """Verdicts by key for this environment: loaded once per directory, saved when something was added."""

    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}
        self.path: Path | None = None
        self.added = False
        self.lock = threading.Lock()  # checks may run in several threads of one process

    def open(self, directory: Path) -> None:
        path = directory / f"reach-{fingerprint()}.json"
        if path == self.path:
            return
        self.save()
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: walked again
            loaded = {}
        with self.lock:  # each file holds only what was walked for it
            self.path, self.entries = path, loaded if isinstance(loaded, dict) else {}

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        with self.lock:
            if len(self.entries) >= _MAX_ENTRIES:
                self.entries.clear()
            self.entries[key] = value
            self.added = True

    def save(self) -> None:
        """Written whole to a temporary file and renamed: a reader never sees half a file."""
        with self.lock:
            if self.path is None or not self.added:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".reach-")
            with os.fdopen(handle, "w") as out:
                json.dump(self.entries, out)
            os.replace(temporary, self.path)
            self.added = False
