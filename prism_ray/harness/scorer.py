"""The trusted scorer: the sandboxed process that computes every number a score rests on. It runs prism-ray and
torch only: no bundle file is in its sandbox, no miner module is imported and no miner bytes are unpickled.

It maps the trainer's shared state read-only, loads the forward the exporter traced (a graph of allowlisted ATen
operations, docs/architecture.md "Trust boundaries") and checks it before any data: its state is the exported
initial state, its output has the logits' shape, two calls on the same input agree bitwise, it is causal on random
tokens, and what it reads fits the parameter cap. The parent sends it batches a few ahead; once every trainer rank
has asked for the next batch (NEXT on its batch channel) it copies the shared state into private memory (the
snapshot), only then sends each rank its rows, scores the batch on the snapshot and reports Σ −ln p(target); for a
probed batch it runs the probe batch on the same snapshot and reports each probe row's drift. When the ranks ask
past the last batch it takes the trained state, and they hear END only then. After the trainer has exited it runs
the held-out passes with the trained state and the step-0 state. On a GPU with the GPU hand-off the same order is
kept by the GPUs' streams, and the ranks' BATCH frames are headers (handoff.py; docs/architecture.md).

Text a graph produces while it sees data never leaves this process: failures on data carry fixed messages.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import selectors
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from prism_ray.graph.format import MAX_JSON_BYTES, GraphFile
from prism_ray.graph.program import GraphRejected, Program
from prism_ray.harness import cuda_ipc, layout, shared_state
from prism_ray.harness.context import RunError, force_determinism, rows
from prism_ray.harness.handoff import CudaOps, ScorerHandoff, Staged
from prism_ray.harness.probes import causality_tolerance, drift, heldout_probe, non_causal_message
from prism_ray.harness.protocol import Channel, Kind, ProtocolError, parse_batch, parse_json, parse_probe
from prism_ray.harness.rank_check import RankCheck
from prism_ray.harness.ranks import Ranks, next_step

_T = TypeVar("_T")

_BLOCK_BYTES_CPU = 2 << 20  # logits rows turned into log-probs at once: about a core's cache
_BLOCK_BYTES_GPU = 256 << 20  # on a GPU, few large launches
_REQUEST_BYTES = 64  # a rank's frames on its batch channel are empty NEXTs: nothing larger is read
_REQUEST_SECONDS = 2.0  # a rank sends a frame whole (5 bytes): one left half-sent broke the protocol
_RECORDS_AT_ONCE = 8  # loss records sent to the parent together: it wakes once for several batches
_RECORDS_IDLE = 0.05  # seconds: records wait no longer than this while nothing happens (slow batches, failures)
_STAGED = 2  # GPU hand-off: batches whose tokens are on the GPU before their request
_NO_TOKENS = np.empty(0, dtype=np.uint32)  # GPU hand-off: a BATCH header; the rows are in the rank's buffer


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position of [B, L, ≥V] logits for [B, L−1] targets → [B, L−1], in float32 or wider
    (float64 logits stay float64). A few rows of the flattened logits at a time, each row's log-softmax on its own:
    on CPU the rows stay in cache (about 4× faster than one [B·L, V] log-softmax, which also needs gigabytes at
    scale), on a GPU in large blocks. Per row the numbers are those of F.cross_entropy, bit for bit. Each batch row's
    last position has no target: it is computed on a stand-in and dropped."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    batch, length, vocab = logits.shape
    flat = logits.reshape(batch * length, vocab)
    padded = torch.zeros(batch, length, dtype=torch.long, device=logits.device)
    padded[:, :-1] = targets
    index = padded.view(-1, 1)
    out = torch.empty(batch * length, dtype=dtype, device=logits.device)
    step = max(1, (_BLOCK_BYTES_GPU if logits.is_cuda else _BLOCK_BYTES_CPU) // (vocab * dtype.itemsize))
    with torch.inference_mode():
        for first in range(0, batch * length, step):
            block = slice(first, first + step)
            out[block] = torch.log_softmax(flat[block].to(dtype), dim=-1).gather(1, index[block]).squeeze(1)
    return out.view(batch, length)[:, :-1]


class ForwardFailed(Exception):
    """The graph raised while it saw data; only the exception's type may be told."""

    def __init__(self, message: str, rule: str = "run:forward_failed"):
        super().__init__(message)
        self.rule = rule


def _forward_failure(error: Exception, what: str) -> ForwardFailed:
    """What may be told of an exception the graph raised on data: its type, and whether the GPU's memory ran out."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return ForwardFailed(f"the GPU ran out of memory in the scorer's forward on {what}", "run:out_of_memory")
    return ForwardFailed(f"the exported forward raised {type(error).__name__} on {what} (its message is withheld: it "
                         "may contain data); it ran on random tokens before the stream")


# Why the scorer's GPU memory ran out during the stream: the trainer's process holds the rest of it.
_ROOM = ("the scorer shares the GPU with your trainer and needs room beside it for its copy of the weights, one "
         "eval-mode forward at the batch's [B, L] and a few batches of tokens; leave it that much "
         "(torch.cuda.max_memory_reserved() in your loop shows what your process takes)")


@dataclass
class _Ahead:
    """A batch the parent sent before the ranks asked for it."""

    index: int
    batch_size: int
    seq_len: int
    chunk: np.ndarray
    compare: bool  # compare every rank's weights with rank 0's at its snapshot
    probe: tuple[np.ndarray, np.ndarray] | None = None  # (row, boundary) pairs and the probe batch's tokens
    staged: Staged | None = None  # GPU hand-off: its tokens on the GPUs


class Scorer:
    def __init__(self, channel: Channel, spec: dict):
        self.channel = channel
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.vocab_size = spec["vocab_size"]
        self.tolerance = 0.0  # set from the logits' dtype at the instantiation check
        self.model_params = 0
        self.records: list[tuple[int, float, bool]] = []  # loss records not yet sent to the parent
        self.handoff: ScorerHandoff | None = None  # the GPU hand-off (docs/architecture.md), None: rows in frames

    def fail(self, rule: str, message: str) -> RunError:
        self._flush()  # the batches scored before the failure count in its report
        self.channel.send_json(Kind.ERROR, {"rule": rule, "message": message})
        return RunError(rule, message, reported=True)

    # --- set-up -------------------------------------------------------------------------------------------------

    def run(self) -> None:
        kind, payload = self.channel.recv()
        if kind == Kind.END:  # the trainer or the exporter ended before the stream
            return
        if kind != Kind.SHARE:
            raise self.fail("run:protocol", f"unexpected frame {kind.name} from the parent")
        share = parse_json(payload)
        if share["where"] == "cuda" and self.device.type != "cuda":  # where comes from the trainer's model
            raise self.fail("run:bad_geometry", "the model passed to iter_train_batches is on a GPU, but this run has "
                            "none: train on ctx.device")
        handoff = layout.HandoffSpec.model_validate(share["handoff"]) if "handoff" in share else None
        if handoff is not None and share["where"] != "cuda":
            raise self.fail("run:protocol", "the GPU hand-off was asked for a run whose weights are not on a GPU")
        torch.set_num_threads(max(1, int(share.get("threads", self.spec["threads"]))))  # before any forward
        slots, nbytes = layout.plan_slots(share["layout"])
        world_size = int(share.get("ranks", 1))
        exported: list[int] = []  # the descriptors of the GPU buffers this process shares (through the parent)
        ranks: list[torch.Tensor] = []  # each trainer rank's shared state; rank 0's is the one scored
        for rank in range(world_size):
            if share["where"] == "memfd":
                ranks.append(shared_state.map_memfd(self.channel.take_fd(), nbytes, writable=False))
            else:  # rank r trains on the run's r-th GPU: its buffer lives there
                buffer, fd = cuda_ipc.allocate(nbytes, self.device if world_size == 1 else torch.device("cuda", rank))
                ranks.append(buffer)  # zeroed
                exported.append(fd)
        if handoff is not None:  # each rank's hand-off buffer beside its state buffer, shared after them
            buffers = []
            for state in ranks:
                buffer, fd = cuda_ipc.allocate(handoff.nbytes, state.device)
                buffers.append(buffer)
                exported.append(fd)
                torch.cuda.synchronize(state.device)  # both words are 0 (allocate zeroes) before any stream reads them
            self.handoff = ScorerHandoff(CudaOps(), buffers, handoff, self.device)
        self.ranks = RankCheck(ranks, slots)
        shared = ranks[0]
        links = Ranks(world_size, float(self.spec["rank_timeout"]))  # each rank's batch channel, in rank order
        for _ in range(world_size):
            link = socket.socket(fileno=self.channel.take_fd())
            links.add(Channel(link, max_frame=_REQUEST_BYTES))  # the trainer's descriptors are closed, not taken
        program: Program | None = None  # the contract check scores nothing: it only hands out batches and
        step0: torch.Tensor | None = None  # compares the ranks
        if self.spec.get("scored", True):
            kind, payload = self.channel.recv()
            if kind != Kind.LOAD:
                raise self.fail("run:protocol", f"unexpected frame {kind.name} from the parent")
            program, step0 = self._load(payload, self.channel.take_fd(), slots, nbytes)
        self.channel.send_json(Kind.READY, {"shares_state": bool(exported)}, fds=tuple(exported))
        for fd in exported:
            os.close(fd)
        private = torch.empty(nbytes, dtype=torch.uint8, device=self.device)  # where the scorer computes
        try:
            ended = self._stream(program, shared, private, step0, slots, links, bool(share.get("overlap", True)))
        finally:
            for member in links.members:
                member.channel.close()
        if not ended:
            return
        if program is None or step0 is None:  # the contract check holds nothing out: the parent ends it
            kind, _ = self.channel.recv()
            if kind != Kind.END:
                raise self.fail("run:protocol", f"unexpected frame {kind.name} from the parent")
            return
        self._heldout(program, private, step0, slots)

    def _load(self, payload: bytes, blob_fd: int, slots: list[layout.Slot], nbytes: int
              ) -> tuple[Program, torch.Tensor]:
        """Parse and check the graph, read the exported initial state and constants, and try the forward on random
        tokens before any data."""
        try:
            if len(payload) > MAX_JSON_BYTES:
                raise GraphRejected("contract:graph_format", "the exported graph is too large")
            file = GraphFile.model_validate_json(payload)
        except ValueError as error:  # pydantic's ValidationError is a ValueError
            os.close(blob_fd)
            message = error.message if isinstance(error, GraphRejected) else "the exported graph is malformed"
            raise self.fail("contract:graph_format", message) from None
        blob = _read_blob(blob_fd, nbytes + sum(c.nbytes for c in file.constants))
        if blob is None:
            raise self.fail("contract:graph_format", "the exporter's state and constants are incomplete")
        step0 = torch.from_numpy(blob[:nbytes].copy()).to(self.device)
        constants = {}
        for spec in file.constants:
            if spec.dtype not in layout.ITEMSIZE or spec.nbytes != layout.ITEMSIZE[spec.dtype] * math.prod(spec.shape):
                raise self.fail("contract:graph_format", "a constant's size does not match its dtype and shape")
            raw = torch.from_numpy(blob[nbytes + spec.offset: nbytes + spec.offset + spec.nbytes].copy())
            constants[spec.name] = raw.view(getattr(torch, spec.dtype)).view(spec.shape).to(self.device)
        try:
            program = Program(file, [slot.name for slot in slots], constants, self.device)
        except GraphRejected as error:
            raise self.fail(error.rule, error.message) from None
        self._check_cap(program, slots, constants)
        self._check_forward(program, shared_state.views(step0, slots), file.batch_size, file.seq_len)
        return program, step0

    def _check_cap(self, program: Program, slots: list[layout.Slot], constants: dict[str, torch.Tensor]) -> None:
        """Everything the forward reads but the tokens counts: parameters, buffers and constants."""
        read = program.state_names()
        state = sum(math.prod(slot.shape) for slot in slots if slot.name in read)
        total = state + sum(tensor.numel() for tensor in constants.values())
        params = sum(math.prod(slot.shape) for slot in slots if slot.name in set(program.parameter_names()))
        self.model_params = params
        if total > self.spec["max_params"]:
            raise self.fail("contract:param_cap", f"the scored forward reads {total:,} numbers (parameters, buffers "
                            f"and constants), over the cap of {self.spec['max_params']:,}")

    def _check_forward(self, program: Program, state: list[torch.Tensor], batch_size: int, seq_len: int) -> None:
        # secret tokens: the exporter traced on tokens drawn from the run's seed, which the miner knows
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        tokens = torch.randint(0, self.vocab_size, (batch_size, seq_len), generator=generator).to(self.device)
        first, second = self._on_random_tokens(lambda: (program(state, tokens), program(state, tokens)))
        self._check_logits(first, batch_size, seq_len)
        if first.dtype != second.dtype or not _bitwise_equal(first, second):
            raise self.fail("run:nondeterministic", "two calls of the exported forward on the same input gave "
                            "different logits: the scored forward must be a deterministic function of its input")
        self.channel.send_json(Kind.INFO, {"model_params": self.model_params,
                                           "logits_dtype": str(first.dtype).removeprefix("torch.")})
        boundary = seq_len // 2
        perturbed = tokens.clone()
        perturbed[:, boundary:] = (tokens[:, boundary:] + 1) % self.vocab_size
        if batch_size > 1:
            perturbed[1:] = (tokens[1:] + 7) % self.vocab_size  # other rows must not mix in either
        clean = target_log_probs(first, tokens[:, 1:])[0, :boundary].cpu().numpy()
        probed = self._on_random_tokens(lambda: target_log_probs(program(state, perturbed), tokens[:, 1:]))
        probed = probed[0, :boundary].cpu().numpy()
        moved = drift(clean, probed)
        self.tolerance = causality_tolerance(str(first.dtype).removeprefix("torch."), self.device.type)
        if not moved <= self.tolerance:
            raise self.fail("run:non_causal", non_causal_message(boundary, moved))

    def _on_random_tokens(self, compute: Callable[[], _T]) -> _T:
        """Forwards on random tokens, before any data: whatever they raise is the bundle's failure, never a crash of
        the scorer, and the message may be shown."""
        try:
            return compute()
        except Exception as error:  # noqa: BLE001 — random tokens only
            raise self.fail("run:forward_failed", f"the exported forward raised on random tokens: "
                            f"{type(error).__name__}: {str(error)[:1500]}") from None

    def _check_logits(self, logits: torch.Tensor, batch_size: int, seq_len: int) -> None:
        shape = list(logits.shape)
        if logits.dim() != 3 or shape[:2] != [batch_size, seq_len] or shape[2] < self.vocab_size:
            hint = ""
            if logits.dim() == 3 and shape[0] == batch_size and shape[1] == 1:
                hint = (": the forward returns only the last position's logits — nanoGPT-style models do this when "
                        "called without targets (`logits = self.lm_head(x[:, [-1], :])`); return every position's")
            raise self.fail("run:bad_logits", f"logits must have shape [{batch_size}, {seq_len}, ≥{self.vocab_size}], "
                            f"got {shape}{hint}")
        if not logits.is_floating_point():
            raise self.fail("run:bad_logits", f"logits must be floating point, got {logits.dtype}")

    # --- the stream ---------------------------------------------------------------------------------------------

    def _forward(self, program: Program, state: list[torch.Tensor], tokens: torch.Tensor, what: str,
                 targets: torch.Tensor | None = None) -> torch.Tensor:
        """Target log-probs of a batch (its own next tokens unless `targets` is given)."""
        try:
            logits = program(state, tokens)
            return target_log_probs(logits, tokens[:, 1:] if targets is None else targets)
        except Exception as error:  # noqa: BLE001 — the graph saw data: only the type is told
            raise _forward_failure(error, what) from None

    def _stream(self, program: Program | None, shared: torch.Tensor, private: torch.Tensor, step0: torch.Tensor | None,
                slots: list[layout.Slot], links: Ranks, overlap: bool) -> bool:
        """Serve the ranks' requests from the batches sent ahead until they ask past the last one (True: the trained
        state is in `private` and held-out follows) or the parent says END."""
        state = shared_state.views(private, slots)
        ahead: deque[_Ahead] = deque()
        final = False  # the parent sent its last batch
        probe: tuple[int, np.ndarray, np.ndarray] | None = None  # the probe of the batch about to arrive
        waiting = False  # every rank has asked for the next batch and has none
        served = 0  # batches sent to the ranks so far
        records = self.records
        with selectors.DefaultSelector() as selector:
            selector.register(self.channel.sock, selectors.EVENT_READ, -1)
            for member in links.members:
                selector.register(member.channel.sock, selectors.EVENT_READ, member.index)
            while True:
                self._stage(ahead)
                if waiting and ahead:
                    self._serve(program, shared, private, step0, slots, state, links, ahead.popleft(), served,
                                overlap)
                    waiting, served = False, served + 1
                elif waiting and final:
                    self._flush()
                    self._take_final(shared, private, links, served)
                    return True
                if len(records) >= _RECORDS_AT_ONCE or not ahead:  # the parent sends more batches for records
                    self._flush()
                wake = min(links.overdue_at() or math.inf, time.monotonic() + _RECORDS_IDLE if records else math.inf)
                events = selector.select(timeout=None if wake == math.inf else max(0.0, wake - time.monotonic()))
                if not events:
                    self._flush()
                hung = links.overdue(time.monotonic())
                if hung is not None:
                    raise self.fail(hung.rule, hung.message)
                for key, _ in events:
                    if key.data == -1:
                        kind, payload = self.channel.recv()
                        if kind == Kind.PROBE:  # comes just before its batch
                            index, probe_rows, probe_tokens = parse_probe(payload)
                            probe = (index, probe_rows, probe_tokens)
                        elif kind == Kind.BATCH:
                            index, batch_size, seq_len, chunk, compare = parse_batch(payload)
                            ahead.append(_Ahead(index, batch_size, seq_len, chunk, compare == 1))
                            if probe is not None:
                                if probe[0] != index:
                                    raise self.fail("run:protocol", "a probe for another batch")
                                ahead[-1].probe, probe = probe[1:], None
                        elif kind == Kind.FINAL:
                            final = True
                        elif kind == Kind.END:
                            return False
                        else:
                            raise self.fail("run:protocol", f"unexpected frame {kind.name} from the parent")
                    else:
                        asked = self._asked(links, key.data, next_step(served), waiting)
                        if asked is None:  # the rank is gone: the parent hears why on the rank's own channel
                            selector.unregister(key.fileobj)
                        waiting = waiting or bool(asked)

    def _flush(self) -> None:
        if self.records:
            self.channel.send_records(self.records)
            self.records.clear()

    def _asked(self, links: Ranks, rank: int, step: str, waiting: bool) -> bool | None:
        """Read rank `rank`'s request: True once every rank has asked, None if its channel closed."""
        member = links.members[rank]
        who = links.label(rank)
        try:
            kind, payload = member.channel.recv(timeout=_REQUEST_SECONDS)
        except ProtocolError as error:
            if str(error) == "connection closed":
                return None
            raise self.fail("run:crash", f"{who} broke the protocol on its batch channel: {error}") from None
        except TimeoutError:
            raise self.fail("run:crash", f"{who} stopped in the middle of a frame on its batch channel") from None
        if kind != Kind.NEXT or payload:
            raise self.fail("run:crash", f"{who} sent {kind.name} on its batch channel, where only NEXT belongs")
        if waiting or step in member.reached:
            raise self.fail("run:crash", f"{who}: next batch requested twice")
        return links.reach(rank, step)

    def _serve(self, program: Program | None, shared: torch.Tensor, private: torch.Tensor, step0: torch.Tensor | None,
               slots: list[layout.Slot], state: list[torch.Tensor], links: Ranks, batch: _Ahead, request: int,
               overlap: bool) -> None:
        """Every rank asked: snapshot, then batch k to the ranks (before its forward when the run overlaps the two,
        after it when not), its loss record, then its probe on the same snapshot (the records go first: the parent
        judges the probe with the books up to date)."""
        first = request == 0
        what = f"batch {batch.index}"
        # A checked snapshot is read on the host before the ranks get their rows, as without the GPU hand-off.
        self._snapshot(shared, private, request, what, settle=first or batch.compare)
        if first and step0 is not None:  # the first batch is scored on the exported initial state, nothing else
            self._check_init(private, step0, slots)
        if batch.compare:
            self._check_ranks(private, what)
        if program is None:  # the contract check: the batch counts, nothing is scored
            self._release(links, batch, request)
            self.records.append((batch.index, 0.0, True))
            return
        if overlap:
            self._release(links, batch, request)
        if self.handoff is None:
            tokens = rows(batch.chunk, batch.seq_len).to(self.device)
        else:  # nothing after this waits on a rank any more: no host sync below can hang on one
            self._settle(what)
            assert batch.staged is not None
            tokens = self.handoff.scored(batch.staged)
        log_probs = self._scored(program, state, tokens, f"scored batch {batch.index}")
        nats = -float(log_probs.double().sum())
        self.records.append((batch.index, nats if math.isfinite(nats) else 0.0, math.isfinite(nats)))
        if not overlap:
            self._release(links, batch, request)
        if batch.probe is not None:
            self._flush()
            self._probe(program, state, (batch.index, tokens, log_probs), *batch.probe)

    def _release(self, links: Ranks, batch: _Ahead, request: int) -> None:
        """Each rank its own rows of the batch, whole however long the rank takes to read them (the run's clock bounds
        that). A rank that has gone is the parent's to report. With the GPU hand-off the rows reach each rank's
        buffer after the snapshot in the GPUs' order, and the frame is a header."""
        if self.handoff is not None:
            assert batch.staged is not None
            self.handoff.release(request, batch.staged)
        for member in links.members:
            count, chunk = links.shard(batch.chunk, batch.batch_size, batch.seq_len, member.index)
            member.channel.sock.settimeout(None)
            try:
                member.channel.send_batch(batch.index, count, batch.seq_len,
                                          chunk if self.handoff is None else _NO_TOKENS)
            except ProtocolError:
                pass

    def _snapshot(self, shared: torch.Tensor, private: torch.Tensor, request: int, what: str, settle: bool) -> None:
        """`private` ← `shared` once every rank's step before `request` has landed: a host sync after the copy, or
        with the GPU hand-off the copy ordered on the GPU (`settle`: and waited for, within the rank timeout)."""
        if self.handoff is None:
            private.copy_(shared)
            _synchronize(private)
            return
        self.handoff.snapshot(request, shared, private)
        if settle:
            self._settle(what)

    def _settle(self, what: str) -> None:
        """GPU hand-off: wait (polling) until every rank's step before the last request has landed."""
        assert self.handoff is not None
        late = self.handoff.late(float(self.spec["rank_timeout"]))
        if late:
            who = "the trainer's" if len(self.handoff.rows) == 1 else "rank " + ", ".join(map(str, late)) + "'s"
            raise self.fail("run:rank_hung", f"{who} GPU work before its request for {what} did not finish within "
                            f"{self.spec['rank_timeout']:g} s of the request: the scorer waits for it on the GPU "
                            "before it takes its snapshot; a kernel that never ends, or a stream left waiting on "
                            "something that never comes, stalls the run")

    def _stage(self, ahead: deque[_Ahead]) -> None:
        """GPU hand-off: the next batches' tokens onto the GPUs before their request, so that nothing between a
        request and its release copies from host memory."""
        if self.handoff is None:
            return
        for batch in itertools.islice(ahead, _STAGED):
            if batch.staged is None:
                try:
                    batch.staged = self.handoff.stage(rows(batch.chunk, batch.seq_len))
                except torch.cuda.OutOfMemoryError:
                    raise self.fail("run:out_of_memory", f"the GPU ran out of memory when the scorer staged batch "
                                    f"{batch.index}'s tokens: {_ROOM}") from None

    def _take_final(self, shared: torch.Tensor, private: torch.Tensor, links: Ranks, request: int) -> None:
        """The ranks asked past the last batch: take the trained state now; only then do they hear END, so nothing
        they do afterwards reaches the held-out passes."""
        self._snapshot(shared, private, request, "the end of the stream", settle=True)
        self._check_ranks(private, "the end of the stream")
        self.channel.send(Kind.SNAPPED, b"final")  # before END: the parent knows the stream ended before any rank
        for member in links.members:
            member.channel.sock.settimeout(None)
            try:
                member.channel.send(Kind.END)
            except ProtocolError:
                pass

    def _scored(self, program: Program, state: list[torch.Tensor], tokens: torch.Tensor, what: str) -> torch.Tensor:
        try:
            return self._forward(program, state, tokens, what)
        except ForwardFailed as error:
            raise self._stream_failure(error) from None

    def _stream_failure(self, error: ForwardFailed) -> RunError:
        """During the stream the trainer shares the GPU: a forward without memory says what to leave the scorer."""
        return self.fail(error.rule, f"{error}: {_ROOM}" if error.rule == "run:out_of_memory" else str(error))

    def _probe(self, program: Program, state: list[torch.Tensor], last: tuple[int, torch.Tensor, torch.Tensor],
               probe_rows: np.ndarray, probe_tokens: np.ndarray) -> None:
        """The probe batch on the same snapshot; each probe row's target log-probs before its boundary, against the
        real row's targets (the real token at the boundary too: the probe input holds filler there)."""
        index, real_tokens, real = last
        tokens = torch.from_numpy(probe_tokens.astype(np.int64)).to(self.device)
        if tokens.shape != real_tokens.shape:
            raise self.fail("run:protocol", "a probe batch of another shape")
        try:
            logits = program(state, tokens)
            probed = target_log_probs(logits, real_tokens[:, 1:])
        except Exception as error:  # noqa: BLE001 — the graph saw data: only the type is told
            raise self._stream_failure(_forward_failure(error, "a probe batch")) from None
        drifts = []
        for row, boundary in probe_rows.tolist():
            drifts.append([row, boundary, drift(real[row, :boundary].cpu().numpy(),
                                                probed[row, :boundary].cpu().numpy())])
        self.channel.send(Kind.PROBED, json.dumps({"index": index, "rows": drifts}).encode())

    def _check_ranks(self, private: torch.Tensor, when: str) -> None:
        found = self.ranks.differs(private, when)
        if found is not None:
            raise self.fail("run:ranks_diverged", found)

    def _check_init(self, private: torch.Tensor, step0: torch.Tensor, slots: list[layout.Slot]) -> None:
        if torch.equal(private, step0):
            return
        changed = next(slot.name for slot, mine, theirs in zip(slots, shared_state.views(step0, slots),
                                                               shared_state.views(private, slots), strict=True)
                       if not torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8)))
        raise self.fail("run:init_changed", f"`{changed}` differs from a fresh ctx.build_model() when the first batch "
                        "is scored: every run starts from the forced random init. Initialise weights (and buffers: "
                        "torch.zeros, not torch.empty) in build_model, not in training.py; converting dtype or "
                        "device before iter_train_batches is fine")

    def _heldout(self, program: Program, private: torch.Tensor, step0: torch.Tensor, slots: list[layout.Slot]
                 ) -> None:
        """The trained state is in `private`: once the trainer has exited, score parent-sent batches with that state
        (aux 1) or the step-0 state (aux 0).
        The final state was never probed: its first batch, and later ones at the stream's rate, get a probe batch
        built here from the batch itself (the step-0 state is the one batch 0 was scored and probed on)."""
        torch.set_num_threads(max(1, self.spec["threads"]))  # the trainer is gone: every core is the scorer's
        states = {0: shared_state.views(step0, slots), 1: shared_state.views(private, slots)}
        random = secrets.SystemRandom()
        probed_final = False
        while True:
            kind, payload = self.channel.recv()
            if kind == Kind.END:
                return
            if kind != Kind.BATCH:
                raise self.fail("run:protocol", f"unexpected frame {kind.name} from the parent")
            index, _, seq_len, chunk, which = parse_batch(payload)
            if which not in states:
                raise self.fail("run:protocol", "a held-out batch for an unknown state")
            tokens = rows(chunk, seq_len).to(self.device)
            try:
                log_probs = self._forward(program, states[which], tokens, "a held-out batch")
                if which == 1 and (not probed_final or random.randrange(max(1, self.spec["probe_every"])) == 0):
                    probed_final = True
                    self._heldout_probe(program, states[which], tokens, log_probs, random)
            except ForwardFailed as error:
                raise self.fail("run:heldout_failed", str(error)) from None
            nats = -float(log_probs.double().sum())
            self.channel.send_record(index, nats if math.isfinite(nats) else 0.0, math.isfinite(nats))


    def _heldout_probe(self, program: Program, state: list[torch.Tensor], tokens: torch.Tensor,
                       real: torch.Tensor, random: secrets.SystemRandom) -> None:
        """Causality of the trained state on held-out text. The message is fixed: the drift was computed on secret
        text, so not even its size is told."""
        probe_rows, probe_tokens = heldout_probe(tokens.cpu().numpy(), random, self.vocab_size)
        probed = self._forward(program, state, torch.from_numpy(probe_tokens).to(self.device), "a held-out probe",
                               targets=tokens[:, 1:])
        for row, boundary in probe_rows:
            moved = drift(real[row, :boundary].cpu().numpy(), probed[row, :boundary].cpu().numpy())
            if not moved <= self.tolerance:
                raise self.fail("run:non_causal", "in a held-out pass, the trained model's predictions before a "
                                "random boundary changed when later tokens changed: the model sees the future")


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN where NaN was): what a deterministic function gives twice."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(-1).view(torch.uint8),
                                              b.contiguous().view(-1).view(torch.uint8))


def _read_blob(fd: int, size: int) -> np.ndarray | None:
    """The exporter's memfd, read into private memory (the exporter has exited: nothing writes it any more)."""
    try:
        if os.fstat(fd).st_size < size:
            return None
        out = bytearray(size)
        view, got = memoryview(out), 0
        while got < size:
            n = os.preadv(fd, [view[got:]], got)
            if n <= 0:
                return None
            got += n
        return np.frombuffer(out, dtype=np.uint8)
    finally:
        os.close(fd)


def _synchronize(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()


def main() -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sys.argv[1])
    channel = Channel(sock, accept_fds=True)
    kind, payload = channel.recv()
    if kind != Kind.CONFIG:
        return 3
    spec = parse_json(payload)
    force_determinism()
    torch.set_num_threads(max(1, spec["threads"]))
    if spec["device"] == "auto":
        spec["device"] = "cuda:0" if torch.cuda.is_available() else "cpu"
    elif spec["device"] == "cuda":
        spec["device"] = "cuda:0"  # one visible GPU per run (Ray sets CUDA_VISIBLE_DEVICES)
    if spec["device"].startswith("cuda"):
        torch.cuda.set_device(torch.device(spec["device"]))
    channel.send_json(Kind.HELLO, {"role": "scorer", "pid": os.getpid(), "torch": torch.__version__,
                                   "device": spec["device"]})
    try:
        Scorer(channel, spec).run()
    except RunError as error:
        if not error.reported:
            channel.send_json(Kind.ERROR, {"rule": error.rule, "message": error.message})
        return 1
    channel.send(Kind.DONE)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # every record has left over the socket: skip the interpreter's teardown
