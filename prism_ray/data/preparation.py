"""`prepare` (README, "Locked data"): raw JSONL, JSONL.gz or Parquet → hashed, deterministic train/val/test shards and
their MANIFEST.json. The same input in any order gives byte-identical output, in memory that does not grow with the
input (docs/operator.md, "Preparing locked data")."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prism_ray.data.buckets import Spill, fanout_bits
from prism_ray.data.dataset import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SPLITS,
    json_object,
    manifest_fingerprint,
    open_lines,
)
from prism_ray.data.shard_writer import ShardWriter
from prism_ray.errors import DataError

_FETCH_ROWS = 1024
STAGING_DIR = ".prepare-staging"
DEFAULT_MEMORY_MB = 256
_BUCKET_SHARE = 8  # the spill buffer and the bucket being sorted each hold about memory / 8 of documents
_COMPRESSED_RATIO = 4  # estimated text bytes per byte of .jsonl.gz / Parquet, to size the buckets up front


def _normalise_id(value: object) -> tuple[bool, str | None]:
    """(ok, id as str). Any JSON scalar is accepted; objects/arrays/other types make the record invalid."""
    if value is None or isinstance(value, str):
        return True, value
    if isinstance(value, bool | int | float):
        return True, json.dumps(value)  # same spelling whether it came from JSON or Parquet
    return False, None


def _record(text: object, doc_id: object) -> tuple[bytes, bytes | None] | None:
    """(text, id) as UTF-8 if this is a document (non-empty string text, scalar id), else None."""
    ok, norm_id = _normalise_id(doc_id)
    if not ok or not isinstance(text, str) or not text:
        return None
    try:  # lone surrogates from "\ud800" escapes have no UTF-8 bytes
        return text.encode("utf-8"), None if norm_id is None else norm_id.encode("utf-8")
    except UnicodeEncodeError:
        return None


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


def _jsonl_records(path: Path) -> Iterator[tuple[bytes, bytes | None] | None]:
    for raw in open_lines(path):
        obj = json_object(raw)
        yield _record(obj.get("text"), obj.get("id")) if obj is not None else None


def _parquet_records(path: Path) -> Iterator[tuple[bytes, bytes | None] | None]:
    import duckdb

    try:
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


def prepare(sources: list[Path], out: Path, split_rule: SplitRule = SplitRule(),
            shard_bytes: int = 128 << 20, overwrite: bool = False,
            memory_mb: int = DEFAULT_MEMORY_MB) -> PrepareSummary:
    """Build a locked dataset in `out` from JSONL / JSONL.gz / Parquet sources (files or directories).

    Output depends only on the multiset of records, never on their order or on the source file order.
    `memory_mb` bounds the documents held at once: a spill buffer, then one bucket being sorted."""
    if shard_bytes < 1:
        raise DataError("data:bad_shard_size", f"shard size must be positive, got {shard_bytes}")
    if memory_mb < 16:
        raise DataError("data:bad_memory", f"memory budget must be at least 16 MiB, got {memory_mb}")
    files = _source_files(sources)
    out = Path(out)
    _claim_out_dir(out, overwrite)
    staging = out / STAGING_DIR
    staging.mkdir(parents=True)
    try:
        try:
            manifest = _spill_and_write(files, staging, split_rule, shard_bytes, (memory_mb << 20) // _BUCKET_SHARE)
        except OSError as e:  # sources are read through DataError already: this is the staging or output disk
            raise DataError("data:write_failed", f"cannot write under {out}: {e}", file=str(out)) from e
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


def _spill_and_write(files: list[Path], staging: Path, rule: SplitRule, shard_bytes: int, bucket_bytes: int) -> dict:
    """Spill every record into per-split hash buckets, then write each split out bucket by bucket in canonical
    order (sha256 key, id with no id first, text); returns the manifest."""
    estimate = sum(p.stat().st_size * (1 if p.name.lower().endswith(".jsonl") else _COMPRESSED_RATIO)
                   for p in files)
    shares = (rule.train, rule.val, rule.test)
    spill = Spill(staging / "buckets", [fanout_bits(estimate * share // 1000, bucket_bytes) for share in shares],
                  buffer_bytes=bucket_bytes, bucket_bytes=bucket_bytes)
    valid = skipped = 0
    for path in files:
        records = _parquet_records(path) if _source_kind(path) == "parquet" else _jsonl_records(path)
        for rec in records:
            if rec is None:
                skipped += 1
                continue
            text, doc_id = rec
            key = hashlib.sha256(text if doc_id is None else doc_id).digest()
            part = rule.split_index(int.from_bytes(key, "big") % 1000)
            spill.add(part, (key, 0, b"", text) if doc_id is None else (key, 1, doc_id, text))
            valid += 1

    splits: dict[str, list[dict]] = {}
    for index, split in enumerate(SPLITS):
        with ShardWriter(staging / "out", split, shard_bytes) as writer:
            for _, has_id, doc_id, text in spill.distinct_sorted(index):
                writer.write(doc_id.decode("utf-8") if has_id else None, text.decode("utf-8"), len(text))
            splits[split] = writer.finish()
    if not splits["train"]:
        raise DataError("data:no_train_split", "no document landed in the train split "
                        f"({valid} valid records, {skipped} skipped lines)")
    for split in ("val", "test"):  # a split the rule gives a share must hold something (held-out passes read val)
        if getattr(rule, split) and not splits[split]:
            raise DataError("data:empty_split", f"no document landed in the {split} split ({valid} valid "
                            f"records, {skipped} skipped lines, split rule {rule.train},{rule.val},{rule.test}): give "
                            f"more input, or a rule with {split} 0 (--split) if that is what you mean")
    written = sum(e["documents"] for entries in splits.values() for e in entries)
    return build_manifest(rule, splits, skipped_lines=skipped, duplicates=valid - written)


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
