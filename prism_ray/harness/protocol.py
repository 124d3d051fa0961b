"""The parent↔runner wire format: length-prefixed frames over one Unix socket.

The runner is untrusted, so the parent validates every frame it reads; the format stays tiny so it
costs nothing per batch. Control frames are JSON, batches and loss records are packed binary.
"""

from __future__ import annotations

import json
import socket
import struct
from enum import IntEnum
from typing import Any

import numpy as np

_HEADER = struct.Struct("<IB")
_BATCH = struct.Struct("<qiiBq")  # batch index, batch_size, seq_len, token itemsize, causality probe position
_RECORD = struct.Struct("<qd?")  # batch index, summed nats, finite
MAX_FRAME = 1 << 30


class Kind(IntEnum):
    CONFIG = 1  # parent → runner: the run spec
    HELLO = 2  # runner → parent: started, environment facts
    GEOMETRY = 3  # runner → parent: batch_size, seq_len, with_logits (once)
    BATCH = 4  # parent → runner: one batch of tokens
    RECORD = 5  # runner → parent: the loss of the batch just handed over
    NEXT = 6  # runner → parent: the miner asks for the next batch
    END = 7  # parent → runner: the stream is over (budget reached or exhausted)
    REFUSE = 8  # parent → runner: a request broke a rule
    INFO = 9  # runner → parent: facts about the model (params, ...)
    ERROR = 10  # runner → parent: a typed failure
    DONE = 11  # runner → parent: train(ctx) returned
    STATE = 12  # runner → parent: the trained model's state_dict (torch.save bytes), written by the parent


class ProtocolError(Exception):
    """The peer sent something malformed or closed the connection."""


class Channel:
    """A framed, blocking channel over a connected socket; recv honours an absolute deadline."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, kind: Kind, payload: bytes = b"") -> None:
        self.sock.sendall(_HEADER.pack(len(payload), kind) + payload)

    def send_json(self, kind: Kind, obj: Any) -> None:
        self.send(kind, json.dumps(obj).encode())

    def send_batch(self, index: int, batch_size: int, seq_len: int, chunk: np.ndarray, probe: int = -1) -> None:
        header = _BATCH.pack(index, batch_size, seq_len, chunk.dtype.itemsize, probe)
        self.sock.sendall(_HEADER.pack(len(header) + chunk.nbytes, Kind.BATCH) + header)
        self.sock.sendall(memoryview(np.ascontiguousarray(chunk)).cast("B"))

    def send_record(self, index: int, nats: float, finite: bool) -> None:
        self.send(Kind.RECORD, _RECORD.pack(index, nats, finite))

    def recv(self, timeout: float | None = None) -> tuple[Kind, bytes]:
        self.sock.settimeout(timeout)
        length, kind = _HEADER.unpack(self._exact(_HEADER.size))
        if length > MAX_FRAME:
            raise ProtocolError(f"frame of {length} bytes is over the limit")
        try:
            return Kind(kind), self._exact(length)
        except ValueError:
            raise ProtocolError(f"unknown frame kind {kind}") from None

    def _exact(self, size: int) -> bytes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ProtocolError("connection closed")
            got += n
        return bytes(buffer)

    def close(self) -> None:
        self.sock.close()


def parse_json(payload: bytes) -> dict:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as error:
        raise ProtocolError(f"bad JSON frame: {error}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("JSON frame is not an object")
    return obj


def parse_batch(payload: bytes) -> tuple[int, int, int, np.ndarray, int]:
    """→ (index, batch_size, seq_len, tokens, probe): probe ≥ 0 asks for a causality check at that position."""
    index, batch_size, seq_len, itemsize, probe = _BATCH.unpack_from(payload)
    dtype = {2: np.uint16, 4: np.uint32}[itemsize]
    return index, batch_size, seq_len, np.frombuffer(payload, dtype=dtype, offset=_BATCH.size), probe


def parse_record(payload: bytes) -> tuple[int, float, bool]:
    if len(payload) != _RECORD.size:
        raise ProtocolError("bad loss record")
    return _RECORD.unpack(payload)
