"""The trusted parent of one run: it owns the stream, launches the scorer and the trainer, and keeps the books.

Per batch k: the trainer asks for it (NEXT) → the scorer snapshots the shared state (SNAPSHOT/SNAPPED) → batch k
goes to the scorer and, only now, to the trainer → the scorer's record of Σ −ln p(target) on the snapshot arrives
while the trainer trains → the batch's probe rows go to the prober, whose log-probs are compared here. Targets and
bytes are counted here from the stream geometry; the scorer reports only nats, the trainer nothing that counts.
After the trainer has exited, the scorer runs the held-out passes. docs/architecture.md, "One submission's path".
"""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from prism_ray.errors import PrismError, Reason
from prism_ray.harness import layout
from prism_ray.harness.heldout import HeldoutError, score_passes
from prism_ray.harness.isolation import SandboxPolicy
from prism_ray.harness.probes import ProbeDesk, ProbeError, ProbePlan, causality_tolerance, non_causal_message
from prism_ray.harness.protocol import Channel, Kind, ProtocolError, parse_json, parse_record, parse_row
from prism_ray.harness.records import Books, HeldoutPlan, Progress, RunSpec, TrainOutcome
from prism_ray.harness.stream import BatchSlice, StreamPlan, check_geometry
from prism_ray.harness.supervise import Runner

MAX_BATCH_TOKENS = 1 << 22


class _Failed(Exception):
    """Ends the run with the reasons already recorded."""


def run_session(spec: RunSpec, tokens: np.ndarray, byte_lengths: np.ndarray, run_dir: Path, time_limit: float,
                progress: Callable[[Progress], None] | None = None, policy: SandboxPolicy | None = None,
                heldout: HeldoutPlan | None = None, heldout_time_limit: float = 300.0) -> TrainOutcome:
    """Train and score one bundle; `heldout` (called once training completed) names the held-out passes."""
    return _Session(spec, tokens, byte_lengths, run_dir, time_limit, progress, policy or SandboxPolicy(),
                    heldout, heldout_time_limit).run()


class _Session:
    def __init__(self, spec: RunSpec, tokens: np.ndarray, byte_lengths: np.ndarray, run_dir: Path, time_limit: float,
                 progress: Callable[[Progress], None] | None, policy: SandboxPolicy, heldout: HeldoutPlan | None,
                 heldout_time_limit: float):
        self.spec, self.tokens, self.byte_lengths, self.run_dir = spec, tokens, byte_lengths, run_dir
        self.time_limit, self.progress, self.policy = time_limit, progress, policy
        self.heldout_plan, self.heldout_time_limit = heldout, heldout_time_limit
        self.outcome = TrainOutcome()
        self.books = Books(self.outcome, spec.vocab_size)
        self.runners: dict[str, Runner] = {}
        self.channels: dict[str, Channel] = {}
        self.selector = selectors.DefaultSelector()
        self.deadline = 0.0
        # stream state
        self.layout: list | None = None
        self.geometry: dict | None = None
        self.ready: set[str] = set()
        self.plan: StreamPlan | None = None
        self.batches: Iterator[BatchSlice] | None = None
        self.probes: ProbePlan | None = None
        self.tolerance = 0.0
        # On a GPU the trainer gets a batch as soon as its snapshot is taken, so the scorer's forward overlaps the
        # trainer's step (the GPU interleaves them). On CPU both would fight for the same cores: the trainer waits
        # for the record instead, as a bare loop with one extra forward would.
        self.overlap = False
        self.trainer_waiting = False  # the trainer asked for a batch and has none
        self.snapshotting: BatchSlice | None = None
        self.unrecorded: dict[int, BatchSlice] = {}
        self.desk = ProbeDesk()
        self.stream_ended = False
        self.trainer_done = False
        self.trainer_error: Reason | None = None  # the trainer's failure, held until the scorer's probe is in
        self.stream_started = 0.0

    # --- the run ------------------------------------------------------------------------------------------------

    def run(self) -> TrainOutcome:
        started = time.monotonic()
        self.deadline = started + self.time_limit
        try:
            self._launch()
            self._train()
            self._finish_trainer()
            self._heldout()
        except _Failed:
            pass
        except TimeoutError:
            self.outcome.reasons.append(Reason(rule="run:timeout", message=f"the run passed its wall-clock limit of "
                                               f"{self.time_limit:g} s; it is not scored"))
            self.outcome.stopped_reason = "wall_clock_exceeded"
        except PrismError as error:
            self.outcome.reasons.extend(error.reasons)
        finally:
            self._close()
            self.outcome.wall_seconds = time.monotonic() - started
        self.outcome.status = "failed" if self.outcome.reasons else "completed"
        return self.outcome

    def _launch(self) -> None:
        spec = self.spec
        spec.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.runners["scorer"] = Runner("scorer", self.run_dir, spec.threads, self.policy,
                                        (spec.scorer_bundle_dir,), None)
        self.runners["trainer"] = Runner("trainer", self.run_dir, spec.threads, self.policy, (spec.bundle_dir,),
                                         spec.artifacts_dir)
        self.outcome.sandboxed = self.runners["trainer"].process.sandboxed
        for role in ("scorer", "trainer"):
            channel = self._accept(role, role)
            channel.send_json(Kind.CONFIG, spec.runner_spec(role))
        self._accept("scorer", "prober")

    def _accept(self, runner: str, role: str) -> Channel:
        try:
            channel = self.runners[runner].accept(self.deadline)
        except ProtocolError as error:
            raise self._crash(runner, str(error)) from None
        channel.accept_fds = role == "scorer"  # only to pass on its GPU buffers; the trainer's are closed at once
        self.channels[role] = channel
        self.selector.register(channel.sock, selectors.EVENT_READ, role)
        return channel

    def _train(self) -> None:
        while not (self.trainer_done and self.stream_ended and self._settled()):
            if self.trainer_done and not self.stream_ended:
                self._fail(Reason(rule="run:stopped_early", message="train(ctx) returned before the scored stream "
                                  "ended; every run must consume its whole byte budget"))
            self._dispatch(self.deadline)

    def _settled(self) -> bool:
        return not (self.unrecorded or self.snapshotting) and self.desk.idle

    def _dispatch(self, deadline: float) -> None:
        """Handle the next frame from whichever runner sent one."""
        events = self.selector.select(timeout=max(0.0, deadline - time.monotonic()))
        if not events and time.monotonic() >= deadline:
            raise TimeoutError
        for channel in self.channels.values():  # sends honour the deadline too: a runner that stops reading stalls
            channel.sock.settimeout(max(0.001, deadline - time.monotonic()))
        for key, _ in events:
            role = key.data
            try:
                kind, payload = self.channels[role].recv(timeout=max(0.001, deadline - time.monotonic()))
            except ProtocolError as error:
                self._pending_errors(role)
                raise self._crash("trainer" if role == "trainer" else "scorer", f"{role}: {error}") from None
            self._handle(role, kind, payload)

    def _pending_errors(self, closed: str) -> None:
        """A runner's socket closed: if another runner already said why (the scorer's typed error ends the prober
        with it), that reason wins over a bare crash."""
        waited = time.monotonic() + 1.0
        for role, channel in self.channels.items():
            if role == closed:
                continue
            while True:
                with selectors.DefaultSelector() as one:
                    one.register(channel.sock, selectors.EVENT_READ)
                    if not one.select(timeout=max(0.0, waited - time.monotonic())):
                        break
                try:
                    kind, payload = channel.recv(timeout=1.0)
                except ProtocolError:
                    break
                if kind == Kind.ERROR:
                    self._handle(role, kind, payload)

    def _handle(self, role: str, kind: Kind, payload: bytes) -> None:
        if kind == Kind.ERROR:
            error = parse_json(payload)
            reason = Reason(rule=str(error.get("rule", "run:exception")), message=str(error.get("message", ""))[:4000],
                            file=error.get("file"), line=error.get("line"))
            if role == "trainer" and self.layout is None:
                # The trainer builds the same architecture: if the scorer's instantiation probe fails too, the bundle
                # is rejected for that (before any data); only a sound architecture leaves the failure to training.
                self.trainer_error = reason
                self.selector.unregister(self.channels["trainer"].sock)
                return
            self._fail(reason, before_data=role != "trainer" and self.layout is None)
        handler = getattr(self, f"_{role}_{kind.name.lower()}", None)
        if handler is None:
            raise self._crash("trainer" if role == "trainer" else "scorer",
                              f"unexpected frame {kind.name} from the {role}")
        handler(payload)

    # --- scorer frames ------------------------------------------------------------------------------------------

    def _scorer_hello(self, payload: bytes) -> None:
        self.outcome.device = parse_json(payload).get("device")

    def _prober_hello(self, payload: bytes) -> None:
        pass

    def _scorer_info(self, payload: bytes) -> None:
        self.outcome.model_params = parse_json(payload).get("model_params")

    def _scorer_layout(self, payload: bytes) -> None:
        self.layout = parse_json(payload)["layout"]
        if self.trainer_error is not None:
            self._fail(self.trainer_error)
        self._share()

    def _scorer_ready(self, payload: bytes) -> None:
        """The scorer mapped the state; on a GPU it passes on the descriptors of the buffers it exported."""
        ready = parse_json(payload)
        assert self.geometry is not None
        layout = self.geometry["layout"]
        scorer = self.channels["scorer"]
        passed = [scorer.take_fd() for flag in ("shares_state", "shares_probe") if ready.get(flag)]
        try:
            if ready.get("shares_state"):
                self.channels["trainer"].send_json(Kind.SHARE, {"where": "cuda", "layout": layout}, fds=(passed[0],))
            where = "cuda" if ready.get("shares_probe") else "memfd"
            self.channels["prober"].send_json(Kind.SHARE, {"where": where, "layout": layout},
                                              fds=(passed[-1],) if where == "cuda" else ())
        finally:
            for fd in passed:
                os.close(fd)
        self._ready("scorer")

    def _prober_ready(self, payload: bytes) -> None:
        self._ready("prober")

    def _scorer_snapped(self, payload: bytes) -> None:
        piece = self.snapshotting
        if piece is None or int(payload or b"-1") != piece.index:
            raise self._crash("scorer", "snapshot of a batch that was not asked for")
        self.snapshotting = None
        self._send_batch("scorer", piece)
        if self.overlap:  # the trainer sees batch k only now, after the snapshot it is scored on
            self._send_batch("trainer", piece)
        self.unrecorded[piece.index] = piece
        assert self.probes is not None
        rows = self.probes.rows_for(piece)
        if rows:
            self.desk.add(rows)
            self._stage_probe()

    def _scorer_record(self, payload: bytes) -> None:
        index, nats, finite = parse_record(payload)
        piece = self.unrecorded.pop(index, None)
        if piece is None:
            raise self._crash("scorer", f"loss record for batch {index} was not expected")
        self.books.record(piece, nats, finite)
        if not self.overlap:
            self._send_batch("trainer", piece)
        self.outcome.stream_seconds = time.monotonic() - self.stream_started
        if self.progress is not None:
            self.progress(Progress(self.outcome.batches, self.books.bytes, self.spec.byte_budget,
                                   self.books.running_bpb, self.books.targets / max(self.outcome.stream_seconds, 1e-9)))

    def _send_batch(self, role: str, piece: BatchSlice) -> None:
        assert self.outcome.batch_size is not None and self.outcome.seq_len is not None
        self.channels[role].send_batch(piece.index, self.outcome.batch_size, self.outcome.seq_len, piece.chunk)

    def _scorer_row(self, payload: bytes) -> None:
        try:
            ready = self.desk.scorer_row(*parse_row(payload))
        except ProbeError as error:
            raise self._crash("scorer", str(error)) from None
        for probe in ready:  # the snapshot is staged: the prober gets every probed row of this batch
            self.channels["prober"].send_batch(probe.index, probe.row, self.outcome.seq_len, probe.tokens,
                                               probe.boundary)

    def _prober_row(self, payload: bytes) -> None:
        try:
            probe, moved = self.desk.prober_row(*parse_row(payload))
        except ProbeError as error:
            raise self._crash("scorer", str(error)) from None
        self.outcome.probe_rows += 1
        self.outcome.max_probe_drift = max(self.outcome.max_probe_drift, moved)
        if not moved <= self.tolerance:
            self._fail(Reason(rule="run:non_causal", message=f"batch {probe.index}, row {probe.row}: "
                              + non_causal_message(probe.boundary, moved)))
        if self.desk.prober_free:
            self._stage_probe()
            self._advance()

    # --- trainer frames -----------------------------------------------------------------------------------------

    def _trainer_hello(self, payload: bytes) -> None:
        pass

    def _trainer_geometry(self, payload: bytes) -> None:
        if self.geometry is not None:
            raise self._crash("trainer", "geometry sent twice")
        request = parse_json(payload)
        try:
            batch_size, seq_len = check_geometry(request.get("batch_size"), request.get("seq_len"),
                                                 self.spec.max_seq_len, MAX_BATCH_TOKENS)
        except PrismError as error:
            self.channels["trainer"].send_json(Kind.REFUSE, error.reasons[0].model_dump())
            self._fail(*error.reasons)
        self.outcome.batch_size, self.outcome.seq_len = batch_size, seq_len
        self.outcome.with_logits = bool(request.get("with_logits"))
        self.geometry = request
        self._share()

    def _trainer_ready(self, payload: bytes) -> None:
        self._ready("trainer")

    def _trainer_next(self, payload: bytes) -> None:
        if self.trainer_waiting or self.stream_ended:
            raise self._crash("trainer", "next batch requested twice")
        self.trainer_waiting = True
        self._advance()

    def _trainer_done(self, payload: bytes) -> None:
        self.trainer_done = True
        self.selector.unregister(self.channels["trainer"].sock)  # its end of the socket closes as it exits
        if self.stream_started:  # the miner's last optimizer step is part of the run's time
            self.outcome.stream_seconds = time.monotonic() - self.stream_started

    # --- the stream ---------------------------------------------------------------------------------------------

    def _share(self) -> None:
        """Once both the scorer's fresh build and the trainer's model are known: one buffer for the state."""
        if self.layout is None or self.geometry is None or self.plan is not None:
            return
        theirs = self.geometry.get("layout")
        if not isinstance(theirs, list) or [e[:2] for e in theirs] != [e[:2] for e in self.layout]:
            message = ("the model passed to iter_train_batches does not have the parameters and buffers of a fresh "
                       "ctx.build_model() (names and shapes must match; dtypes may differ): the scorer scores the "
                       "architecture's model with the trainer's weights, so train the model build_model returns")
            self.channels["trainer"].send_json(Kind.REFUSE, {"rule": "run:model_mismatch", "message": message})
            self._fail(Reason(rule="run:model_mismatch", message=message))
        try:
            _, nbytes = layout.plan_slots(theirs)
        except (ValueError, TypeError) as error:
            raise self._crash("trainer", f"bad state layout: {error}") from None
        plan = StreamPlan(self.tokens, self.byte_lengths, self.outcome.batch_size, self.outcome.seq_len,
                          self.spec.byte_budget)
        self.plan, self.batches = plan, plan.batches()
        self.outcome.planned_batches = plan.planned_batches()
        self.probes = ProbePlan(plan, self.spec.probe_rows, self.spec.vocab_size)
        on_gpu = str(self.geometry.get("device", "cpu")).startswith("cuda")
        self.overlap = on_gpu
        self.tolerance = causality_tolerance([e[2] for e in theirs], "cuda" if on_gpu else "cpu")
        if on_gpu:  # the scorer allocates on its GPU and hands over the buffer's descriptor (READY)
            self.channels["scorer"].send_json(Kind.SHARE, {"where": "cuda", "layout": theirs})
            return
        fd = layout.new_memfd("prism-state", nbytes)
        try:
            for role in ("scorer", "trainer"):
                self.channels[role].send_json(Kind.SHARE, {"where": "memfd", "layout": theirs}, fds=(fd,))
        finally:
            os.close(fd)

    def _ready(self, role: str) -> None:
        self.ready.add(role)
        if self.ready == {"scorer", "prober", "trainer"}:
            self.stream_started = time.monotonic()
            self.trainer_waiting = True  # iter_train_batches waits for its first batch
            self._advance()

    def _advance(self) -> None:
        """Release the next batch when the trainer waits for one and every earlier probe is staged."""
        if not self.trainer_waiting or self.snapshotting is not None or self.desk.waiting or self.batches is None:
            return
        self.trainer_waiting = False
        piece = next(self.batches, None)
        if piece is None:
            if self.outcome.batches == 0 and not self.unrecorded:
                self._fail(Reason(rule="run:no_batch", message="the train split cannot fill a single batch of "
                                  "this geometry"))
            budget = self.spec.byte_budget
            scored = sum(self.outcome.batch_bytes) + sum(p.target_bytes for p in self.unrecorded.values())
            self.outcome.stopped_reason = "byte_budget" if budget and scored >= budget else "stream_exhausted"
            self.stream_ended = True
            self.channels["trainer"].send_json(Kind.END, {"reason": self.outcome.stopped_reason})
            return
        self.snapshotting = piece
        self.channels["scorer"].send(Kind.SNAPSHOT, str(piece.index).encode())

    def _stage_probe(self) -> None:
        """Ask the scorer to stage the next probed batch's snapshot, once the prober is free."""
        rows = self.desk.next_batch()
        if rows is None:
            return
        self.channels["scorer"].send_json(Kind.PROBE, {"index": rows[0].index, "rows": [r.row for r in rows]})
        self._advance()

    # --- after training -----------------------------------------------------------------------------------------

    def _finish_trainer(self) -> None:
        """The trainer must be gone before the scorer sees held-out data (it could not reach it, but need not)."""
        runner = self.runners["trainer"]
        code = runner.wait(max(0.0, min(10.0, self.deadline - time.monotonic())))
        if code not in (0, None):
            self._fail(runner.end_reason(f"exit code {code}"))

    def _heldout(self) -> None:
        passes = self.heldout_plan(self.outcome) if self.heldout_plan is not None else []
        if not passes:
            return
        started = time.monotonic()
        assert self.outcome.batch_size is not None and self.outcome.seq_len is not None
        try:
            self.outcome.heldout = score_passes(self.channels["scorer"], passes, self.byte_lengths,
                                                self.outcome.batch_size, self.outcome.seq_len, self.spec.vocab_size,
                                                started + self.heldout_time_limit)
        except TimeoutError:
            self.outcome.heldout_reasons.append(Reason(rule="run:timeout", message="the held-out passes passed their "
                                                       f"wall-clock limit of {self.heldout_time_limit:g} s"))
        except HeldoutError as error:
            self.outcome.heldout_reasons.extend(error.reasons)
        except ProtocolError as error:
            self.outcome.heldout_reasons.append(self.runners["scorer"].end_reason(f"held-out: {error}"))
        self.outcome.heldout_seconds = time.monotonic() - started

    # --- endings ------------------------------------------------------------------------------------------------

    def _fail(self, *reasons: Reason, before_data: bool = False) -> None:
        self.outcome.reasons.extend(reasons)
        self.outcome.before_data = self.outcome.before_data or before_data
        raise _Failed

    def _crash(self, runner: str, detail: str) -> _Failed:
        self.outcome.reasons.append(self.runners[runner].end_reason(detail) if runner in self.runners else
                                    Reason(rule="run:crash", message=detail))
        return _Failed()

    def _close(self) -> None:
        for role, channel in self.channels.items():
            if role != "trainer":
                try:
                    channel.send(Kind.END)
                except OSError:
                    pass
        for runner in self.runners.values():
            if runner.role == "scorer":
                runner.wait(max(0.5, min(5.0, self.deadline + self.heldout_time_limit - time.monotonic())))
            runner.close()
        for channel in self.channels.values():
            channel.close()
        self.selector.close()
        tails = [f"--- {role} ---\n{runner.process.log_tail(15)}" for role, runner in self.runners.items()
                 if runner.process.log_tail(1)]
        self.outcome.log_tail = "\n".join(tails)
