"""The trusted parent of one training run: it owns the stream, launches the runner and keeps the books.

Batch k+1 is sent only after the loss record of batch k has arrived and the miner asked for more, so
no future data is ever inside the miner's process. Targets and bytes are counted here from the stream
geometry; the runner only reports nats.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from prism_ray.errors import PrismError, Reason
from prism_ray.harness.isolation import Sandboxed, SandboxPolicy, launch
from prism_ray.harness.protocol import Channel, Kind, ProtocolError, parse_json, parse_record
from prism_ray.harness.stream import BatchSlice, StreamPlan, check_geometry

MAX_BATCH_TOKENS = 1 << 22


@dataclass
class Progress:
    batches: int
    bytes_scored: int
    byte_budget: int
    running_bpb: float
    tokens_per_second: float


@dataclass
class RunSpec:
    """Everything the runner needs; sent over the socket, so the runner reads no files of ours."""

    bundle_dir: Path
    architecture: tuple[str, str]
    training: tuple[str, str]
    tokenizer: str
    vocab_size: int
    max_seq_len: int
    max_params: int
    seed: int
    device: str
    byte_budget: int
    artifacts_dir: Path
    data_dir: str
    threads: int
    causality_probes: int = 2
    mode: str = "train"  # train | probe (instantiate, size, causality; no data) | heldout (score parent batches)
    state_path: str = ""  # heldout: the parent-written trained weights

    def to_json(self) -> dict:
        return {**self.__dict__, "bundle_dir": str(self.bundle_dir), "artifacts_dir": str(self.artifacts_dir)}


@dataclass
class TrainOutcome:
    status: str = "failed"  # completed | failed
    reasons: list[Reason] = field(default_factory=list)
    batch_size: int | None = None
    seq_len: int | None = None
    with_logits: bool | None = None
    batch_nats: list[float] = field(default_factory=list)
    batch_targets: list[int] = field(default_factory=list)
    batch_bytes: list[int] = field(default_factory=list)
    non_finite_batches: int = 0
    stopped_reason: str | None = None
    model_params: int | None = None
    wall_seconds: float = 0.0
    stream_seconds: float = 0.0
    device: str | None = None
    sandboxed: bool = False
    state_path: str | None = None
    log_tail: str = ""

    @property
    def batches(self) -> int:
        return len(self.batch_nats)


class _Books:
    """Per-batch accounting of the parent; charges non-finite batches 2·ln(V) per target (DESIGN §4.8)."""

    def __init__(self, outcome: TrainOutcome, vocab_size: int, byte_budget: int):
        self.outcome = outcome
        self.penalty_per_target = 2.0 * math.log(vocab_size)
        self.byte_budget = byte_budget
        self.nats = 0.0
        self.bytes = 0

    def record(self, piece: BatchSlice, nats: float, finite: bool) -> None:
        if not finite or not math.isfinite(nats) or nats < 0:
            nats = self.penalty_per_target * piece.targets
            self.outcome.non_finite_batches += 1
        self.outcome.batch_nats.append(nats)
        self.outcome.batch_targets.append(piece.targets)
        self.outcome.batch_bytes.append(piece.target_bytes)
        self.nats += nats
        self.bytes += piece.target_bytes

    @property
    def running_bpb(self) -> float:
        return self.nats / math.log(2) / self.bytes if self.bytes else float("nan")


def runner_command(socket_path: Path, torchrun: bool = True) -> list[str]:
    runner = ["-m", "prism_ray.harness.runner", str(socket_path)]
    if not torchrun:
        return [sys.executable, *runner]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=1",
            "--local-addr=127.0.0.1", *runner]


def runner_env(threads: int) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "PYTHONPATH",
            "VIRTUAL_ENV", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0",
                "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONSAFEPATH": "1", "TORCHELASTIC_ERROR_FILE": "/dev/null", "TORCHINDUCTOR_DETERMINISTIC": "1"})
    return env


def run_training(spec: RunSpec, tokens: np.ndarray, byte_lengths: np.ndarray, run_dir: Path, time_limit: float,
                 progress: Callable[[Progress], None] | None = None,
                 policy: SandboxPolicy | None = None) -> TrainOutcome:
    books = _Books(TrainOutcome(), spec.vocab_size, spec.byte_budget)

    def serve(channel: Channel, outcome: TrainOutcome, deadline: float) -> None:
        _serve(channel, spec, tokens, byte_lengths, books, outcome, deadline, progress)

    return _supervise(spec, run_dir, time_limit, policy, books.outcome, serve)


def _supervise(spec: RunSpec, run_dir: Path, time_limit: float, policy: SandboxPolicy | None,
               outcome: TrainOutcome, serve: Callable[[Channel, TrainOutcome, float], None]) -> TrainOutcome:
    """Launch the runner in the sandbox, let `serve` talk to it, and turn whatever happens into typed reasons."""
    started = time.monotonic()
    deadline = started + time_limit
    # AF_UNIX paths are limited to ~108 bytes, so the socket lives in a short private dir, not in the run dir.
    ipc_dir = Path(tempfile.mkdtemp(prefix="prism-ipc-", dir="/tmp" if os.path.isdir("/tmp") else None))
    os.chmod(ipc_dir, 0o711)  # the unprivileged sandbox uid may pass through, not list
    spec.artifacts_dir.mkdir(parents=True, exist_ok=True)
    socket_path = ipc_dir / "stream.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(1)
    os.chmod(socket_path, 0o777)  # the sandbox runs as an unprivileged uid; the dir around it stays private
    policy = policy or SandboxPolicy()
    policy = replace(policy, readable=(*policy.readable, spec.bundle_dir, ipc_dir), artifacts_dir=spec.artifacts_dir)
    try:
        process = launch(runner_command(socket_path, torchrun=spec.mode == "train"), runner_env(spec.threads),
                         run_dir / "runner.log", cwd=run_dir, policy=policy)
    except PrismError as error:
        listener.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)
        outcome.reasons = error.reasons
        return outcome
    outcome.sandboxed = process.sandboxed
    try:
        channel = _accept(listener, process, deadline)
        serve(channel, outcome, deadline)
    except TimeoutError:
        outcome.reasons.append(Reason(rule="run:timeout", message=f"the {spec.mode} run passed its wall-clock "
                                      f"limit of {time_limit:g} s; it is not scored"))
        outcome.stopped_reason = "wall_clock_exceeded"
    except ProtocolError as error:
        if process.wait(5.0) is None or not outcome.reasons:
            outcome.reasons.append(_crash_reason(process, str(error)))
    finally:
        listener.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)
        exit_code = process.wait(max(0.0, min(10.0, deadline - time.monotonic())))
        if exit_code is None:
            process.kill()
        outcome.wall_seconds = time.monotonic() - started
        outcome.log_tail = process.log_tail()
    if not outcome.reasons and exit_code not in (0, None):
        outcome.reasons.append(_crash_reason(process, f"runner exited with code {exit_code}"))
    if not outcome.reasons and outcome.stopped_reason is None and spec.mode == "train":
        outcome.reasons.append(Reason(rule="run:stopped_early", message="train(ctx) returned before the scored "
                                      "stream ended; every run must consume its whole byte budget"))
    outcome.status = "failed" if outcome.reasons else "completed"
    return outcome


def _crash_reason(process: Sandboxed, detail: str) -> Reason:
    tail = process.log_tail(12)
    return Reason(rule="run:crash", message=f"the runner died ({detail}). Last output:\n{tail}")


def _accept(listener: socket.socket, process: Sandboxed, deadline: float) -> Channel:
    listener.settimeout(0.2)
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError
        try:
            connection, _ = listener.accept()
            return Channel(connection)
        except TimeoutError:
            if process.poll() is not None:
                raise ProtocolError("the runner exited before connecting") from None


def _serve(channel: Channel, spec: RunSpec, tokens: np.ndarray, byte_lengths: np.ndarray, books: _Books,
           outcome: TrainOutcome, deadline: float, progress: Callable[[Progress], None] | None) -> None:
    channel.send_json(Kind.CONFIG, spec.to_json())
    plan: StreamPlan | None = None
    batches = None
    pending: BatchSlice | None = None  # handed over, loss record not yet received
    last: BatchSlice | None = None  # recorded, miner is training on it
    stream_started = 0.0
    while True:
        kind, payload = channel.recv(timeout=max(0.001, deadline - time.monotonic()))
        if kind == Kind.HELLO:
            outcome.device = parse_json(payload).get("device")
        elif kind == Kind.GEOMETRY:
            if plan is not None:
                raise ProtocolError("geometry sent twice")
            request = parse_json(payload)
            try:
                batch_size, seq_len = check_geometry(request.get("batch_size"), request.get("seq_len"),
                                                     spec.max_seq_len, MAX_BATCH_TOKENS)
            except PrismError as error:
                outcome.reasons.extend(error.reasons)
                channel.send_json(Kind.REFUSE, error.reasons[0].model_dump())
                continue
            outcome.batch_size, outcome.seq_len = batch_size, seq_len
            outcome.with_logits = bool(request.get("with_logits"))
            plan = StreamPlan(tokens, byte_lengths, batch_size, seq_len, spec.byte_budget)
            batches = plan.batches()
            probes = _ProbeSchedule(plan, spec.causality_probes)
            stream_started = time.monotonic()
            pending = _send_next(channel, batches, outcome, books, probes)
        elif kind == Kind.RECORD:
            index, nats, finite = parse_record(payload)
            if pending is None or index != pending.index:
                raise ProtocolError(f"loss record for batch {index} was not expected")
            books.record(pending, nats, finite)
            last, pending = pending, None
            outcome.stream_seconds = time.monotonic() - stream_started
            if progress is not None:
                tokens_scored = sum(outcome.batch_targets)
                progress(Progress(outcome.batches, books.bytes, spec.byte_budget, books.running_bpb,
                                  tokens_scored / max(outcome.stream_seconds, 1e-9)))
        elif kind == Kind.NEXT:
            if last is None or pending is not None or batches is None:
                raise ProtocolError("next batch requested before the loss of the current one was recorded")
            last = None
            pending = _send_next(channel, batches, outcome, books, probes)
        elif kind == Kind.INFO:
            outcome.model_params = parse_json(payload).get("model_params")
        elif kind == Kind.ERROR:
            reason = parse_json(payload)
            outcome.reasons.append(Reason(rule=str(reason.get("rule", "run:exception")),
                                          message=str(reason.get("message", ""))[:4000],
                                          file=reason.get("file"), line=reason.get("line")))
        elif kind == Kind.STATE:
            if outcome.stopped_reason is None or outcome.state_path is not None:
                raise ProtocolError("model state sent before the stream ended")
            state_path = Path(spec.artifacts_dir).parent / "state" / "trained.pt"
            state_path.parent.mkdir(parents=True, exist_ok=True)
            state_path.write_bytes(payload)
            outcome.state_path = str(state_path)
        elif kind == Kind.DONE:
            if stream_started:  # the miner's last optimizer step is part of the run's time
                outcome.stream_seconds = time.monotonic() - stream_started
            return
        else:
            raise ProtocolError(f"unexpected frame {kind.name} from the runner")


class _ProbeSchedule:
    """Which batches get a causality probe: the first, then about `count` more drawn from a secret RNG
    the runner cannot see, so a leak that only opens up during training is caught too."""

    def __init__(self, plan: StreamPlan, count: int):
        self.random = secrets.SystemRandom()
        self.plan = plan
        self.count = count
        self.rate = 0.0

    def position(self, piece: BatchSlice) -> int:
        if piece.index == 0:
            expected = self.plan.available_batches
            if self.plan.byte_budget and piece.target_bytes:
                expected = min(expected, math.ceil(self.plan.byte_budget / piece.target_bytes))
            self.rate = min(1.0, self.count / max(expected - 1, 1))
        elif self.random.random() >= self.rate:
            return -1
        return self.random.randint(1, self.plan.span)


def _send_next(channel: Channel, batches, outcome: TrainOutcome, books: _Books,
               probes: _ProbeSchedule) -> BatchSlice | None:
    piece = next(batches, None)
    if piece is None:
        if outcome.batches == 0:
            outcome.reasons.append(Reason(rule="run:no_batch", message="the train split cannot fill a single batch "
                                          "of this geometry"))
        budget_met = books.byte_budget and books.bytes >= books.byte_budget
        outcome.stopped_reason = "byte_budget" if budget_met else "stream_exhausted"
        channel.send_json(Kind.END, {"reason": outcome.stopped_reason})
        return None
    channel.send_batch(piece.index, outcome.batch_size, outcome.seq_len, piece.chunk, probes.position(piece))
    return piece


@dataclass
class EvalPass:
    """One held-out pass: score `tokens` (same stream rules) with the trained model or its step-0 twin."""

    name: str
    tokens: np.ndarray
    byte_budget: int
    trained: bool
    max_batches: int | None = None


@dataclass
class PassResult:
    nats: float = 0.0
    targets: int = 0
    bytes: int = 0
    batches: int = 0
    non_finite: int = 0


def run_heldout(spec: RunSpec, passes: list[EvalPass], byte_lengths: np.ndarray, batch_size: int, seq_len: int,
                run_dir: Path, time_limit: float, policy: SandboxPolicy | None = None
                ) -> tuple[TrainOutcome, dict[str, PassResult]]:
    """A second sandboxed process scores the passes; the data stays with the parent, batch by batch."""
    results = {item.name: PassResult() for item in passes}
    penalty = 2.0 * math.log(spec.vocab_size)

    def serve(channel: Channel, outcome: TrainOutcome, deadline: float) -> None:
        channel.send_json(Kind.CONFIG, spec.to_json())
        for item in passes:
            plan = StreamPlan(item.tokens, byte_lengths, batch_size, seq_len, item.byte_budget)
            for piece in plan.batches():
                if item.max_batches is not None and piece.index >= item.max_batches:
                    break
                channel.send_batch(piece.index, batch_size, seq_len, piece.chunk, int(item.trained))
                kind, payload = _expect(channel, deadline, outcome)
                index, nats, finite = parse_record(payload)
                result = results[item.name]
                if not finite or not math.isfinite(nats):
                    nats, result.non_finite = penalty * piece.targets, result.non_finite + 1
                result.nats += nats
                result.targets += piece.targets
                result.bytes += piece.target_bytes
                result.batches += 1
        channel.send_json(Kind.END, {})
        while True:
            kind, payload = _expect(channel, deadline, outcome, allow_done=True)
            if kind == Kind.DONE:
                outcome.stopped_reason = "heldout_complete"
                return

    outcome = _supervise(spec, run_dir, time_limit, policy, TrainOutcome(), serve)
    return outcome, results


def _expect(channel: Channel, deadline: float, outcome: TrainOutcome, allow_done: bool = False) -> tuple[Kind, bytes]:
    while True:
        kind, payload = channel.recv(timeout=max(0.001, deadline - time.monotonic()))
        if kind == Kind.RECORD or (allow_done and kind == Kind.DONE):
            return kind, payload
        if kind == Kind.ERROR:
            reason = parse_json(payload)
            outcome.reasons.append(Reason(rule=str(reason.get("rule", "run:exception")),
                                          message=str(reason.get("message", ""))[:4000],
                                          file=reason.get("file"), line=reason.get("line")))
            raise ProtocolError("the held-out runner failed")
        if kind not in (Kind.HELLO, Kind.INFO):
            raise ProtocolError(f"unexpected frame {kind.name} from the held-out runner")
