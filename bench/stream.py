"""Stream speed: the parent's batch geometry alone, the stream through the runner's socket protocol, and
the token-cache build, on the embedded data. Prints tokens/s and MB/s (target: stream ≥ 20M tokens/s).

    python bench/stream.py
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from prism_ray.config import EMBEDDED_DATA_DIR
from prism_ray.data.dataset import open_dataset
from prism_ray.data.token_cache import build_token_cache, load_token_stream
from prism_ray.harness.protocol import Channel, Kind, parse_batch
from prism_ray.harness.stream import StreamPlan

GEOMETRIES = [(8, 1024), (32, 256), (8, 128)]


def plan_only(tokens: np.ndarray, byte_lengths: np.ndarray, batch_size: int, seq_len: int) -> float:
    started = time.perf_counter()
    targets = sum(piece.targets for piece in StreamPlan(tokens, byte_lengths, batch_size, seq_len, 0).batches())
    return targets / (time.perf_counter() - started)


def over_socket(tokens: np.ndarray, byte_lengths: np.ndarray, batch_size: int, seq_len: int) -> float:
    """Parent sends each batch after the previous record, the receiver unfolds it into a [B, L] LongTensor."""
    parent_sock, runner_sock = socket.socketpair()
    parent, runner = Channel(parent_sock), Channel(runner_sock)
    plan = StreamPlan(tokens, byte_lengths, batch_size, seq_len, 0)

    def receive() -> None:
        while True:
            kind, payload = runner.recv()
            if kind == Kind.END:
                return
            index, rows, length, chunk, _ = parse_batch(payload)
            batch = torch.from_numpy(chunk.astype(np.int64)).unfold(0, length, length - 1).contiguous()
            runner.send_record(index, float(batch.shape[0]), True)

    thread = threading.Thread(target=receive)
    thread.start()
    started = time.perf_counter()
    targets = 0
    for piece in plan.batches():
        parent.send_batch(piece.index, batch_size, seq_len, piece.chunk)
        parent.recv()
        targets += piece.targets
    parent.send_json(Kind.END, {})
    elapsed = time.perf_counter() - started
    thread.join()
    return targets / elapsed


def main() -> None:
    dataset = open_dataset(EMBEDDED_DATA_DIR)
    with tempfile.TemporaryDirectory() as cache:
        for tokenizer in ("gpt2", "bytes"):
            build = build_token_cache(dataset, "train", tokenizer, Path(cache))
            print(f"token-cache build {tokenizer:5s}: {build['text_bytes'] / 1e6:.1f} MB of text, "
                  f"{build['tokens']:,} tokens in {build['seconds']:.2f} s = {build['mb_per_s']:.1f} MB/s")
        stream = load_token_stream(dataset, "train", "gpt2", Path(cache))
        tokens, byte_lengths = np.asarray(stream.tokens), stream.byte_lengths
        for batch_size, seq_len in GEOMETRIES:
            alone = max(plan_only(tokens, byte_lengths, batch_size, seq_len) for _ in range(3))
            piped = max(over_socket(tokens, byte_lengths, batch_size, seq_len) for _ in range(3))
            print(f"stream B={batch_size:<3d} L={seq_len:<5d}: geometry alone {alone / 1e6:7.1f}M tokens/s, "
                  f"through the runner socket {piped / 1e6:6.1f}M tokens/s  (target ≥ 20M)")


if __name__ == "__main__":
    main()
