"""One split's sorted documents → deterministic gzip shards (README, "Locked data").

gzip at level 6 is most of `prepare`'s time, so a thread compresses while the caller builds the next lines
(zlib and sha256 release the GIL); the bytes are the same as compressing line by line."""

from __future__ import annotations

import gzip
import json
import queue
import threading
from pathlib import Path

from prism_ray.data.dataset import file_sha256

GZIP_LEVEL = 6
_BLOCK_BYTES = 256 << 10  # lines travel to the compressor in blocks of about this size
_QUEUE_BLOCKS = 8  # at most this many blocks wait: bounded memory when compression is the slower side
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class ShardWriter:
    """Writes lines in order into shards of about `shard_bytes` of uncompressed JSONL each.

    Use as a context manager; `finish()` returns the shard entries for the manifest."""

    def __init__(self, root: Path, split: str, shard_bytes: int):
        self.root, self.split, self.shard_bytes = root, split, shard_bytes
        self.entries: list[dict] = []
        self._cur: dict | None = None
        self._block: list[bytes] = []
        self._block_bytes = 0
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_BLOCKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._compress, name=f"gzip-{split}", daemon=True)
        self._thread.start()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def write(self, doc_id: str | None, text: str, text_bytes: int) -> None:
        record = {"id": doc_id, "text": text} if doc_id is not None else {"text": text}
        line = (_encode(record) + "\n").encode("utf-8")
        if self._cur is None or self._overflows(len(line)):
            self._end_shard()
            self._cur = {"path": f"{self.split}/{self.split}-{len(self.entries):05d}.jsonl.gz",
                         "documents": 0, "text_bytes": 0, "line_bytes": 0}
            self._queue.put(("open", self._cur["path"]))
        self._block.append(line)
        self._block_bytes += len(line)
        self._cur["line_bytes"] += len(line)
        self._cur["documents"] += 1
        self._cur["text_bytes"] += text_bytes
        if self._block_bytes >= _BLOCK_BYTES:
            self._send_block()

    def _overflows(self, n: int) -> bool:
        """A non-empty shard that would grow past shard_bytes is closed first (a huge line gets its own)."""
        used = self._cur["line_bytes"]
        return used > 0 and used + n > self.shard_bytes

    def _send_block(self) -> None:
        if self._block:
            self._queue.put(("data", b"".join(self._block)))
            self._block, self._block_bytes = [], 0

    def _end_shard(self) -> None:
        if self._cur is not None:
            self._send_block()
            entry = {k: v for k, v in self._cur.items() if k != "line_bytes"}
            self.entries.append(entry)  # sha256 and bytes are filled in by the compressor on close
            self._queue.put(("close", entry))
            self._cur = None

    def finish(self) -> list[dict]:
        self._end_shard()
        self._stop()
        if self._error is not None:
            raise self._error
        return self.entries

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _compress(self) -> None:
        file = gz = None
        while (message := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the writer never blocks; finish() raises
            kind, value = message
            try:
                if kind == "open":
                    (self.root / value).parent.mkdir(parents=True, exist_ok=True)
                    file = open(self.root / value, "wb")
                    # mtime=0 and an empty name keep the gzip header free of time and paths: same input, same bytes
                    gz = gzip.GzipFile(filename="", mode="wb", fileobj=file, compresslevel=GZIP_LEVEL, mtime=0)
                elif kind == "data":
                    gz.write(value)
                else:
                    gz.close()
                    file.close()
                    path = self.root / value["path"]
                    value.update(sha256=file_sha256(path), bytes=path.stat().st_size)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by finish()
                self._error = e
        if file is not None and not file.closed:
            file.close()
