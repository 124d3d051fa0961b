"""The harness's wire format: length-prefixed frames over Unix sockets.

Parent↔runner channels carry the run's control; each trainer rank also has a batch channel straight to the scorer
(NEXT up, its rows of a batch or END down), so the parent is off the per-batch hot path. The trainer is untrusted,
so whoever reads its frames validates them; the format stays tiny so it costs nothing per batch. Control frames
are JSON, batches, loss records and log-prob rows are packed binary. The parent can pass a file descriptor with a
frame (SCM_RIGHTS): that is how both sandboxes get the same shared-state memfd and the two ends of a batch channel.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import time
from enum import IntEnum
from typing import Any

import numpy as np

_HEADER = struct.Struct("<IB")
_BATCH = struct.Struct("<qiiBq")  # batch index, batch_size, seq_len, token itemsize, aux (see Kind.BATCH)
_RECORD = struct.Struct("<qd?")  # batch index, summed nats, finite
_PROBE = struct.Struct("<qiii")  # batch index, probe rows, batch_size, seq_len; then (row, boundary) int32 pairs
# and batch_size·seq_len uint32 tokens
MAX_FRAME = 1 << 30
_FDS = socket.CMSG_SPACE(16 * array.array("i").itemsize)  # room for 16 descriptors per read: one per rank and more


class Kind(IntEnum):
    CONFIG = 1  # parent → runner: the run spec
    HELLO = 2  # runner → parent: started, environment facts
    GEOMETRY = 3  # trainer → parent: batch_size, seq_len, with_logits and the model's state layout (once)
    BATCH = 4  # tokens, parent → scorer (aux: 1 = compare the ranks at its snapshot; held-out: which state) and
    # scorer → trainer rank (its rows, after the snapshot)
    RECORD = 5  # scorer → parent: the loss of one batch (in the stream: of one or more, in order)
    NEXT = 6  # trainer rank → scorer: the miner asks for the next batch
    END = 7  # parent → runner, scorer → trainer rank: the stream (or the run) is over
    REFUSE = 8  # parent → trainer: a request broke a rule
    INFO = 9  # scorer → parent: facts about the loaded forward (params, logits dtype)
    ERROR = 10  # runner → parent: a typed failure
    DONE = 11  # runner → parent: finished (train(ctx) returned, or the scorer's passes are done)
    LAYOUT = 12  # exporter → parent: the state layout of a fresh build_model()
    SHARE = 13  # parent → runner: where the shared state lives, with its descriptors (and the batch channels')
    READY = 14  # runner → parent: mapped (the scorer on a GPU: with the descriptors of its exported buffers)
    SNAPPED = 16  # scorer → parent: the trained state is taken ("final"); the ranks hear END only now
    PROBE = 17  # parent → scorer: the probe batch of the batch sent next (rows, boundaries, tokens)
    PROBED = 18  # scorer → parent: each probe row's drift before its boundary
    FINAL = 19  # parent → scorer: no batch follows; at the ranks' next request take the trained state (SNAPPED)
    EXPORT = 20  # parent → exporter: the run's geometry and the trainer's dtypes: export the forward now
    GRAPH = 21  # exporter → parent: the exported graph (JSON), with a memfd of its initial state and constants
    LOAD = 22  # parent → scorer: that graph, with the memfd


class ProtocolError(Exception):
    """The peer sent something malformed or closed the connection; `peer` names the channel's far end, `closed` says
    it went away (rather than broke the protocol while still there)."""

    def __init__(self, message: str, peer: str = "", closed: bool = False):
        super().__init__(message)
        self.peer = peer
        self.closed = closed


class Channel:
    """A framed, blocking channel over a connected socket. A receive's timeout bounds the whole frame, however it
    trickles in; a peer that has gone is a ProtocolError (never a bare OSError), a frame not done in time TimeoutError.
    """

    def __init__(self, sock: socket.socket, accept_fds: bool = False, max_frame: int = MAX_FRAME, peer: str = "",
                 max_fds: int | None = None, limits: dict[Kind, int] | None = None):
        self.sock = sock
        self.accept_fds = accept_fds  # the parent never takes descriptors from a trainer: it closes them at once
        # the most descriptors held at once: a runner the parent takes some from (the exporter's graph) must not
        # exhaust the parent's descriptor table with more (a red team flooded it to fail the run as the system's)
        self.max_fds = max_fds
        self.max_frame = max_frame
        self.limits = limits or {}  # kinds allowed more (or less) than max_frame, checked before the body is read
        self.peer = peer
        self.fds: list[int] = []  # descriptors received with frames, oldest first

    def send(self, kind: Kind, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        frame = _HEADER.pack(len(payload), kind) + payload
        try:
            if not fds:
                self.sock.sendall(frame)
                return
            sent = self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            if sent < len(frame):
                self.sock.sendall(frame[sent:])
        except ConnectionError:
            raise ProtocolError("connection closed", self.peer, closed=True) from None

    def send_json(self, kind: Kind, obj: Any, fds: tuple[int, ...] = ()) -> None:
        self.send(kind, json.dumps(obj).encode(), fds)

    def send_batch(self, index: int, batch_size: int, seq_len: int, chunk: np.ndarray, probe: int = -1) -> None:
        header = _BATCH.pack(index, batch_size, seq_len, chunk.dtype.itemsize, probe)
        try:
            self.sock.sendall(_HEADER.pack(len(header) + chunk.nbytes, Kind.BATCH) + header)
            self.sock.sendall(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        except ConnectionError:
            raise ProtocolError("connection closed", self.peer, closed=True) from None

    def send_record(self, index: int, nats: float, finite: bool) -> None:
        self.send(Kind.RECORD, _RECORD.pack(index, nats, finite))

    def send_records(self, records: list[tuple[int, float, bool]]) -> None:
        self.send(Kind.RECORD, b"".join(_RECORD.pack(*record) for record in records))

    def send_probe(self, index: int, rows: list[tuple[int, int]], tokens: np.ndarray) -> None:
        """`tokens` [B, L]; `rows` the probed (row, boundary) pairs."""
        batch_size, seq_len = tokens.shape
        header = _PROBE.pack(index, len(rows), batch_size, seq_len) + np.asarray(rows, dtype=np.int32).tobytes()
        self.send(Kind.PROBE, header + np.ascontiguousarray(tokens, dtype=np.uint32).tobytes())

    def take_fd(self) -> int:
        if not self.fds:
            raise ProtocolError("a file descriptor was expected with this frame", self.peer)
        return self.fds.pop(0)

    def recv(self, timeout: float | None = None) -> tuple[Kind, bytes]:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            length, kind = _HEADER.unpack(self._exact(_HEADER.size, deadline))
            if length > max([self.max_frame, *self.limits.values()]):
                raise ProtocolError(f"frame of {length} bytes is over the limit", self.peer)
            try:
                kind = Kind(kind)
            except ValueError:
                raise ProtocolError(f"unknown frame kind {kind}", self.peer) from None
            if length > self.limits.get(kind, self.max_frame):
                raise ProtocolError(f"a {kind.name} frame of {length} bytes is over the limit", self.peer)
            return kind, self._exact(length, deadline)
        except ConnectionError:
            raise ProtocolError("connection closed", self.peer, closed=True) from None

    def _exact(self, size: int, deadline: float | None) -> bytes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            if deadline is None:
                self.sock.settimeout(None)
            else:  # the time left for the whole frame, not per read: a peer cannot trickle it in
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the frame did not arrive in time")
                self.sock.settimeout(left)
            n, ancillary, _, _ = self.sock.recvmsg_into([view[got:]], _FDS)
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i", data[: len(data) - len(data) % 4])
                    room = self.max_fds is None or len(self.fds) + len(received) <= self.max_fds
                    if self.accept_fds and room:
                        self.fds.extend(received)
                    else:
                        for fd in received:
                            os.close(fd)
                    if self.accept_fds and not room:
                        raise ProtocolError(f"sent more file descriptors than the {self.max_fds} this channel "
                                            "takes", self.peer)
            if n == 0:
                raise ProtocolError("connection closed", self.peer, closed=True)
            got += n
        return bytes(buffer)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.sock.close()


def parse_json(payload: bytes) -> dict:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ProtocolError(f"bad JSON frame: {str(error)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("JSON frame is not an object")
    return obj


def parse_batch(payload: bytes) -> tuple[int, int, int, np.ndarray, int]:
    """→ (index, batch_size, seq_len, tokens, aux)."""
    index, batch_size, seq_len, itemsize, probe = _BATCH.unpack_from(payload)
    dtype = {2: np.uint16, 4: np.uint32}[itemsize]
    return index, batch_size, seq_len, np.frombuffer(payload, dtype=dtype, offset=_BATCH.size), probe


def parse_record(payload: bytes) -> tuple[int, float, bool]:
    if len(payload) != _RECORD.size:
        raise ProtocolError("bad loss record")
    return _RECORD.unpack(payload)


def parse_records(payload: bytes) -> list[tuple[int, float, bool]]:
    if not payload or len(payload) % _RECORD.size:
        raise ProtocolError("bad loss records")
    return list(_RECORD.iter_unpack(payload))


def parse_probe(payload: bytes) -> tuple[int, np.ndarray, np.ndarray]:
    """→ (index, [n, 2] (row, boundary) pairs, [B, L] tokens)."""
    index, count, batch_size, seq_len = _PROBE.unpack_from(payload)
    rows = np.frombuffer(payload, dtype=np.int32, count=2 * count, offset=_PROBE.size).reshape(count, 2)
    tokens = np.frombuffer(payload, dtype=np.uint32, offset=_PROBE.size + 8 * count)
    return index, rows, tokens.reshape(batch_size, seq_len)
