"""The trusted parent of one run: it owns the stream, launches the exporter, the scorer and the trainer, and keeps
the books.

Before data: the exporter reports the layout of a fresh build_model(); once the trainer has sent its geometry and
its model's layout (they must agree) the exporter exports the forward at that [B, L] and exits, and only then does
the trusted scorer get the graph. Per batch k: the trainer asks for it (NEXT) → the scorer snapshots the shared
state (SNAPSHOT/SNAPPED) → batch k goes to the scorer and, only now, to the trainer → the scorer's record of
Σ −ln p(target) on the snapshot arrives while the trainer trains → for a probed batch the probe batch goes to the
scorer, whose drifts are judged here. Targets and bytes are counted here from the stream geometry; the scorer
reports only nats, the trainer nothing that counts. After the trainer has exited, the scorer runs the held-out
passes. docs/architecture.md, "One submission's path".
"""

from __future__ import annotations

import math
import os
import selectors
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from prism_ray.errors import PrismError, Reason
from prism_ray.graph.format import MAX_JSON_BYTES
from prism_ray.harness import layout
from prism_ray.harness.heldout import HeldoutError, score_passes
from prism_ray.harness.isolation import SandboxPolicy
from prism_ray.harness.probes import ProbePlan, causality_tolerance, non_causal_message
from prism_ray.harness.protocol import Channel, Kind, ProtocolError, parse_json, parse_record
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
        self.layout: list | None = None  # the exporter's fresh build
        self.geometry: dict | None = None  # the trainer's request, with its model's layout
        self.state_fd: int | None = None  # the shared state's memfd (CPU), kept for the scorer
        self.ready: set[str] = set()
        self.plan: StreamPlan | None = None
        self.batches: Iterator[BatchSlice] | None = None
        self.probes: ProbePlan | None = None
        self.probing: set[int] = set()  # probed batches whose drifts have not arrived
        # On a GPU the trainer gets a batch as soon as its snapshot is taken, so the scorer's forward overlaps the
        # trainer's step (the GPU interleaves them). On CPU both would fight for the same cores: the trainer waits
        # for the record instead, as a bare loop with one extra forward would.
        self.overlap = False
        self.on_gpu = False
        self.trainer_waiting = False  # the trainer asked for a batch and has none
        self.snapshotting: BatchSlice | None = None
        self.unrecorded: dict[int, BatchSlice] = {}
        self.stream_ended = False
        self.finalizing = False  # the scorer is taking the trained state; the trainer hears END after that
        self.trainer_done = False
        self.trainer_error: Reason | None = None  # the trainer's failure, held until the exporter's build is in
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
        # the scorer's sandbox holds no bundle file: it runs prism-ray and torch only
        self.runners["scorer"] = Runner("scorer", self.run_dir, spec.threads, self.policy, (), None,
                                        module="prism_ray.harness.scorer")
        self.runners["exporter"] = Runner("exporter", self.run_dir, spec.threads, self.policy,
                                          (spec.exporter_bundle_dir,), None)
        self.runners["trainer"] = Runner("trainer", self.run_dir, spec.threads, self.policy, (spec.bundle_dir,),
                                         spec.artifacts_dir)
        self.outcome.sandboxed = self.runners["trainer"].process.sandboxed
        for role in ("scorer", "exporter", "trainer"):
            channel = self._accept(role)
            channel.send_json(Kind.CONFIG, spec.runner_spec(role))

    def _accept(self, role: str) -> Channel:
        try:
            channel = self.runners[role].accept(self.deadline)
        except ProtocolError as error:
            raise self._crash(role, str(error)) from None
        # descriptors: the scorer's GPU buffer, the exporter's graph memfd; the trainer's are closed at once
        channel.accept_fds = role in ("scorer", "exporter")
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
        return not (self.unrecorded or self.snapshotting or self.probing or self.finalizing)

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
                raise self._crash(role, f"{role}: {error}") from None
            self._handle(role, kind, payload)

    def _pending_errors(self, closed: str) -> None:
        """A runner's socket closed: if another runner already said why, that reason wins over a bare crash."""
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
                # The trainer builds the same architecture: if the exporter's build fails too, the bundle is rejected
                # for that (before any data); only a sound architecture leaves the failure to training.
                self.trainer_error = reason
                self.selector.unregister(self.channels["trainer"].sock)
                return
            self._fail(reason, before_data=role != "trainer" and not self.ready >= {"scorer"})
        handler = getattr(self, f"_{role}_{kind.name.lower()}", None)
        if handler is None:
            raise self._crash(role, f"unexpected frame {kind.name} from the {role}")
        handler(payload)

    # --- exporter frames ----------------------------------------------------------------------------------------

    def _exporter_hello(self, payload: bytes) -> None:
        pass

    def _exporter_layout(self, payload: bytes) -> None:
        built = parse_json(payload)
        self.layout = built.get("layout")
        if isinstance(built.get("model_params"), int):  # shown until the scorer has counted what the forward reads
            self.outcome.model_params = built["model_params"]
        try:
            slots, _ = layout.plan_slots(self.layout if isinstance(self.layout, list) else None)
        except (ValueError, TypeError):
            raise self._crash("exporter", "bad state layout") from None
        state = sum(math.prod(slot.shape) for slot in slots)
        if state > self.spec.max_params:  # early: the scorer checks what the exported forward reads again
            self._fail(Reason(rule="contract:param_cap", message=f"the model holds {state:,} numbers in parameters "
                              f"and buffers, over the cap of {self.spec.max_params:,}"), before_data=True)
        if self.trainer_error is not None:
            self._fail(self.trainer_error)
        self._share()

    def _exporter_graph(self, payload: bytes) -> None:
        """The exported forward. The exporter must be gone before the scorer reads its memfd: nothing may write it
        any more."""
        exporter = self.channels.pop("exporter")
        self.selector.unregister(exporter.sock)
        blob = exporter.take_fd()
        try:
            runner = self.runners["exporter"]
            code = runner.wait(max(0.0, min(10.0, self.deadline - time.monotonic())))
            if code != 0:
                raise self._crash("exporter", f"the exporter did not exit after sending its graph (exit code {code})")
            if len(payload) > MAX_JSON_BYTES:
                self._fail(Reason(rule="contract:graph_format", message="the exported graph is too large"),
                           before_data=True)
            assert self.geometry is not None
            where = "cuda" if self.on_gpu else "memfd"
            scorer = self.channels["scorer"]
            scorer.send_json(Kind.SHARE, {"where": where, "layout": self.geometry["layout"]},
                             fds=(self.state_fd,) if self.state_fd is not None else ())
            scorer.send(Kind.LOAD, payload, fds=(blob,))
        finally:
            os.close(blob)
            exporter.close()

    # --- scorer frames ------------------------------------------------------------------------------------------

    def _scorer_hello(self, payload: bytes) -> None:
        self.outcome.device = parse_json(payload).get("device")

    def _scorer_info(self, payload: bytes) -> None:
        info = parse_json(payload)
        self.outcome.model_params = info.get("model_params")
        self.outcome.probe_tolerance = causality_tolerance(str(info.get("logits_dtype")),
                                                           "cuda" if self.on_gpu else "cpu")

    def _scorer_ready(self, payload: bytes) -> None:
        """The scorer loaded and checked the forward; on a GPU it passes on the descriptor of the state buffer."""
        if parse_json(payload).get("shares_state"):
            fd = self.channels["scorer"].take_fd()
            try:
                assert self.geometry is not None
                self.channels["trainer"].send_json(Kind.SHARE, {"where": "cuda", "layout": self.geometry["layout"]},
                                                   fds=(fd,))
            finally:
                os.close(fd)
        self._ready("scorer")

    def _scorer_snapped(self, payload: bytes) -> None:
        if payload == b"final" and self.finalizing:
            self.finalizing = False
            self.channels["trainer"].send_json(Kind.END, {"reason": self.outcome.stopped_reason})
            return
        piece = self.snapshotting
        if piece is None or int(payload or b"-1") != piece.index:
            raise self._crash("scorer", "snapshot of a batch that was not asked for")
        self.snapshotting = None
        self._send_batch("scorer", piece)
        if self.overlap:  # the trainer sees batch k only now, after the snapshot it is scored on
            self._send_batch("trainer", piece)
        self.unrecorded[piece.index] = piece
        assert self.probes is not None
        probe = self.probes.for_batch(piece)
        if probe is not None:  # the scorer runs it on the same snapshot, before it takes the next one
            self.probing.add(piece.index)
            self.channels["scorer"].send_probe(piece.index, probe.rows, probe.tokens)

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

    def _scorer_probed(self, payload: bytes) -> None:
        answer = parse_json(payload)
        index = answer.get("index")
        if index not in self.probing:
            raise self._crash("scorer", f"probe drifts for batch {index} were not expected")
        self.probing.discard(index)
        tolerance = self.outcome.probe_tolerance or 0.0
        for row, boundary, moved in answer.get("rows", []):
            moved = float(moved)
            self.outcome.probe_rows += 1
            self.outcome.max_probe_drift = max(self.outcome.max_probe_drift, moved)
            if not moved <= tolerance:
                self._fail(Reason(rule="run:non_causal", message=f"batch {index}, row {row}: "
                                  + non_causal_message(boundary, moved)))

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
        """Once both the exporter's fresh build and the trainer's model are known: the export at the trainer's
        geometry and dtypes, and one buffer for the state."""
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
        self.probes = ProbePlan(plan, self.spec.probe_every, self.spec.vocab_size)
        self.on_gpu = str(self.geometry.get("device", "cpu")).startswith("cuda")
        self.overlap = self.on_gpu
        self.channels["exporter"].send_json(Kind.EXPORT, {"batch_size": self.outcome.batch_size,
                                                          "seq_len": self.outcome.seq_len, "layout": theirs})
        if self.on_gpu:  # the scorer allocates on its GPU and hands over the buffer's descriptor (READY)
            return
        self.state_fd = layout.new_memfd("prism-state", nbytes)
        self.channels["trainer"].send_json(Kind.SHARE, {"where": "memfd", "layout": theirs}, fds=(self.state_fd,))

    def _ready(self, role: str) -> None:
        self.ready.add(role)
        if self.ready == {"scorer", "trainer"}:
            self.stream_started = time.monotonic()
            self.trainer_waiting = True  # iter_train_batches waits for its first batch
            self._advance()

    def _advance(self) -> None:
        """Release the next batch when the trainer waits for one."""
        if not self.trainer_waiting or self.snapshotting is not None or self.batches is None \
                or self.ready != {"scorer", "trainer"}:
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
            # The trained state is what the trainer holds now, when it asks past the last batch: the scorer takes it
            # before the trainer hears END, so nothing it does afterwards reaches the held-out passes.
            self.finalizing = True
            self.channels["scorer"].send(Kind.FINAL)
            return
        self.snapshotting = piece
        self.channels["scorer"].send(Kind.SNAPSHOT, str(piece.index).encode())

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
        if self.state_fd is not None:
            os.close(self.state_fd)
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
