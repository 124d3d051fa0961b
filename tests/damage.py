"""A real DuckDB store file, seeded and then damaged: one block overwritten with random bytes (test_store_failure,
test_startup)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from api_helpers import bundle_zip, fake_result
from prism_ray.intake.bundle import load_bundle
from prism_ray.store import Store

BLOCK = 262_144  # DuckDB's block size; the file starts with three 4 KiB headers
HEADERS = 3 * 4096


def seeded(path: Path) -> list[str]:
    """Five submissions, three of them scored with a curve; their ids."""
    with Store(path) as store:
        for i in range(5):
            zipped = bundle_zip(f"seed-{i}")
            store.create_submission(f"hotkey-{i}", "seed.zip", load_bundle(zipped), None, zipped)
        ids = []
        for record in store.claim_next("seed", 60, 3):
            store.complete(record.id, "seed", fake_result(record.id))
            ids.append(record.id)
        return ids


def damaged(original: Path, into: Path, fails: Callable[[Store], object]) -> Path:
    """A copy of `original` with one block overwritten by random bytes, chosen so that the file still opens but
    `fails(store)` raises: the first such block from the start of the file."""
    blocks = (original.stat().st_size - HEADERS) // BLOCK
    for block in range(blocks + 1):
        copy = into / f"damaged-{block}.duckdb"
        shutil.copy(original, copy)
        with copy.open("r+b") as file:
            file.seek(HEADERS + block * BLOCK + 64)
            file.write(os.urandom(BLOCK - 128))
        try:
            store = Store(copy)
        except Exception:
            continue  # the catalog itself is gone: that is the start-up check's case
        try:
            fails(store)
        except Exception:
            return copy
        finally:
            store.close()
    raise AssertionError("no damaged block made the store fail")
