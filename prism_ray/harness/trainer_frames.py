"""The trusted parent's half of the stream: the trainer ranks' frames and feeding the scorer its batches.

Mixed into the session (session.py), whose state it shares. The parent is off the per-batch hot path: it sends the
scorer batches a few ahead (with their probes), and each rank asks the scorer itself for the next batch over a
batch channel of its own; once every rank has asked, the scorer snapshots the weights and only then sends each
rank its rows (docs/architecture.md, "One submission's path" and "Several ranks").
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import time

from prism_ray.errors import PrismError, Reason
from prism_ray.harness import layout
from prism_ray.harness.probes import ProbePlan
from prism_ray.harness.protocol import Kind, ProtocolError, parse_json
from prism_ray.harness.stream import StreamPlan, check_geometry

MAX_BATCH_TOKENS = 1 << 22
GPU_RANK_CHECK_EVERY = 8  # on a GPU, one snapshot in this many (at random) compares the ranks, and the last
AHEAD = 32  # batches the scorer may hold before the ranks ask for them: its records come back several at a time
AHEAD_BYTES = 32 << 20  # and their tokens at most this (large GPU batches)


# What a rank's GEOMETRY frame holds (harness/trainer.py sends it).
_GEOMETRY_FIELDS = {"batch_size", "seq_len", "with_logits", "layout", "device"}


class TrainerFrames:
    # --- trainer frames (one handler per frame kind; `rank` says whose) -------------------------------------------

    def _trainer_hello(self, rank: int, payload: bytes) -> None:
        pass

    def _trainer_geometry(self, rank: int, payload: bytes) -> None:
        member = self.ranks.members[rank]
        request = parse_json(payload)
        if not set(request) <= _GEOMETRY_FIELDS:  # kept for the run: nothing but what the parent reads
            raise self._crash("trainer", f"{self.ranks.label(rank)}: unknown fields in its geometry")
        member.layout_digest = hashlib.sha256(json.dumps(request.get("layout")).encode()).hexdigest()
        if rank:  # only rank 0's layout is used: the others' (up to MiBs of JSON each) are compared by digest
            request["layout"] = None
        member.geometry = request
        try:
            check_geometry(request.get("batch_size"), request.get("seq_len"), self.spec.max_seq_len,
                           MAX_BATCH_TOKENS)
        except PrismError as error:
            member.channel.send_json(Kind.REFUSE, error.reasons[0].model_dump())
            self._fail(*error.reasons)
        if not self.ranks.reach(rank, "geometry"):
            return
        disagreement = self.ranks.disagreement()
        if disagreement is not None:
            self._refuse_all("run:ranks_disagree", f"every rank must call ctx.iter_train_batches with the same "
                             f"arguments and the same model: {disagreement}")
        first = self.ranks.members[0].geometry
        assert first is not None
        batch_size, world_size = first["batch_size"], self.ranks.world_size
        if batch_size % world_size:
            self._refuse_all("run:uneven_shards", f"batch_size={batch_size} does not split across "
                             f"{world_size} ranks: batch_size is the global batch, and each rank gets "
                             f"batch_size / world_size of its rows; make it a multiple of ctx.world_size")
        self.outcome.batch_size, self.outcome.seq_len = batch_size, first["seq_len"]
        self.outcome.with_logits = bool(first.get("with_logits"))
        self.geometry = first
        self._share()

    def _trainer_ready(self, rank: int, payload: bytes) -> None:
        if self.ranks.reach(rank, "ready"):
            self._ready("trainer")

    def _trainer_done(self, rank: int, payload: bytes) -> None:
        self.selector.unregister(self.ranks.members[rank].channel.sock)  # its end closes as it exits
        if not self.stream_ended:
            self._pending_scorer_frames()  # the scorer said the stream ended before the rank could hear it
        if not self.stream_ended:
            who = "" if self.ranks.world_size == 1 else f"rank {rank}: "
            self._fail(Reason(rule="run:stopped_early", message=f"{who}train(ctx) returned before the scored stream "
                              "ended; every run must consume its whole byte budget"))
        if not self.ranks.reach(rank, "done"):
            return
        self.trainer_done = True
        if self.stream_started:  # the miner's last optimizer step is part of the run's time
            self.outcome.stream_seconds = time.monotonic() - self.stream_started

    def _refuse_all(self, rule: str, message: str) -> None:
        for member in self.ranks.members:
            member.channel.send_json(Kind.REFUSE, {"rule": rule, "message": message})
        self._fail(Reason(rule=rule, message=message))

    # --- the stream ---------------------------------------------------------------------------------------------

    def _share(self) -> None:
        """Once both the exporter's fresh build and the trainer's model are known: the export at the trainer's
        geometry and dtypes, and one buffer per rank for the state."""
        if self.layout is None or self.geometry is None or self.plan is not None:
            return
        theirs = self.geometry.get("layout")
        if not isinstance(theirs, list) or not all(isinstance(e, list) and len(e) == 3 for e in theirs) \
                or [e[:2] for e in theirs] != [e[:2] for e in self.layout]:
            self._refuse_all("run:model_mismatch", "the model passed to iter_train_batches does not have the "
                             "parameters and buffers of a fresh ctx.build_model() (names and shapes must match; "
                             "dtypes may differ): the scorer scores the architecture's model with the trainer's "
                             "weights, so train the model build_model returns")
        try:
            _, nbytes = layout.plan_slots(theirs)
        except (ValueError, TypeError) as error:
            raise self._crash("trainer", f"bad state layout: {error}") from None
        plan = StreamPlan(self.tokens, self.byte_lengths, self.outcome.batch_size, self.outcome.seq_len,
                          self.spec.byte_budget)
        self.plan, self.batches = plan, plan.batches()
        self.outcome.planned_batches = plan.planned_batches()
        self.probes = ProbePlan(plan, self.spec.probe_every, self.spec.vocab_size)
        self.on_gpu = str(self.geometry.get("device", "cpu")).startswith("cuda")
        # Batch k goes to the ranks once its snapshot is taken, so the scorer's forward on k overlaps their step
        # on k: on a GPU always; on CPU where the run has two cores or more, its threads split between the two
        # (scorer_threads). With one core the ranks wait for batch k's record, as a bare loop with one more
        # forward would: the two would only take turns on it.
        self.overlap = self.on_gpu or self.spec.threads >= 2
        # The ranks keep their threads (the trained weights do not depend on this switch); the scorer's forward,
        # a third of a training step's work, takes half the cores. Fixed by the settings alone: a re-run on a
        # node with the same PRISM_RUNNER_THREADS scores the same bits (docs/scoring.md, audits).
        self.scorer_threads = self.spec.threads if self.on_gpu or not self.overlap else self.spec.threads // 2
        # The GPU hand-off (docs/architecture.md, "The GPU hand-off"), opt-in: each rank's rows reach a buffer on its
        # GPU, ordered after the snapshot by the GPUs' streams. A run on CPU (the contract check included) keeps
        # its rows in the frames, whatever the setting.
        if self.on_gpu and self.spec.gpu_handoff == "stream":
            self.handoff = layout.HandoffSpec(rows=self.outcome.batch_size // self.ranks.world_size,
                                              seq_len=self.outcome.seq_len)
        if self.spec.scored:
            self.export_asked = True
            self.channels["exporter"].send_json(Kind.EXPORT, {"batch_size": self.outcome.batch_size,
                                                              "seq_len": self.outcome.seq_len, "layout": theirs})
        else:  # the contract check needed the exporter's fresh build only, to hold the ranks' model to it
            self._dismiss_exporter()
        # each rank's batch channel to the scorer: the scorer's ends go with its SHARE, the ranks' with theirs
        self.batch_links = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in self.ranks.members]
        if not self.on_gpu:  # on a GPU the scorer allocates on the ranks' GPUs and hands over the descriptors (READY)
            self.state_fds = [layout.new_memfd(f"prism-state-{m.index}", nbytes) for m in self.ranks.members]
            self._share_with_ranks("memfd", self.state_fds)
        if not self.spec.scored:  # no graph to wait for
            self._share_with_scorer()

    def _dismiss_exporter(self) -> None:
        exporter = self.channels.pop("exporter")
        self.selector.unregister(exporter.sock)
        try:
            exporter.send(Kind.END)
        except ProtocolError:  # gone already: it is stopped at the end either way
            pass
        exporter.close()

    def _share_with_scorer(self) -> None:
        """The scorer's SHARE: the ranks' state buffers (CPU) and its ends of their batch channels."""
        assert self.geometry is not None
        share = {"where": "cuda" if self.on_gpu else "memfd", "layout": self.geometry["layout"],
                 "ranks": self.ranks.world_size, "threads": self.scorer_threads, "overlap": self.overlap}
        if self.handoff is not None:
            share["handoff"] = self.handoff.model_dump()
        self.channels["scorer"].send_json(Kind.SHARE, share,
                                          fds=(*self.state_fds, *(mine.fileno() for mine, _ in self.batch_links)))
        for mine, _ in self.batch_links:
            mine.close()

    def _share_with_ranks(self, where: str, state_fds: list[int], handoff_fds: list[int] | None = None) -> None:
        """Each rank's SHARE: its state buffer, its GPU hand-off buffer if the run has one, and its end of the batch
        channel (the parent keeps no copy)."""
        assert self.geometry is not None and (self.handoff is None) == (handoff_fds is None)
        share = {"where": where, "layout": self.geometry["layout"]}
        if self.handoff is not None:
            share["handoff"] = self.handoff.model_dump()
        for member, fd, (_, theirs) in zip(self.ranks.members, state_fds, self.batch_links, strict=True):
            handoff = () if handoff_fds is None else (handoff_fds[member.index],)
            member.channel.send_json(Kind.SHARE, share, fds=(fd, *handoff, theirs.fileno()))
            theirs.close()

    def _ready(self, role: str) -> None:
        self.ready.add(role)
        if self.ready == {"scorer", "trainer"}:
            self.stream_started = time.monotonic()
            self._feed()

    def _feed(self) -> None:
        """Keep the scorer `AHEAD` batches ahead of its records; after the last batch, FINAL."""
        if self.scorer_gone:
            return
        try:
            self._send_ahead()
        except ProtocolError:  # the scorer stopped: what it sent before it did (records, its ERROR) says why
            self.scorer_gone = True
            self._pending_scorer_frames()
            raise self._crash("scorer", "it closed its channel while batches were still to come", closed=True) from None

    def _send_ahead(self) -> None:
        while len(self.unrecorded) < AHEAD and not self.finalizing and not self.stream_ended \
                and sum(piece.chunk.nbytes for piece in self.unrecorded.values()) < AHEAD_BYTES:
            self.released += 1
            limit = self.spec.max_batches
            piece = next(self.batches, None) if limit is None or self.released <= limit else None
            if piece is None:
                if self.released == 1:
                    self._fail(Reason(rule="run:no_batch", message="the train split cannot fill a single batch of "
                                      "this geometry"))
                self._final()
                return
            # Which snapshots compare the ranks' weights is the parent's choice, at random on a GPU: a rank cannot
            # tell which ones are checked.
            compare = self.ranks.world_size > 1 and (not self.on_gpu or piece.index == 0
                                                      or secrets.randbelow(GPU_RANK_CHECK_EVERY) == 0)
            scorer = self.channels["scorer"]
            probe = self.probes.for_batch(piece)
            if probe is not None:  # just before its batch: the scorer runs it on the batch's snapshot
                self.probing.add(piece.index)
                scorer.send_probe(piece.index, probe.rows, probe.tokens)
            scorer.send_batch(piece.index, self.outcome.batch_size, self.outcome.seq_len, piece.chunk, int(compare))
            self.unrecorded[piece.index] = piece

    def _final(self) -> None:
        budget = self.spec.byte_budget
        scored = sum(self.outcome.batch_bytes) + sum(p.target_bytes for p in self.unrecorded.values())
        self.outcome.stopped_reason = "byte_budget" if budget and scored >= budget else "stream_exhausted"
        # The trained state is what the ranks hold when they ask past the last batch: the scorer takes it then,
        # before they hear END, so nothing they do afterwards reaches the held-out passes.
        self.finalizing = True
        self.channels["scorer"].send(Kind.FINAL)
