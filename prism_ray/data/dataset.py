"""Locked data (docs/architecture.md, "Scoring contract"): the manifest, and `open_dataset`, which reads the split
shards back and refuses anything that no longer matches its MANIFEST.json (prepare.py writes them)."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prism_ray.errors import DataError

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "prism-ray-locked-text/1"
_HASH_CHUNK = 1 << 20
_COUNT_FIELDS = ("bytes", "documents", "text_bytes")
_SHARD_PATH = re.compile(r"^(train|val|test)/([^/\\]+\.jsonl(?:\.gz)?)$")


# --------------------------------------------------------------------------------------------- records

def document_text(raw: bytes) -> str | None:
    """The §4.1 line rule: a JSON object with a non-empty string `text` (valid UTF-8 text), else None."""
    obj = json_object(raw)
    return valid_text(obj.get("text")) if obj is not None else None


def json_object(raw: bytes) -> dict | None:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")  # lone surrogates from "\ud800" escapes have no UTF-8 bytes
    except UnicodeEncodeError:
        return False
    return True


def valid_text(text: object) -> str | None:
    return text if isinstance(text, str) and text and utf8_ok(text) else None


def open_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from f
    except (OSError, EOFError, zlib.error) as e:
        raise DataError("data:bad_file", f"cannot read {path.name}: {e}", file=str(path)) from e


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
            for raw in open_lines(shard):
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
