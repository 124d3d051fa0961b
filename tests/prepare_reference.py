"""The `prepare` algorithm before bounded memory (commit 50401b2), kept as the oracle the new one must match byte
for byte: every record staged in DuckDB, then `SELECT DISTINCT … ORDER BY key, id NULLS FIRST, text` per split,
written line by line into gzip shards. Only the split rule, source listing and manifest are shared."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import duckdb
import numpy as np

from prism_ray.data.dataset import MANIFEST_NAME, SPLITS, file_sha256, json_object, open_lines, utf8_ok, valid_text
from prism_ray.data.preparation import SplitRule, _source_files, _source_kind, build_manifest


def _normalise_id(value):
    if value is None:
        return True, None
    if isinstance(value, str):
        return utf8_ok(value), value
    if isinstance(value, bool | int | float):
        return True, json.dumps(value)
    return False, None


def _record(text, doc_id):
    text = valid_text(text)
    ok, norm_id = _normalise_id(doc_id)
    return (text, norm_id) if text is not None and ok else None


def _records(path: Path):
    if _source_kind(path) != "parquet":
        for raw in open_lines(path):
            obj = json_object(raw)
            yield _record(obj.get("text"), obj.get("id")) if obj is not None else None
        return
    with duckdb.connect() as con:
        columns = {row[0] for row in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()}
        id_col = '"id"' if "id" in columns else "NULL"
        for text, doc_id in con.execute(f'SELECT "text", {id_col} FROM read_parquet(?)', [str(path)]).fetchall():
            yield _record(text, doc_id)


class _ShardWriter:
    def __init__(self, root: Path, split: str, shard_bytes: int):
        self.root, self.split, self.shard_bytes = root, split, shard_bytes
        self.entries: list[dict] = []
        self._file = self._gz = None

    def write(self, doc_id, text):
        record = {"id": doc_id, "text": text} if doc_id is not None else {"text": text}
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        if self._gz is None or (self._cur["line_bytes"] > 0 and self._cur["line_bytes"] + len(line) > self.shard_bytes):
            self._close()
            rel = f"{self.split}/{self.split}-{len(self.entries):05d}.jsonl.gz"
            (self.root / self.split).mkdir(parents=True, exist_ok=True)
            self._cur = {"path": rel, "documents": 0, "text_bytes": 0, "line_bytes": 0}
            self._file = open(self.root / rel, "wb")
            self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, compresslevel=6, mtime=0)
        self._gz.write(line)
        self._cur["line_bytes"] += len(line)
        self._cur["documents"] += 1
        self._cur["text_bytes"] += len(text.encode("utf-8"))

    def _close(self):
        if self._gz is None:
            return
        self._gz.close()
        self._file.close()
        path = self.root / self._cur["path"]
        del self._cur["line_bytes"]
        self.entries.append({**self._cur, "sha256": file_sha256(path), "bytes": path.stat().st_size})
        self._file = self._gz = None

    def finish(self):
        self._close()
        return self.entries


def reference_prepare(sources: list[Path], out: Path, rule: SplitRule, shard_bytes: int = 128 << 20) -> None:
    out.mkdir(parents=True)
    rows, skipped = [], 0
    for path in _source_files(sources):
        for rec in _records(path):
            if rec is None:
                skipped += 1
                continue
            text, doc_id = rec
            key = hashlib.sha256((doc_id if doc_id is not None else text).encode("utf-8")).hexdigest()
            rows.append((rule.split_index(int(key, 16) % 1000), key, doc_id, text))
    with duckdb.connect() as con:
        con.execute("CREATE TABLE docs (split TINYINT, key VARCHAR, id VARCHAR, text VARCHAR)")
        split, key, doc_id, text = zip(*rows, strict=True)
        con.register("batch", {"split": np.array(split, dtype=np.int8), "key": np.array(key, dtype=object),
                               "id": np.array(doc_id, dtype=object), "text": np.array(text, dtype=object)})
        con.execute("INSERT INTO docs SELECT split, key, id::VARCHAR, text FROM batch")
        splits = {}
        for index, name in enumerate(SPLITS):
            writer = _ShardWriter(out, name, shard_bytes)
            for _, doc_id, text in con.execute("SELECT DISTINCT key, id, text FROM docs WHERE split = ? "
                                               "ORDER BY key, id NULLS FIRST, text", [index]).fetchall():
                writer.write(doc_id, text)
            splits[name] = writer.finish()
    written = sum(e["documents"] for entries in splits.values() for e in entries)
    manifest = build_manifest(rule, splits, skipped_lines=skipped, duplicates=len(rows) - written)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
