"""The trusted parent of one run: it owns the stream, launches the exporter, the scorer and the trainer, and keeps
the books.

Before data: the exporter reports the layout of a fresh build_model(); once the trainer has sent its geometry and
its model's layout (they must agree) the exporter exports the forward at that [B, L] and exits, and only then does
the trusted scorer get the graph. The stream: the parent sends the scorer batches a few ahead, each with its probe
batch if it is probed; per batch k each trainer rank asks the scorer itself (NEXT, on its batch channel) → the
scorer snapshots the shared state → only now does each rank get its rows of batch k → the scorer's record of
Σ −ln p(target) on the snapshot comes here while the ranks train, then a probed batch's drifts, which are judged
here. Targets and bytes are counted here from the stream geometry; the scorer reports only nats, the trainer
nothing that counts. After the trainer has exited, the scorer runs the held-out passes. docs/architecture.md,
"One submission's path".
"""

from __future__ import annotations

import math
import os
import re
import selectors
import socket
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
from prism_ray.harness.protocol import Channel, Kind, ProtocolError, parse_json, parse_records
from prism_ray.harness.ranks import Ranks
from prism_ray.harness.records import Books, HeldoutPlan, Progress, RunSpec, TrainOutcome
from prism_ray.harness.stream import BatchSlice, StreamPlan
from prism_ray.harness.supervise import Runner
from prism_ray.harness.trainer_frames import TrainerFrames


def _count(value: object) -> bool:
    """An integer a sandbox sent that the report and the store can hold (JSON integers have no bound)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


class _Failed(Exception):
    """Ends the run with the reasons already recorded."""


# What a sandbox that runs miner code may name as its failure: its own (run:*, contract:*), never a system failure
# (infra:*, data:*, sandbox:*), which would be retried for free or excuse a seed replica.
_SANDBOX_RULE = re.compile(r"(run|contract):[a-z_]{1,40}")
# The most a sandbox that runs miner code may send in one frame: the parent allocates and parses what it reads (a red
# team's 64 MiB layout cost the parent 1.7 GB). Layouts and the graph may be larger than the rest.
_MINER_FRAME = 1 << 20
_MINER_LIMITS = {Kind.LAYOUT: 4 << 20, Kind.GEOMETRY: 4 << 20, Kind.GRAPH: MAX_JSON_BYTES}
# Frames a miner's runner sends once (per rank): a second is a broken protocol, not a flood to keep reading. A second
# ERROR is ignored instead: the first one's reason stands.
_ONCE = {Kind.HELLO, Kind.LAYOUT, Kind.GRAPH, Kind.GEOMETRY, Kind.READY, Kind.DONE}
_HALF_SENT = 0.05  # seconds a quiet channel is given, once one has closed, to start a frame it is about to send


def run_session(spec: RunSpec, tokens: np.ndarray, byte_lengths: np.ndarray, run_dir: Path, time_limit: float,
                progress: Callable[[Progress], None] | None = None, policy: SandboxPolicy | None = None,
                heldout: HeldoutPlan | None = None, heldout_time_limit: float = 300.0,
                hold: Callable[[], list[Reason] | None] | None = None) -> TrainOutcome:
    """Train and score one bundle; `heldout` (called once training completed) names the held-out passes. `hold`
    is called once the runners are up and before any of them runs miner code: it returns when whatever must not
    overlap this run's miner code has ended (the contract check), with the reasons that end the run, if any."""
    return _Session(spec, tokens, byte_lengths, run_dir, time_limit, progress, policy or SandboxPolicy(),
                    heldout, heldout_time_limit, hold).run()


class _Session(TrainerFrames):
    def __init__(self, spec: RunSpec, tokens: np.ndarray, byte_lengths: np.ndarray, run_dir: Path, time_limit: float,
                 progress: Callable[[Progress], None] | None, policy: SandboxPolicy, heldout: HeldoutPlan | None,
                 heldout_time_limit: float, hold: Callable[[], list[Reason] | None] | None):
        self.spec, self.tokens, self.byte_lengths, self.run_dir = spec, tokens, byte_lengths, run_dir
        self.time_limit, self.progress, self.policy, self.hold = time_limit, progress, policy, hold
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
        self.ranks = Ranks(spec.world_size, spec.rank_timeout)
        self.outcome.world_size = spec.world_size
        self.state_fds: list[int] = []  # each rank's shared-state memfd (CPU), kept for the scorer
        self.batch_links: list[tuple[socket.socket, socket.socket]] = []  # (scorer's end, rank's end) per rank
        self.released = 0  # batches handed to the scorer so far
        self.ready: set[str] = set()
        self.received: set[tuple[str, Kind]] = set()  # (channel, kind) of the miner runners' frames so far
        self.export_asked = False
        self.plan: StreamPlan | None = None
        self.batches: Iterator[BatchSlice] | None = None
        self.probes: ProbePlan | None = None
        self.probing: set[int] = set()  # probed batches whose drifts have not arrived
        # whether the scorer sends a batch to the ranks as soon as its snapshot is taken, or after its record
        self.overlap = False
        self.scorer_threads = spec.threads
        self.on_gpu = False
        self.handoff: layout.HandoffSpec | None = None  # the GPU hand-off, when the run has one (trainer_frames.py)
        self.unrecorded: dict[int, BatchSlice] = {}  # sent to the scorer, not yet recorded
        self.scorer_gone = False  # a send to the scorer failed: it has exited
        self.stream_ended = False
        self.finalizing = False  # FINAL sent: the scorer takes the trained state before the ranks hear END
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
        except ProtocolError as error:  # a send outside the frame loop (the launch) found its runner gone
            self._crash(error.peer.partition(":")[0] or "scorer", str(error), error.closed)
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
                                         spec.artifacts_dir, world_size=spec.world_size)
        self.outcome.sandboxed = self.runners["trainer"].process.sandboxed
        self._accept("scorer", "scorer").send_json(Kind.CONFIG, spec.runner_spec("scorer"))  # runs no miner code
        exporter = self._accept("exporter", "exporter")
        self._hold()  # the trainer's ranks go on starting meanwhile, and wait in the listener's queue
        exporter.send_json(Kind.CONFIG, spec.runner_spec("exporter"))
        # every rank connects before any learns its rank: none runs miner code while another may still connect
        for index in range(spec.world_size):
            self.ranks.add(self._accept("trainer", Ranks.key(index)))
        for member in self.ranks.members:
            member.channel.send_json(Kind.CONFIG, {**spec.runner_spec("trainer"), "rank": member.index})

    def _hold(self) -> None:
        """Up to here the runners ran only our code (their imports); the wait is not the run's time."""
        if self.hold is None:
            return
        started = time.monotonic()
        reasons = self.hold()
        self.deadline += time.monotonic() - started
        if reasons:
            self._fail(*reasons)

    def _accept(self, role: str, key: str) -> Channel:
        try:
            channel = self.runners[role].accept(self.deadline)
        except ProtocolError as error:
            raise self._crash(role, str(error), error.closed) from None
        # descriptors: the scorer's GPU buffers, the exporter's graph memfd; the trainer's are closed at once
        channel.accept_fds = role in ("scorer", "exporter")
        channel.max_fds = 1 if role == "exporter" else 2 * self.spec.world_size  # its graph; each rank's buffers
        channel.peer = key
        if role != "scorer":
            channel.max_frame, channel.limits = _MINER_FRAME, _MINER_LIMITS
        self.channels[key] = channel
        self.selector.register(channel.sock, selectors.EVENT_READ, key)
        return channel

    def _train(self) -> None:
        while not (self.trainer_done and self.stream_ended and self._settled()):
            self._dispatch(self.deadline)

    def _settled(self) -> bool:
        return not (self.unrecorded or self.probing or self.finalizing)

    def _dispatch(self, deadline: float) -> None:
        """Handle the next frame from whichever runner sent one (or end a run whose ranks stopped following)."""
        wake = min(deadline, self.ranks.overdue_at() or deadline)
        events = self.selector.select(timeout=max(0.0, wake - time.monotonic()))
        if time.monotonic() >= deadline:  # whatever is still readable: a runner's frames cannot hold the clock
            raise TimeoutError
        hung = self.ranks.overdue(time.monotonic())
        if hung is not None:
            self._fail(hung)
        for channel in self.channels.values():  # sends honour the deadline too: a runner that stops reading stalls
            channel.sock.settimeout(max(0.001, deadline - time.monotonic()))
        for event, _ in events:
            key = event.data
            if key not in self.channels:  # dropped while an earlier event of this select was handled
                continue
            try:
                kind, payload = self.channels[key].recv(timeout=max(0.001, deadline - time.monotonic()))
                self._handle(key, kind, payload)
            except ProtocolError as error:  # a runner went away or sent a malformed frame (or one sent to it failed)
                gone = error.peer or key
                self._pending_errors(gone, error.closed)
                role, _, rank = gone.partition(":")
                detail = f"{self.ranks.label(int(rank)) if rank else role}: {error}"
                raise self._crash(role, detail, error.closed) from None

    def _pending_errors(self, gone: str, closed: bool) -> None:
        """A runner's socket closed or broke: if a runner already said why (another one, or this one before it
        closed: a send to it can fail with its ERROR still unread), that reason wins over a bare crash. "Already": a
        runner's send has landed in our buffer before its close (or the close it caused) can be seen, so what is read
        is what is buffered (a frame half in is read to its end), plus a moment for one about to start; a runner
        still on its way to an ERROR would only replace the crash that caused it (a rank's "peer closed" for the rank
        that died) and is not waited for. A runner that broke the protocol and is still there is not read again:
        whatever it sends next could only keep the others' reasons unread."""
        waited = time.monotonic() + 1.0  # a runner that keeps its socket readable cannot hold the parent longer
        channels = sorted(self.channels.items(), key=lambda item: item[0] != gone)  # its own reason first
        if not closed:  # it broke the protocol and is still there
            channels = [item for item in channels if item[0] != gone]
        for role, channel in channels:
            while time.monotonic() < waited:
                with selectors.DefaultSelector() as one:
                    one.register(channel.sock, selectors.EVENT_READ)
                    if not one.select(timeout=min(_HALF_SENT, max(0.0, waited - time.monotonic()))):
                        break
                try:
                    kind, payload = channel.recv(timeout=max(0.001, waited - time.monotonic()))
                except (ProtocolError, TimeoutError):
                    break
                if kind != Kind.ERROR:
                    continue
                try:  # the run's own deadline, passed while the reason is handled, stays run:timeout
                    self._handle(role, kind, payload)
                except ProtocolError:
                    break

    def _handle(self, key: str, kind: Kind, payload: bytes) -> None:
        role, _, rank = key.partition(":")
        if role != "scorer":
            if (key, kind) in self.received and kind == Kind.ERROR:
                return  # the first one's reason stands
            if (key, kind) in self.received and kind in _ONCE:
                raise self._crash(role, f"{self.ranks.label(int(rank)) if rank else role}: sent {kind.name} twice")
            self.received.add((key, kind))
        if kind == Kind.ERROR:
            error = parse_json(payload)
            message = str(error.get("message", ""))[:4000]
            if rank and self.ranks.world_size > 1:
                message = f"rank {rank}: {message}"
            rule, file, line = str(error.get("rule", "run:exception")), error.get("file"), error.get("line")
            if role != "scorer" and not _SANDBOX_RULE.fullmatch(rule):
                rule = "run:exception"
            reason = Reason(rule=rule, message=message, file=file[:500] if isinstance(file, str) else None,
                            line=line if _count(line) else None)
            if role == "trainer" and self.layout is None:
                # The trainer builds the same architecture: if the exporter's build fails too, the bundle is rejected
                # for that (before any data); only a sound architecture leaves the failure to training.
                self.trainer_error = self.trainer_error or reason
                self.selector.unregister(self.channels[key].sock)
                return
            if role == "trainer" and self.batch_links:
                # A rank's failure can be the scorer's doing (it closes the batch channels once it has said why,
                # e.g. run:ranks_diverged, or run:non_causal in its checks of the graph before READY): what the
                # scorer already sent comes first.
                self._pending_scorer_frames()
            self._fail(reason, before_data=role != "trainer" and not self.ready >= {"scorer"})
        handler = getattr(self, f"_{role}_{kind.name.lower()}", None)
        if handler is None:
            raise self._crash(role, f"unexpected frame {kind.name} from the {role}")
        if rank:
            handler(int(rank), payload)
        else:
            handler(payload)

    # --- exporter frames ----------------------------------------------------------------------------------------

    def _exporter_hello(self, payload: bytes) -> None:
        pass

    def _exporter_layout(self, payload: bytes) -> None:
        built = parse_json(payload)
        self.layout = built.get("layout")
        if _count(built.get("model_params")):  # shown until the scorer has counted what the forward reads
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
        if not self.export_asked:
            raise self._crash("exporter", "the exporter sent a graph before it was asked for one")
        exporter = self.channels.pop("exporter")
        self.selector.unregister(exporter.sock)
        try:
            blob = exporter.take_fd()
        except ProtocolError:
            exporter.close()  # the end of its part either way
            raise
        try:
            runner = self.runners["exporter"]
            code = runner.wait(max(0.0, min(10.0, self.deadline - time.monotonic())))
            if code != 0:
                raise self._crash("exporter", f"the exporter did not exit after sending its graph (exit code {code})")
            if len(payload) > MAX_JSON_BYTES:
                self._fail(Reason(rule="contract:graph_format", message="the exported graph is too large"),
                           before_data=True)
            self._share_with_scorer()
            self.channels["scorer"].send(Kind.LOAD, payload, fds=(blob,))
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
        """The scorer loaded and checked the forward; on a GPU it passes on the descriptor of each rank's state
        buffer, then of each rank's hand-off buffer if the run has the GPU hand-off."""
        if parse_json(payload).get("shares_state"):
            ranks = self.ranks.world_size
            fds = [self.channels["scorer"].take_fd() for _ in range(ranks if self.handoff is None else 2 * ranks)]
            try:
                self._share_with_ranks("cuda", fds[:ranks], None if self.handoff is None else fds[ranks:])
            finally:
                for fd in fds:
                    os.close(fd)
        self._ready("scorer")

    def _scorer_snapped(self, payload: bytes) -> None:
        if payload != b"final" or not self.finalizing:
            raise self._crash("scorer", "a snapshot that was not asked for")
        self.finalizing = False
        self.stream_ended = True

    def _scorer_record(self, payload: bytes) -> None:
        try:
            records = parse_records(payload)
        except ProtocolError as error:
            raise self._crash("scorer", str(error)) from None
        for index, nats, finite in records:
            piece = self.unrecorded.pop(index, None)
            if piece is None:
                raise self._crash("scorer", f"loss record for batch {index} was not expected")
            self.books.record(piece, nats, finite)
        self._feed()
        self.outcome.stream_seconds = time.monotonic() - self.stream_started
        if self.progress is not None:
            self.progress(Progress(self.outcome.batches, self.books.bytes, self.spec.byte_budget,
                                   self.books.running_bpb, self.books.targets / max(self.outcome.stream_seconds, 1e-9)))

    def _pending_scorer_frames(self) -> None:
        """Handle what the scorer has already sent (a rank's DONE can be read before the scorer's word that came
        first)."""
        channel = self.channels["scorer"]
        while True:
            with selectors.DefaultSelector() as one:
                one.register(channel.sock, selectors.EVENT_READ)
                if not one.select(timeout=0):
                    return
            try:
                kind, payload = channel.recv(timeout=max(0.001, self.deadline - time.monotonic()))
            except ProtocolError as error:
                raise self._crash("scorer", str(error), error.closed) from None
            self._handle("scorer", kind, payload)

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
            self.outcome.heldout_reasons.append(self.runners["scorer"].end_reason(f"held-out: {error}", error.closed))
        self.outcome.heldout_seconds = time.monotonic() - started

    # --- endings ------------------------------------------------------------------------------------------------

    def _fail(self, *reasons: Reason, before_data: bool = False) -> None:
        self.outcome.reasons.extend(reasons)
        self.outcome.before_data = self.outcome.before_data or before_data
        raise _Failed

    def _crash(self, runner: str, detail: str, closed: bool = False) -> _Failed:
        """`closed`: the runner went away; otherwise it broke the protocol while still there."""
        self.outcome.reasons.append(self.runners[runner].end_reason(detail, closed) if runner in self.runners else
                                    Reason(rule="run:crash", message=detail))
        return _Failed()

    def _close(self) -> None:
        for fd in self.state_fds:
            os.close(fd)
        for link in self.batch_links:
            for end in link:
                end.close()
        for key, channel in self.channels.items():
            if not key.startswith("trainer"):
                try:
                    channel.send(Kind.END)
                except (ProtocolError, OSError):  # gone already, or not reading (a timeout): it is stopped below
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
