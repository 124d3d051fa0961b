"""The held-out passes, driven by the trusted parent once the trainer is gone: batches of the val split (and of a
slice of the train split) go to the scorer, which scores them with the trained weights or the step-0 weights."""

from __future__ import annotations

import time

import numpy as np

from prism_ray.errors import Reason
from prism_ray.harness.protocol import Channel, Kind, ProtocolError, parse_json, parse_record
from prism_ray.harness.records import EvalPass, PassResult, charged
from prism_ray.harness.stream import StreamPlan


class HeldoutError(Exception):
    """The scorer reported a typed failure during the passes."""

    def __init__(self, reasons: list[Reason]):
        super().__init__(str(reasons[0]))
        self.reasons = reasons


def score_passes(scorer: Channel, passes: list[EvalPass], byte_lengths: np.ndarray, batch_size: int, seq_len: int,
                 vocab_size: int, deadline: float) -> dict[str, PassResult]:
    """Every batch of every pass, one at a time (the scorer took the trained state when the stream ended)."""
    results = {item.name: PassResult() for item in passes}
    for item in passes:
        result = results[item.name]
        for piece in StreamPlan(item.tokens, byte_lengths, batch_size, seq_len, item.byte_budget).batches():
            if item.max_batches is not None and piece.index >= item.max_batches:
                break
            scorer.send_batch(piece.index, batch_size, seq_len, piece.chunk, int(item.trained))
            index, nats, finite = parse_record(_expect(scorer, Kind.RECORD, deadline))
            if index != piece.index:
                raise ProtocolError(f"held-out record for batch {index} was not expected")
            nats, penalised = charged(nats, finite, piece.targets, vocab_size)
            result.non_finite += penalised
            result.nats += nats
            result.targets += piece.targets
            result.bytes += piece.target_bytes
            result.batches += 1
    return results


def _expect(channel: Channel, wanted: Kind, deadline: float) -> bytes:
    kind, payload = channel.recv(timeout=max(0.001, deadline - time.monotonic()))
    if kind == Kind.ERROR:
        reason = parse_json(payload)
        raise HeldoutError([Reason(rule=str(reason.get("rule", "run:exception")),
                                   message=str(reason.get("message", ""))[:4000], file=reason.get("file"),
                                   line=reason.get("line"))])
    if kind != wanted:
        raise ProtocolError(f"expected {wanted.name}, got {kind.name}")
    return payload
