"""`prepare` (README, "Locked data"): raw JSONL, JSONL.gz or Parquet → hashed, deterministic train/val/test shards and
their MANIFEST.json. The same input in any order gives byte-identical output."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prism_ray.data.dataset import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SPLITS,
    file_sha256,
    json_object,
    manifest_fingerprint,
    open_lines,
    utf8_ok,
    valid_text,
)
from prism_ray.errors import DataError

_FETCH_ROWS = 1024
_INSERT_BATCH_BYTES = 64 << 20
_INSERT_BATCH_DOCS = 4096
GZIP_LEVEL = 6
STAGING_DIR = ".prepare-staging"


def _normalise_id(value: object) -> tuple[bool, str | None]:
    """(ok, id as str). Any JSON scalar is accepted; objects/arrays/other types make the record invalid."""
    if value is None:
        return True, None
    if isinstance(value, str):
        return utf8_ok(value), value
    if isinstance(value, bool | int | float):
        return True, json.dumps(value)  # same spelling whether it came from JSON or Parquet
    return False, None


def _record(text: object, doc_id: object) -> tuple[str, str | None] | None:
    text = valid_text(text)
    ok, norm_id = _normalise_id(doc_id)
    return (text, norm_id) if text is not None and ok else None


# --------------------------------------------------------------------------------------------- split rule

@dataclass(frozen=True)
class SplitRule:
    """Per-mille buckets of sha256(key) % 1000: [0, train) train, [train, train+val) val, rest test."""

    train: int = 950
    val: int = 25
    test: int = 25

    def __post_init__(self):
        parts = (self.train, self.val, self.test)
        if any(not isinstance(p, int) or p < 0 for p in parts) or sum(parts) != 1000 or self.train < 1:
            raise DataError("data:bad_split_rule",
                            f"split rule {self.train},{self.val},{self.test} must be non-negative per-mille "
                            "parts summing to 1000 with train >= 1")

    @classmethod
    def parse(cls, spec: str) -> SplitRule:
        try:
            train, val, test = (int(p) for p in spec.split(","))
        except ValueError:
            raise DataError("data:bad_split_rule",
                            f"split rule {spec!r} is not TRAIN,VAL,TEST (e.g. 950,25,25)") from None
        return cls(train, val, test)

    def split_index(self, bucket: int) -> int:
        return 0 if bucket < self.train else 1 if bucket < self.train + self.val else 2

    def as_dict(self) -> dict[str, int]:
        return {"train": self.train, "val": self.val, "test": self.test}


# --------------------------------------------------------------------------------------------- prepare

@dataclass
class PrepareSummary:
    out: Path
    fingerprint: str
    documents: dict[str, int]
    text_bytes: dict[str, int]
    shards: dict[str, int]
    skipped_lines: int
    duplicates: int

    def __str__(self) -> str:
        per_split = ", ".join(f"{s}={self.documents[s]} docs/{self.text_bytes[s]} B/{self.shards[s]} shards"
                              for s in SPLITS)
        return (f"{self.out}: {per_split}; skipped {self.skipped_lines} lines, "
                f"{self.duplicates} duplicates; fingerprint {self.fingerprint}")


def _source_files(sources: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(p for p in src.rglob("*") if p.is_file() and _source_kind(p))
            if not found:
                raise DataError("data:not_found", f"no *.jsonl, *.jsonl.gz or *.parquet files under {src}",
                                file=str(src))
            files += found
        elif src.is_file():
            if not _source_kind(src):
                raise DataError("data:bad_source", f"{src.name}: expected *.jsonl, *.jsonl.gz or *.parquet",
                                file=str(src))
            files.append(src)
        else:
            raise DataError("data:not_found", f"source {src} does not exist", file=str(src))
    return files


def _source_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else None


def _jsonl_records(path: Path) -> Iterator[tuple[str, str | None] | None]:
    for raw in open_lines(path):
        obj = json_object(raw)
        yield _record(obj.get("text"), obj.get("id")) if obj is not None else None


def _parquet_records(path: Path) -> Iterator[tuple[str, str | None] | None]:
    import duckdb

    try:
        # its own connection: staging inserts on the other one would cut this open result short
        with duckdb.connect() as con:
            described = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()
            columns = {row[0] for row in described}
            if "text" not in columns:
                raise DataError("data:bad_source", f"{path.name} has no `text` column", file=str(path))
            id_col = '"id"' if "id" in columns else "NULL"
            cur = con.execute(f'SELECT "text", {id_col} FROM read_parquet(?)', [str(path)])
            while rows := cur.fetchmany(_FETCH_ROWS):
                for text, doc_id in rows:
                    yield _record(text, doc_id)
    except duckdb.Error as e:
        raise DataError("data:bad_file", f"cannot read Parquet {path.name}: {e}", file=str(path)) from e


class _Stager:
    """Buffers normalised records and bulk-inserts them into the on-disk DuckDB staging table."""

    def __init__(self, con, rule: SplitRule):
        self.con, self.rule = con, rule
        self.rows: list[tuple[int, str, str | None, str]] = []
        self.pending_bytes = 0
        self.count = 0

    def add(self, text: str, doc_id: str | None) -> None:
        key = hashlib.sha256((doc_id if doc_id is not None else text).encode("utf-8")).hexdigest()
        self.rows.append((self.rule.split_index(int(key, 16) % 1000), key, doc_id, text))
        self.pending_bytes += len(text)
        self.count += 1
        if len(self.rows) >= _INSERT_BATCH_DOCS or self.pending_bytes >= _INSERT_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        split, key, doc_id, text = zip(*self.rows, strict=True)
        # DuckDB scans a dict of numpy arrays directly: one bulk insert, no pandas/pyarrow needed.
        self.con.register("batch", {
            "split": np.array(split, dtype=np.int8), "key": np.array(key, dtype=object),
            "id": np.array(doc_id, dtype=object), "text": np.array(text, dtype=object)})
        self.con.execute("INSERT INTO docs SELECT split, key, id::VARCHAR, text FROM batch")
        self.con.unregister("batch")
        self.rows, self.pending_bytes = [], 0


class _ShardWriter:
    """Writes one split's sorted lines into deterministic gzip shards of about `shard_bytes` each."""

    def __init__(self, root: Path, split: str, shard_bytes: int):
        self.root, self.split, self.shard_bytes = root, split, shard_bytes
        self.entries: list[dict] = []
        self._file = self._gz = None

    def write(self, doc_id: str | None, text: str) -> None:
        record = {"id": doc_id, "text": text} if doc_id is not None else {"text": text}
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        if self._gz is None or self._overflows(len(line)):
            self._close()
            self._open()
        self._gz.write(line)
        self._cur["line_bytes"] += len(line)
        self._cur["documents"] += 1
        self._cur["text_bytes"] += len(text.encode("utf-8"))

    def _overflows(self, n: int) -> bool:
        """A non-empty shard that would grow past shard_bytes is closed first (a huge line gets its own)."""
        used = self._cur["line_bytes"]
        return used > 0 and used + n > self.shard_bytes

    def _open(self) -> None:
        rel = f"{self.split}/{self.split}-{len(self.entries):05d}.jsonl.gz"
        (self.root / self.split).mkdir(parents=True, exist_ok=True)
        self._cur = {"path": rel, "documents": 0, "text_bytes": 0, "line_bytes": 0}
        self._file = open(self.root / rel, "wb")
        # mtime=0 and an empty name keep the gzip header free of time and paths: same input, same bytes.
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, compresslevel=GZIP_LEVEL,
                                 mtime=0)

    def _close(self) -> None:
        if self._gz is None:
            return
        self._gz.close()
        self._file.close()
        path = self.root / self._cur["path"]
        del self._cur["line_bytes"]
        self.entries.append({**self._cur, "sha256": file_sha256(path), "bytes": path.stat().st_size})
        self._file = self._gz = None

    def finish(self) -> list[dict]:
        self._close()
        return self.entries


def prepare(sources: list[Path], out: Path, split_rule: SplitRule = SplitRule(),
            shard_bytes: int = 128 << 20, overwrite: bool = False) -> PrepareSummary:
    """Build a locked dataset in `out` from JSONL / JSONL.gz / Parquet sources (files or directories).

    Output depends only on the multiset of records, never on their order or on the source file order."""
    import duckdb  # only `prepare` needs DuckDB; keep `import prism_ray.data` light for the runner

    if shard_bytes < 1:
        raise DataError("data:bad_shard_size", f"shard size must be positive, got {shard_bytes}")
    files = _source_files(sources)
    out = Path(out)
    _claim_out_dir(out, overwrite)
    staging = out / STAGING_DIR
    staging.mkdir(parents=True)
    try:
        with duckdb.connect(str(staging / "stage.duckdb")) as con:
            manifest = _stage_and_write(con, files, staging, split_rule, shard_bytes)
        for split in SPLITS:
            if (staging / "out" / split).exists():
                (staging / "out" / split).rename(out / split)
        # the manifest goes last: a crash before this leaves no MANIFEST.json claiming partial shards
        (out / MANIFEST_NAME).write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    splits = manifest["splits"]
    return PrepareSummary(out=out, fingerprint=manifest["fingerprint"],
                          documents={s: splits[s]["documents"] for s in SPLITS},
                          text_bytes={s: splits[s]["text_bytes"] for s in SPLITS},
                          shards={s: len(splits[s]["shards"]) for s in SPLITS},
                          skipped_lines=manifest["source"]["skipped_lines"],
                          duplicates=manifest["source"]["duplicates"])


def _stage_and_write(con, files: list[Path], staging: Path, rule: SplitRule, shard_bytes: int) -> dict:
    """Stage every record in DuckDB, then stream each split out in canonical order; returns the manifest."""
    spill = (staging / "spill").as_posix().replace("'", "''")
    con.execute(f"SET temp_directory = '{spill}'")  # spill sorts next to the output, not to a RAM-backed /tmp
    con.execute("CREATE TABLE docs (split TINYINT, key VARCHAR, id VARCHAR, text VARCHAR)")
    stager, skipped = _Stager(con, rule), 0
    for path in files:
        records = _parquet_records(path) if _source_kind(path) == "parquet" else _jsonl_records(path)
        for rec in records:
            if rec is None:
                skipped += 1
            else:
                stager.add(*rec)
    stager.flush()

    splits: dict[str, list[dict]] = {}
    for index, split in enumerate(SPLITS):
        writer = _ShardWriter(staging / "out", split, shard_bytes)
        # (key, id, text) is a total order on distinct records, so the sort is fully deterministic.
        cur = con.execute("SELECT DISTINCT key, id, text FROM docs WHERE split = ? "
                          "ORDER BY key, id NULLS FIRST, text", [index])
        while rows := cur.fetchmany(_FETCH_ROWS):
            for _, doc_id, text in rows:
                writer.write(doc_id, text)
        splits[split] = writer.finish()
    if not splits["train"]:
        raise DataError("data:no_train_split", "no document landed in the train split "
                        f"({stager.count} valid records, {skipped} skipped lines)")
    for split in ("val", "test"):  # a split the rule gives a share must hold something (held-out passes read val)
        if getattr(rule, split) and not splits[split]:
            raise DataError("data:empty_split", f"no document landed in the {split} split ({stager.count} valid "
                            f"records, {skipped} skipped lines, split rule {rule.train},{rule.val},{rule.test}): give "
                            f"more input, or a rule with {split} 0 (--split) if that is what you mean")
    written = sum(e["documents"] for entries in splits.values() for e in entries)
    return build_manifest(rule, splits, skipped_lines=skipped, duplicates=stager.count - written)


def _claim_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError("data:out_exists", f"output {out} exists and is not a directory", file=str(out))
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError("data:out_exists", f"output directory {out} is not empty (use --overwrite)",
                            file=str(out))
        # remove only what prepare writes, so notes such as SOURCE.md survive a regeneration
        for name in (*SPLITS, STAGING_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / MANIFEST_NAME).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def build_manifest(rule: SplitRule, splits: dict[str, list[dict]], skipped_lines: int,
                   duplicates: int) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "split_rule": rule.as_dict(),
        "splits": {s: {"documents": sum(e["documents"] for e in splits[s]),
                       "text_bytes": sum(e["text_bytes"] for e in splits[s]),
                       "shards": splits[s]} for s in SPLITS},
        "source": {"skipped_lines": skipped_lines, "duplicates": duplicates},
        "fingerprint": manifest_fingerprint(splits),
    }
