"""Locked data (docs/architecture.md, "Scoring contract"): `prepare` turns raw JSONL/Parquet into hashed,
deterministic split shards;
`open_dataset` reads them back and refuses anything that no longer matches its MANIFEST.json."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prism_ray.errors import DataError

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "prism-ray-locked-text/1"
GZIP_LEVEL = 6
STAGING_DIR = ".prepare-staging"
_INSERT_BATCH_DOCS = 4096
_INSERT_BATCH_BYTES = 64 << 20
_FETCH_ROWS = 1024
_HASH_CHUNK = 1 << 20
_COUNT_FIELDS = ("bytes", "documents", "text_bytes")
_SHARD_PATH = re.compile(r"^(train|val|test)/([^/\\]+\.jsonl(?:\.gz)?)$")


# --------------------------------------------------------------------------------------------- records

def document_text(raw: bytes) -> str | None:
    """The §4.1 line rule: a JSON object with a non-empty string `text` (valid UTF-8 text), else None."""
    obj = _json_object(raw)
    return _valid_text(obj.get("text")) if obj is not None else None


def _json_object(raw: bytes) -> dict | None:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")  # lone surrogates from "\ud800" escapes have no UTF-8 bytes
    except UnicodeEncodeError:
        return False
    return True


def _valid_text(text: object) -> str | None:
    return text if isinstance(text, str) and text and _utf8_ok(text) else None


def _normalise_id(value: object) -> tuple[bool, str | None]:
    """(ok, id as str). Any JSON scalar is accepted; objects/arrays/other types make the record invalid."""
    if value is None:
        return True, None
    if isinstance(value, str):
        return _utf8_ok(value), value
    if isinstance(value, bool | int | float):
        return True, json.dumps(value)  # same spelling whether it came from JSON or Parquet
    return False, None


def _record(text: object, doc_id: object) -> tuple[str, str | None] | None:
    text = _valid_text(text)
    ok, norm_id = _normalise_id(doc_id)
    return (text, norm_id) if text is not None and ok else None


def _open_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from f
    except (OSError, EOFError, zlib.error) as e:
        raise DataError("data:bad_file", f"cannot read {path.name}: {e}", file=str(path)) from e


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
    for raw in _open_lines(path):
        obj = _json_object(raw)
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


# --------------------------------------------------------------------------------------------- manifest

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _shard_listing(splits: dict[str, list[dict]]) -> list[dict]:
    keys = ("path", "sha256", "bytes", "documents", "text_bytes")
    return [{"split": s, **{k: e[k] for k in keys}} for s in SPLITS for e in splits.get(s, [])]


def manifest_fingerprint(splits: dict[str, list[dict]]) -> str:
    """sha256 of the canonical shard listing (split order, then shard order; compact sorted JSON)."""
    canonical = json.dumps(_shard_listing(splits), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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


def _check_manifest(manifest: object, path: Path) -> dict[str, list[dict]]:
    """Validate structure, shard paths and totals; return the per-split shard entries."""
    def bad(why: str) -> DataError:
        return DataError("data:bad_manifest", f"{MANIFEST_NAME} is malformed: {why}", file=str(path))

    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise bad(f"expected an object with format {MANIFEST_FORMAT!r}")
    splits_obj = manifest.get("splits")
    if not isinstance(splits_obj, dict) or set(splits_obj) - set(SPLITS):
        raise bad(f"`splits` must be an object with keys among {SPLITS}")
    splits: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for split, info in splits_obj.items():
        entries = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(entries, list):
            raise bad(f"split {split!r} has no `shards` list")
        for e in entries:
            ok = (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
                  and all(isinstance(e.get(k), int) and e[k] >= 0 for k in _COUNT_FIELDS))
            m = _SHARD_PATH.match(e["path"]) if ok else None
            if not m or m.group(1) != split or e["path"] in seen:
                raise bad(f"bad shard entry in split {split!r}: {e!r}")
            seen.add(e["path"])
        for total in ("documents", "text_bytes"):
            if info.get(total) != sum(e[total] for e in entries):
                raise bad(f"split {split!r} `{total}` does not match its shards")
        splits[split] = entries
    if manifest.get("fingerprint") != manifest_fingerprint(splits):
        raise bad("`fingerprint` does not match the shard listing")
    return splits


# --------------------------------------------------------------------------------------------- reading

def _is_shard_name(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.gz"))


def _present_shards(split_dir: Path) -> list[Path]:
    if not split_dir.is_dir():
        return []
    shards = (p for p in split_dir.iterdir() if p.is_file() and _is_shard_name(p.name))
    return sorted(shards, key=lambda p: p.name)


@dataclass
class LockedDataset:
    """An opened dataset dir. Pinned: has a MANIFEST.json and is re-verified on every `shards()` call.
    Unpinned: only shard files (no manifest), fingerprinted over their paths and contents at open time."""

    root: Path
    pinned: bool
    fingerprint: str
    manifest: dict | None
    _entries: dict[str, list[dict]] = field(default_factory=dict, repr=False)
    skipped_lines: dict[str, int] = field(default_factory=dict)

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise DataError("data:unknown_split", f"unknown split {split!r}; expected one of {SPLITS}")

    def has_split(self, split: str) -> bool:
        self._check_split(split)
        if self.pinned:
            return bool(self._entries.get(split))
        return bool(_present_shards(self.root / split))

    def shards(self, split: str) -> list[Path]:
        """The split's shard files in name order; pinned datasets are re-verified against the manifest."""
        self._check_split(split)
        present = _present_shards(self.root / split)
        if not self.pinned:
            return present
        entries = sorted(self._entries.get(split, []), key=lambda e: e["path"])
        for e in entries:
            path = self.root / e["path"]
            if not path.is_file():
                raise DataError("data:missing_shard",
                                f"shard {e['path']} is listed in {MANIFEST_NAME} but missing", file=str(path))
            size = path.stat().st_size
            if size != e["bytes"]:
                raise DataError("data:tampered", f"shard {e['path']} is {size} bytes, "
                                f"manifest says {e['bytes']}", file=str(path))
            actual = file_sha256(path)
            if actual != e["sha256"]:
                raise DataError("data:tampered",
                                f"shard {e['path']} has sha256 {actual}, manifest says {e['sha256']}",
                                file=str(path))
        listed = {e["path"] for e in entries}
        for p in present:
            if f"{split}/{p.name}" not in listed:
                raise DataError("data:unlisted_shard", f"{split}/{p.name} is not listed in {MANIFEST_NAME}",
                                file=str(p))
        return sorted((self.root / e["path"] for e in entries), key=lambda p: p.name)

    def iter_documents(self, split: str) -> Iterator[str]:
        """§4.1: shards in name order, lines in order; non-documents are skipped and counted."""
        self.skipped_lines[split] = 0
        for shard in self.shards(split):
            for raw in _open_lines(shard):
                text = document_text(raw)
                if text is None:
                    self.skipped_lines[split] += 1
                else:
                    yield text


def open_dataset(path: Path) -> LockedDataset:
    """Open a locked dataset dir (train/ required; val/, test/ optional)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError("data:not_found", f"dataset directory {root} does not exist", file=str(root))
    manifest_path = root / MANIFEST_NAME
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except (OSError, ValueError) as e:
            raise DataError("data:bad_manifest", f"cannot parse {MANIFEST_NAME}: {e}",
                            file=str(manifest_path)) from e
        entries = _check_manifest(manifest, manifest_path)
        ds = LockedDataset(root, True, manifest["fingerprint"], manifest, entries)
    else:
        shards = [p for s in SPLITS for p in _present_shards(root / s)]
        h = hashlib.sha256()
        for p in shards:
            h.update(json.dumps([p.relative_to(root).as_posix(), file_sha256(p)]).encode("utf-8") + b"\n")
        ds = LockedDataset(root, False, "unpinned-" + h.hexdigest(), None)
    if not ds.has_split("train"):
        how = f"{MANIFEST_NAME} lists no train shards" if ds.pinned else "no train/*.jsonl[.gz] shards"
        raise DataError("data:no_train_split", f"dataset {root} has no train split ({how})", file=str(root))
    return ds
