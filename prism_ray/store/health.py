"""Is the store really usable: a read and a committed write (the probe), every block of every table read back with
its checksum (the integrity check, at start-up) and the free disk next to the file (docs/operator.md, "Liveness and
failures"). DuckDB verifies checksums only when it reads a block, so a damaged file looks healthy until then."""

from __future__ import annotations

import shutil
from pathlib import Path

from prism_ray.store.db import Db

PROBE_HOTKEY = "__health_probe__"  # a nonce row no signed request uses: signed hotkeys are ss58 addresses


def probe(db: Db) -> None:
    """One read and one committed write; raises whatever DuckDB raises."""
    with db.transaction() as con:
        con.execute("SELECT max(seq) FROM submissions").fetchall()
        con.execute("DELETE FROM nonces WHERE hotkey = ?", [PROBE_HOTKEY])
        con.execute("INSERT INTO nonces VALUES (?, 'probe', ?)", [PROBE_HOTKEY, db.clock()])


def check_integrity(db: Db, tables: tuple[str, ...]) -> None:
    """Read every column of every row (a hash of each column), so every block's checksum is verified."""
    for table in tables:
        db.execute(f"SELECT count(*), sum(hash(COLUMNS(*))) FROM {table}").fetchall()


def free_bytes(path: Path | str) -> int:
    """Free bytes, for an unprivileged writer, on the filesystem that holds `path`'s directory."""
    return shutil.disk_usage(Path(path).parent).free
