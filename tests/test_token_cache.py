"""Token cache: the exact §4.2 stream, built once, memory-mapped afterwards, keyed by data and tokenizer."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from prism_ray.data import (
    SplitRule,
    build_token_cache,
    get_tokenizer,
    load_token_stream,
    open_dataset,
    prepare,
    token_cache,
)
from prism_ray.errors import DataError

TEXTS = ["Hello world", "naïve café — ½", "日本語 🤖", "def f(x):\n    return x  \n", "don't  stop",
         "a" * 3000, "<|endoftext|> literally", "  spaced\t\tout  "]


def write_source(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture()
def dataset(tmp_path):
    texts = [f"{t} #{i}" for i in range(40) for t in TEXTS]
    prepare([write_source(tmp_path / "src.jsonl", texts)], tmp_path / "ds", SplitRule(1000, 0, 0))
    return open_dataset(tmp_path / "ds")


def expected_stream(dataset, tokenizer: str) -> tuple[np.ndarray, list[int]]:
    tok = get_tokenizer(tokenizer)
    tokens, starts = [], []
    for text in dataset.iter_documents("train"):
        starts.append(len(tokens))
        tokens += tok.encode_ordinary(text) + [tok.eot_id]
    return np.array(tokens), starts


@pytest.mark.parametrize("tokenizer", ["gpt2", "bytes"])
def test_stream_is_documents_then_eot(dataset, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(token_cache, "_CHUNK_DOCS", 7)  # several chunks, one file
    stream = load_token_stream(dataset, "train", tokenizer, tmp_path / "cache", threads=2)
    tokens, starts = expected_stream(dataset, tokenizer)
    tok = get_tokenizer(tokenizer)
    assert isinstance(stream.tokens, np.memmap) and not stream.tokens.flags.writeable
    assert stream.tokens.dtype == tok.dtype and stream.tokens.ndim == 1
    assert np.array_equal(stream.tokens, tokens)
    assert stream.doc_starts.dtype == np.int64 and stream.doc_starts.tolist() == starts
    assert stream.documents == len(starts) == len(TEXTS) * 40
    assert (stream.tokenizer, stream.vocab_size, stream.eot_id) == (tok.name, tok.vocab_size, tok.eot_id)
    assert (stream.split, stream.fingerprint, stream.skipped_lines) == ("train", dataset.fingerprint, 0)
    text_bytes = sum(len(t.encode("utf-8")) for t in dataset.iter_documents("train"))
    assert stream.text_bytes == text_bytes == dataset.manifest["splits"]["train"]["text_bytes"]
    assert int(stream.byte_lengths[stream.tokens].sum()) == text_bytes
    assert int((stream.tokens == tok.eot_id).sum()) == stream.documents


def test_second_load_maps_without_encoding(dataset, tmp_path, monkeypatch):
    first = load_token_stream(dataset, "train", "gpt2", tmp_path / "cache")
    bin_path = Path(first.tokens.filename)
    mtime = bin_path.stat().st_mtime_ns

    def no_encoding(*args, **kwargs):
        raise AssertionError("cache hit must not re-encode")

    monkeypatch.setattr(token_cache, "_encode_split", no_encoding)
    second = load_token_stream(open_dataset(dataset.root), "train", "gpt2", tmp_path / "cache")
    assert isinstance(second.tokens, np.memmap) and Path(second.tokens.filename) == bin_path
    assert bin_path.stat().st_mtime_ns == mtime
    assert np.array_equal(first.tokens, second.tokens)


def test_cache_key_follows_tokenizer_and_fingerprint(dataset, tmp_path):
    cache = tmp_path / "cache"
    gpt2 = build_token_cache(dataset, "train", "gpt2", cache)
    raw = build_token_cache(dataset, "train", "bytes", cache)
    assert gpt2["path"] != raw["path"] and gpt2["path"].name.startswith(dataset.fingerprint[:24])
    documents = dataset.manifest["splits"]["train"]["documents"]
    assert gpt2["text_bytes"] == raw["text_bytes"] == raw["tokens"] - documents
    assert gpt2["seconds"] > 0 and gpt2["mb_per_s"] > 0

    source = write_source(tmp_path / "other.jsonl", ["different text"])
    prepare([source], tmp_path / "other", SplitRule(1000, 0, 0))
    other = open_dataset(tmp_path / "other")
    assert other.fingerprint != dataset.fingerprint
    stream = load_token_stream(other, "train", "gpt2", cache)
    assert stream.documents == 1 and Path(stream.tokens.filename).parent != gpt2["path"]
    assert sorted(p.name for p in (cache / "tokens").iterdir()) == sorted(
        [gpt2["path"].name, raw["path"].name, f"{other.fingerprint[:24]}-train-gpt2"])


def test_broken_cache_is_rebuilt(dataset, tmp_path):
    cache = tmp_path / "cache"
    path = build_token_cache(dataset, "train", "bytes", cache)["path"]
    want = np.array(load_token_stream(dataset, "train", "bytes", cache).tokens)
    with open(path / "tokens.bin", "r+b") as f:
        f.truncate(10)
    stream = load_token_stream(dataset, "train", "bytes", cache)
    assert np.array_equal(stream.tokens, want)
    (path / "meta.json").write_text("{broken")
    assert np.array_equal(load_token_stream(dataset, "train", "bytes", cache).tokens, want)


def test_racing_builders_leave_one_valid_cache(dataset, tmp_path):
    cache, errors = tmp_path / "cache", []

    def build():
        try:
            build_token_cache(dataset, "train", "gpt2", cache, threads=1)
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    workers = [threading.Thread(target=build) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert [p.name for p in (cache / "tokens").iterdir()] == [f"{dataset.fingerprint[:24]}-train-gpt2"]
    tokens, _ = expected_stream(dataset, "gpt2")
    assert np.array_equal(load_token_stream(dataset, "train", "gpt2", cache).tokens, tokens)


def test_locked_data_is_verified_on_cache_hits(dataset, tmp_path):
    load_token_stream(dataset, "train", "bytes", tmp_path / "cache")
    shard = dataset.shards("train")[0]
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        load_token_stream(dataset, "train", "bytes", tmp_path / "cache")
    assert err.value.rule == "data:tampered"


def test_missing_split_and_empty_stream(dataset, tmp_path):
    with pytest.raises(DataError) as err:
        load_token_stream(dataset, "val", "gpt2", tmp_path / "cache")
    assert err.value.rule == "data:missing_split"

    (tmp_path / "junk" / "train").mkdir(parents=True)
    (tmp_path / "junk" / "train" / "only-bad.jsonl").write_text('{"nope": 1}\nnot json\n')
    stream = load_token_stream(open_dataset(tmp_path / "junk"), "train", "gpt2", tmp_path / "cache")
    assert len(stream.tokens) == 0 and stream.documents == 0 and stream.skipped_lines == 2


@pytest.mark.parametrize("texts", [
    TEXTS[:4] + TEXTS[5:6],  # no text holds the end-of-text string: one tiktoken call for all
    TEXTS,  # one does: it stays plain text, the slow path
    ["ends <|endof", "text|> starts", "<|", "|>", "  \n", "\n\n<|endoftext"],  # pieces across the separators
])
@pytest.mark.parametrize("tokenizer", ["gpt2", "bytes"])
def test_encode_documents_is_encode_ordinary_then_eot(texts, tokenizer):
    tok = get_tokenizer(tokenizer)
    want = [i for t in texts for i in tok.encode_ordinary(t) + [tok.eot_id]]
    got = tok.encode_documents(texts)
    assert got.dtype == tok.dtype and got.tolist() == want
