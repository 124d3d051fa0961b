"""Hash-partitioned spill for `prepare` (docs/operator.md, "Preparing locked data"): memory bounded by one bucket.

Each record goes to an on-disk bucket picked by the leading bits of its sha256 key. Buckets are ranges of keys, so
sorting each bucket alone and reading them in order gives the whole split in canonical order, and equal records
(equal keys) always meet in the same bucket, where they are dropped."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

# (sha256 digest of the key, 0 without id / 1 with, id UTF-8, text UTF-8). Plain tuple order is the canonical
# order `key, id NULLS FIRST, text`: UTF-8 bytes compare like code points.
Record = tuple[bytes, int, bytes, bytes]

KEY_BITS = 64  # buckets are picked by the digest's first 8 bytes
MAX_FANOUT_BITS = 12  # at most 4096 first-level buckets per split; larger ones are split again when drained
_RESPLIT_BITS = 4  # an oversized bucket is re-partitioned 16 ways
_RECORD_OVERHEAD = 200  # bytes of Python objects per buffered record beyond its id and text


def fanout_bits(estimated_bytes: int, bucket_bytes: int) -> int:
    """Bits of key prefix giving buckets of about bucket_bytes each for an input of estimated_bytes."""
    buckets = max(1, -(-estimated_bytes // bucket_bytes))
    return min((buckets - 1).bit_length(), MAX_FANOUT_BITS)


class Spill:
    """Buffers records per (part, bucket) and appends them to bucket files when the buffer fills."""

    def __init__(self, root: Path, part_bits: list[int], buffer_bytes: int, bucket_bytes: int):
        self.root, self.part_bits = root, part_bits
        self.buffer_bytes, self.bucket_bytes = buffer_bytes, bucket_bytes
        self.pending: dict[tuple[int, int, int], list[Record]] = {}
        self.pending_bytes = 0
        root.mkdir(parents=True, exist_ok=True)

    def add(self, part: int, record: Record) -> None:
        self._put(part, self.part_bits[part], record)

    def _put(self, part: int, bits: int, record: Record) -> None:
        index = int.from_bytes(record[0][:8], "big") >> (KEY_BITS - bits)
        self.pending.setdefault((part, bits, index), []).append(record)
        self.pending_bytes += len(record[2]) + len(record[3]) + _RECORD_OVERHEAD
        if self.pending_bytes >= self.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        for (part, bits, index), records in self.pending.items():
            with open(self._path(part, bits, index), "ab") as f:
                pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)
        self.pending.clear()
        self.pending_bytes = 0

    def _path(self, part: int, bits: int, index: int) -> Path:
        return self.root / f"{part}-{bits}-{index:x}.pkl"

    def distinct_sorted(self, part: int) -> Iterator[Record]:
        """The part's distinct records in canonical order, holding one bucket in memory at a time."""
        self.flush()
        bits = self.part_bits[part]
        for index in range(1 << bits):
            yield from self._drain(part, bits, index)

    def _drain(self, part: int, bits: int, index: int, split_again: bool = True) -> Iterator[Record]:
        path = self._path(part, bits, index)
        if not path.exists():
            return
        if split_again and path.stat().st_size > self.bucket_bytes * 3 // 2 and bits + _RESPLIT_BITS <= KEY_BITS:
            # more data than estimated (compressed input, skewed keys): split it by the next key bits
            for chunk in _chunks(path):
                for record in chunk:
                    self._put(part, bits + _RESPLIT_BITS, record)
            self.flush()
            path.unlink()
            children = range(index << _RESPLIT_BITS, (index + 1) << _RESPLIT_BITS)
            # all in one child: most likely a single key (one id with many texts), which no split can divide
            one = sum(self._path(part, bits + _RESPLIT_BITS, c).exists() for c in children) == 1
            for child in children:
                yield from self._drain(part, bits + _RESPLIT_BITS, child, split_again=not one)
            return
        records = [record for chunk in _chunks(path) for record in chunk]
        path.unlink()
        records.sort()
        previous = None
        for record in records:
            if record != previous:
                yield record
            previous = record


def _chunks(path: Path) -> Iterator[list[Record]]:
    with open(path, "rb") as f:
        while True:
            try:
                yield pickle.load(f)  # our own files, written by flush() in this run
            except EOFError:
                return
