"""Token cache (docs/scoring.md, "The scored stream"): a split's token stream, encoded once per (dataset, split,
tokenizer) and then
memory-mapped read-only by every run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prism_ray.data.dataset import LockedDataset
from prism_ray.data.tokenizers import Tokenizer, get_tokenizer
from prism_ray.errors import DataError

log = logging.getLogger(__name__)

CACHE_FORMAT = "prism-ray-token-cache/1"
_CHUNK_TEXT_CHARS = 1 << 20  # documents are encoded in chunks of about this much text: bounded memory
_CHUNK_DOCS = 1024


@dataclass(frozen=True, eq=False)
class TokenStream:
    tokens: np.ndarray  # 1-D read-only memmap: each document's encode_ordinary(text) then eot
    doc_starts: np.ndarray  # int64 offset of each document's first token
    byte_lengths: np.ndarray  # int64 [vocab_size]: UTF-8 bytes per token id, 0 for eot
    tokenizer: str
    vocab_size: int
    eot_id: int
    documents: int
    text_bytes: int
    skipped_lines: int
    fingerprint: str
    split: str


def cache_path(dataset: LockedDataset, split: str, tokenizer: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / "tokens" / f"{dataset.fingerprint[:24]}-{split}-{tokenizer}"


def _expected_meta(dataset: LockedDataset, split: str, tok: Tokenizer) -> dict:
    return {"format": CACHE_FORMAT, "fingerprint": dataset.fingerprint, "split": split, "tokenizer": tok.name,
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "dtype": tok.dtype.name}


def _valid_meta(path: Path, expected: dict) -> dict | None:
    """The cache's meta if every file is present and consistent with it, else None (so it gets rebuilt)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if any(meta.get(k) != v for k, v in expected.items()):
            return None
        if (path / "tokens.bin").stat().st_size != meta["tokens"] * np.dtype(meta["dtype"]).itemsize:
            return None
        starts = np.load(path / "doc_starts.npy", mmap_mode="r")
        if starts.dtype != np.int64 or starts.shape != (meta["documents"],):
            return None
        if meta["documents"] and (starts[0] != 0 or starts[-1] >= meta["tokens"]):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def is_cached(dataset: LockedDataset, split: str, tokenizer: str, cache_dir: Path) -> bool:
    """Whether a valid cache for (dataset, split, tokenizer) exists (it still gets checked on load)."""
    path = cache_path(dataset, split, tokenizer, cache_dir)
    return _valid_meta(path, _expected_meta(dataset, split, get_tokenizer(tokenizer))) is not None


def _chunks(texts: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= _CHUNK_TEXT_CHARS or len(chunk) >= _CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_chunk(tok: Tokenizer, chunk: list[str]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(tokens with eot after each document, per-document token counts, text bytes, bytes the tokens cover)."""
    buf = tok.encode_documents(chunk)
    ends = np.flatnonzero(buf == tok.eot_id) + 1  # ordinary tokens are never eot
    if len(ends) != len(chunk) or (len(buf) and ends[-1] != len(buf)):
        raise DataError("data:token_cache", f"{tok.name} gave {len(ends)} end-of-text tokens for {len(chunk)} "
                        "documents")
    text_bytes = sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in chunk)
    return buf, np.diff(ends, prepend=0), text_bytes, int(tok.token_byte_lengths()[buf].sum())


def _encode_split(dataset: LockedDataset, split: str, tok: Tokenizer, out: Path, threads: int) -> dict:
    """Stream the split's documents into out/tokens.bin + doc_starts.npy; returns counts.

    Chunks are encoded on `threads` workers (the tokenizer releases the GIL) while this thread reads the next
    ones and writes finished ones in order; at most 2 × threads chunks are in flight, so memory stays flat."""
    starts: list[np.ndarray] = []
    counts = {"tokens": 0, "documents": 0, "text_bytes": 0, "token_bytes": 0}

    def write(done: Future, f) -> None:
        buf, lengths, text_bytes, token_bytes = done.result()
        buf.tofile(f)
        starts.append(np.cumsum(lengths) - lengths + counts["tokens"])
        counts["tokens"] += len(buf)
        counts["documents"] += len(lengths)
        counts["text_bytes"] += text_bytes
        counts["token_bytes"] += token_bytes

    with open(out / "tokens.bin", "wb") as f, ThreadPoolExecutor(threads, thread_name_prefix="tokenize") as pool:
        pending: deque[Future] = deque()
        for chunk in _chunks(dataset.iter_documents(split)):
            pending.append(pool.submit(_encode_chunk, tok, chunk))
            if len(pending) >= 2 * threads:
                write(pending.popleft(), f)
        while pending:
            write(pending.popleft(), f)
    if counts["token_bytes"] != counts["text_bytes"]:  # §4.3: a document's tokens sum to its UTF-8 length
        raise DataError("data:token_bytes",
                        f"{tok.name} tokens of {split} cover {counts['token_bytes']} bytes, "
                        f"the text has {counts['text_bytes']}", file=str(dataset.root))
    np.save(out / "doc_starts.npy", np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64))
    return counts


def _install(tmp: Path, final: Path, expected: dict) -> None:
    """Atomically move a finished build into place; a valid cache from a racing process wins."""
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if _valid_meta(final, expected) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(final, ignore_errors=True)  # broken leftovers: replace them
    raise DataError("data:token_cache", f"could not install token cache at {final}", file=str(final))


def build_token_cache(dataset: LockedDataset, split: str, tokenizer: str, cache_dir: Path,
                      threads: int = 0) -> dict:
    """Encode the split into the cache; returns {path, seconds, text_bytes, tokens, documents, mb_per_s}."""
    tok = get_tokenizer(tokenizer)
    final = cache_path(dataset, split, tokenizer, cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        start = time.perf_counter()
        counts = _encode_split(dataset, split, tok, tmp, threads or os.cpu_count() or 1)
        seconds = time.perf_counter() - start
        expected = _expected_meta(dataset, split, tok)
        meta = {**expected, "tokens": counts["tokens"], "documents": counts["documents"],
                "text_bytes": counts["text_bytes"], "skipped_lines": dataset.skipped_lines.get(split, 0),
                "build_seconds": round(seconds, 3)}
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True, indent=2) + "\n")
        _install(tmp, final, expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mb_per_s = counts["text_bytes"] / 1e6 / seconds if seconds > 0 else float("inf")
    log.info("token cache %s: %d docs, %d tokens, %.1f MB/s", final.name, counts["documents"],
             counts["tokens"], mb_per_s)
    return {"path": final, "seconds": seconds, "text_bytes": counts["text_bytes"], "tokens": counts["tokens"],
            "documents": counts["documents"], "mb_per_s": mb_per_s}


def load_token_stream(dataset: LockedDataset, split: str, tokenizer: str, cache_dir: Path,
                      threads: int = 0) -> TokenStream:
    """The split's token stream, building the cache on first use and memory-mapping it afterwards."""
    tok = get_tokenizer(tokenizer)
    if not dataset.has_split(split):
        raise DataError("data:missing_split", f"dataset {dataset.root} has no {split} split",
                        file=str(dataset.root))
    path = cache_path(dataset, split, tokenizer, cache_dir)
    expected = _expected_meta(dataset, split, tok)
    meta = _valid_meta(path, expected)
    if meta is None:
        build_token_cache(dataset, split, tokenizer, cache_dir, threads)  # re-reads and verifies the shards
        meta = _valid_meta(path, expected)
        if meta is None:
            raise DataError("data:token_cache", f"token cache at {path} is unreadable after a rebuild",
                            file=str(path))
    else:
        dataset.shards(split)  # the locked data must still match its manifest, cache or not
    if meta["tokens"]:
        tokens = np.memmap(path / "tokens.bin", dtype=tok.dtype, mode="r", shape=(meta["tokens"],))
    else:  # mmap cannot map an empty file
        tokens = np.zeros(0, dtype=tok.dtype)
        tokens.flags.writeable = False
    return TokenStream(tokens=tokens, doc_starts=np.load(path / "doc_starts.npy", mmap_mode="r"),
                       byte_lengths=tok.token_byte_lengths(), tokenizer=tok.name, vocab_size=tok.vocab_size,
                       eot_id=tok.eot_id, documents=meta["documents"], text_bytes=meta["text_bytes"],
                       skipped_lines=meta["skipped_lines"], fingerprint=dataset.fingerprint, split=split)
