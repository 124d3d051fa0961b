"""The GPU hand-off (PRISM_GPU_HANDOFF=stream; docs/architecture.md, "The GPU hand-off"), on a machine without a GPU.

What runs here: the ordering code itself (harness/handoff.py, and the scorer's stream path around it) on `SimGpu`,
a simulation of CUDA's stream semantics on CPU tensors — each stream runs its operations in order, a wait holds its
stream until its word or event allows, and the streams advance in whatever interleaving a seeded random schedule
picks; the parent's SHARE/READY frames and descriptors in stream mode; the driver binding; and CPU runs with the
setting on, which must not change. What does not run here: `CudaOps` and the driver calls on a real GPU, whose
memory ordering across two processes' contexts this simulation assumes (bench/gpu.py --handoff both measures it).
"""

from __future__ import annotations

import ctypes
import math
import os
import random
import selectors
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydantic
import pytest
import torch

from conftest import REPO, byte_stream, train_on_stream
from miners import bigram_architecture
from prism_ray.config import Settings
from prism_ray.harness import cuda_flags, cuda_ipc, layout, shared_state
from prism_ray.harness.context import RunError, rows
from prism_ray.harness.handoff import ScorerHandoff, TrainerHandoff, words
from prism_ray.harness.isolation import SandboxPolicy, sandbox_available
from prism_ray.harness.layout import HandoffSpec
from prism_ray.harness.protocol import Channel, Kind, parse_batch, parse_json
from prism_ray.harness.rank_check import RankCheck
from prism_ray.harness.ranks import Ranks
from prism_ray.harness.records import RunSpec
from prism_ray.harness.scorer import Scorer, _Ahead
from prism_ray.harness.session import _Session

CPU = torch.device("cpu")


# --- a simulation of CUDA streams ----------------------------------------------------------------------------------


class _Event:
    done = False


class SimGpu:
    """Every stream of every simulated process. `step` runs the first operation of a stream that can run: picked at
    random (even seeds), or the ready stream of highest rank in a random order of the streams (odd seeds), so that
    some stream is kept behind as long as another can run; `run` steps until none can."""

    def __init__(self, seed: int = 0, watch: Callable[[], None] | None = None):
        self.queues: list[deque] = []
        self.random = random.Random(seed)
        self.by_rank = seed % 2 == 1
        self.ranks: dict[int, float] = {}  # id of a queue → its rank in the order
        self.watch = watch  # called after every operation: the invariants of a test
        self.copied_to: list[int] = []  # the destination of each copy done, in order

    def step(self) -> bool:
        ready = [queue for queue in self.queues if queue and queue[0][0]()]
        if not ready:
            return False
        chosen = max(ready, key=lambda queue: self.ranks[id(queue)]) if self.by_rank else self.random.choice(ready)
        _, action = chosen.popleft()
        action()
        if self.watch is not None:
            self.watch()
        return True

    def run(self, steps: int | None = None) -> None:
        while (steps is None or steps > 0) and self.step():
            steps = None if steps is None else steps - 1


def _geq(word: torch.Tensor, value: int) -> bool:
    """CU_STREAM_WAIT_VALUE_GEQ: (int32)(*word − value) ≥ 0."""
    return (int(word) - value) & 0xFFFFFFFF < 1 << 31


class SimOps:
    """handoff.Ops for one process on a SimGpu: its own current stream; the GPU runs what is ready when the host
    polls an event, as a real one runs on its own."""

    def __init__(self, gpu: SimGpu):
        self.gpu = gpu
        self.own_current = self.stream(CPU)

    def stream(self, device: torch.device) -> deque:
        queue: deque = deque()
        self.gpu.queues.append(queue)
        self.gpu.ranks[id(queue)] = self.gpu.random.random()
        return queue

    def current(self, device: torch.device) -> deque:
        return self.own_current

    def launch(self, stream: deque, action: Callable[[], None]) -> None:
        stream.append((lambda: True, action))

    def wait_value(self, stream: deque, word: torch.Tensor, value: int) -> None:
        stream.append((lambda: _geq(word, value), lambda: None))

    def write_value(self, stream: deque, word: torch.Tensor, value: int) -> None:
        self.launch(stream, lambda: word.fill_(value))

    def copy(self, stream: deque, dst: torch.Tensor, src: torch.Tensor) -> None:
        def copy() -> None:
            dst.copy_(src)
            self.gpu.copied_to.append(dst.data_ptr())

        self.launch(stream, copy)

    def record(self, stream: deque) -> _Event:
        event = _Event()
        self.launch(stream, lambda: setattr(event, "done", True))
        return event

    def wait_event(self, stream: deque, event: _Event) -> None:
        stream.append((lambda: event.done, lambda: None))

    def done(self, event: _Event) -> bool:
        self.gpu.run()
        return event.done

    def keep(self, tensor: torch.Tensor, stream: deque) -> None:
        pass

    def upload(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        return host.clone()


# --- the hand-off's order ------------------------------------------------------------------------------------------

RANKS, ROWS, LENGTH, REQUESTS = 2, 2, 5, 6
SPEC = HandoffSpec(rows=ROWS, seq_len=LENGTH)


def batch(index: int) -> torch.Tensor:
    """Batch `index`'s rows [B, L]: every batch's values are its own."""
    return torch.arange(RANKS * ROWS * LENGTH, dtype=torch.int64).view(RANKS * ROWS, LENGTH) + 1000 * (index + 1)


def step(weights: torch.Tensor, tokens: torch.Tensor) -> None:
    """A rank's optimizer step on its rows: the weights after it depend on the batch."""
    weights.mul_(0.5).add_(tokens.double().mean())


class Stream:
    """Scorer and ranks of one simulated run: each rank's buffer shared between the scorer's ops and its own."""

    def __init__(self, seed: int):
        self.gpu = SimGpu(seed, watch=self.check)
        self.buffers = [torch.zeros(SPEC.nbytes, dtype=torch.uint8) for _ in range(RANKS)]
        self.weights = [torch.zeros(4, dtype=torch.float64) for _ in range(RANKS)]  # each rank's shared state
        self.private = torch.zeros(4, dtype=torch.float64)
        self.scorer_ops = SimOps(self.gpu)
        self.scorer = ScorerHandoff(self.scorer_ops, self.buffers, SPEC, CPU)
        self.rank_ops = [SimOps(self.gpu) for _ in range(RANKS)]
        self.ranks = [TrainerHandoff(ops, buffer, SPEC) for ops, buffer in zip(self.rank_ops, self.buffers,
                                                                                  strict=True)]
        self.snapshots: list[torch.Tensor] = []
        self.scored: list[torch.Tensor] = []  # what the scorer's forward of each batch read
        self.states = [self.weights[0].clone()]  # rank 0's weights after each step, in order
        self.violations: list[str] = []

    def check(self) -> None:
        """After every GPU operation: a snapshot just copied is recorded; a rank's buffer holds batch k only once
        snapshot k was copied."""
        if self.gpu.copied_to.count(self.private.data_ptr()) > len(self.snapshots):
            self.snapshots.append(self.private.clone())
        for rank, buffer in enumerate(self.buffers):
            held = int(layout_rows(buffer)[0, 0]) // 1000 - 1
            if held >= 0 and len(self.snapshots) < held + 1:
                self.violations.append(f"rank {rank} could read batch {held} before its snapshot")

    def serve(self, request: int) -> None:
        """The scorer, once every rank asked for `request`: snapshot, release, then its forward on the snapshot
        (on its current stream, as the real one; the host does not wait for it)."""
        staged = self.scorer.stage(batch(request))
        self.scorer.snapshot(request, self.weights[0], self.private)
        self.scorer.release(request, staged)
        self.scorer_ops.launch(self.scorer_ops.current(CPU), lambda: self.scored.append(self.private.clone()))

    def train(self, rank: int, request: int) -> torch.Tensor:
        """Rank `rank` on the header of `request`: its rows, then a step on them on its current stream."""
        ops = self.rank_ops[rank]
        tokens = self.ranks[rank].take(request)

        def stepped() -> None:
            step(self.weights[rank], tokens)
            if rank == 0:
                self.states.append(self.weights[0].clone())

        ops.launch(ops.current(CPU), stepped)
        return tokens


def layout_rows(buffer: torch.Tensor) -> torch.Tensor:
    return buffer[layout.TOKENS:SPEC.nbytes].view(torch.int64).view(ROWS, LENGTH)


@pytest.mark.parametrize("seed", range(12))
def test_each_rank_gets_batch_k_only_after_snapshot_k_whatever_the_gpus_interleave(seed):
    run = Stream(seed)
    taken: list[list[torch.Tensor]] = [[] for _ in range(RANKS)]
    for request in range(REQUESTS):
        for rank in run.ranks:
            rank.asking(request)
        run.gpu.run(steps=run.gpu.random.randrange(6))  # the GPUs move on while the hosts talk
        run.serve(request)
        run.gpu.run(steps=run.gpu.random.randrange(6))
        for rank in range(RANKS):
            taken[rank].append(run.train(rank, request))
    for rank in run.ranks:
        rank.asking(REQUESTS)  # past the last batch: the trained state
    run.scorer.snapshot(REQUESTS, run.weights[0], run.private)
    assert run.scorer.late(timeout=5.0) == []
    run.gpu.run()
    assert run.violations == []
    # snapshot k is the weights after the steps on batches 0..k-1, exactly: no later step, no earlier one
    assert len(run.snapshots) == REQUESTS + 1 and len(run.states) == REQUESTS + 1
    for snapshot, state in zip(run.snapshots, run.states, strict=True):
        assert torch.equal(snapshot, state)
    for scored, state in zip(run.scored, run.states[:REQUESTS], strict=True):  # each forward read its snapshot
        assert torch.equal(scored, state)
    for rank in range(RANKS):  # each rank its own rows of every batch, kept though the buffer was overwritten since
        for request, tokens in enumerate(taken[rank]):
            assert torch.equal(tokens, batch(request)[rank * ROWS:(rank + 1) * ROWS])
    assert [int(words(buffer)[1]) for buffer in run.buffers] == [REQUESTS, REQUESTS]  # released: the last batch's


@pytest.mark.parametrize("seed", range(12))
def test_a_rank_that_lies_about_its_step_only_races_its_own_weights(seed):
    """Rank 0 says at once that every step has landed, and steps whenever it likes: batch k still reaches its
    buffer only after snapshot k was copied, and snapshot k never holds a step on batch k."""
    run = Stream(seed)
    words(run.buffers[0])[0].fill_(1 << 20)  # `stepped` far ahead, written by the rank itself
    for request in range(REQUESTS):
        run.ranks[1].asking(request)
        run.serve(request)
        run.gpu.run(steps=run.gpu.random.randrange(8))
        for rank in range(RANKS):
            run.train(rank, request)
        run.gpu.run(steps=run.gpu.random.randrange(8))
    run.gpu.run()
    assert run.violations == []
    assert len(run.snapshots) >= 1
    for request, snapshot in enumerate(run.snapshots):  # a state from before step `request`, whichever it was
        assert any(torch.equal(snapshot, state) for state in run.states[:request + 1]), request


def test_a_rank_that_never_signals_its_step_is_late_in_bounded_time_and_gets_nothing():
    run = Stream(0)
    run.ranks[0].asking(0)  # rank 1 asked on the host but its stream never writes `stepped`
    run.serve(0)
    started = time.monotonic()
    assert run.scorer.late(timeout=0.3) == [1]
    assert 0.3 <= time.monotonic() - started < 3.0
    run.gpu.run()
    assert run.snapshots == []  # nothing copied while a rank's step may still be landing...
    assert [int(words(buffer)[1]) for buffer in run.buffers] == [0, 0]  # ...nor released
    assert all(int(layout_rows(buffer).abs().sum()) == 0 for buffer in run.buffers)


# --- the scorer's stream path on the simulation ---------------------------------------------------------------------

VOCAB = 11
SLOTS, STATE_BYTES = layout.plan_slots([["w", [4], "float32"]])


class _Uniform:
    """A stand-in forward: uniform logits, so each batch's nats are B·(L−1)·ln V."""

    def __call__(self, state: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*tokens.shape, VOCAB)


@dataclass
class Rig:
    """An in-process scorer with the simulated hand-off: its parent's end, each rank's state and hand-off buffers,
    the scorer's batch channels and the ranks' ends, and each rank's side of the hand-off."""

    scorer: Scorer
    parent: Channel
    states: list[torch.Tensor]
    buffers: list[torch.Tensor]
    links: Ranks
    theirs: list[Channel]
    trainers: list[TrainerHandoff]
    gpu: SimGpu
    private: torch.Tensor

    def serve(self, batch: _Ahead, request: int, program: Callable = _Uniform()) -> None:
        self.scorer._serve(program, self.states[0], self.private, self.states[0].clone(), SLOTS,
                           shared_state.views(self.private, SLOTS), self.links, batch, request, overlap=True)


def rig(rank_timeout: float) -> Rig:
    parent, mine = socket.socketpair()
    scorer = Scorer(Channel(mine), {"device": "cpu", "vocab_size": VOCAB, "threads": 1, "rank_timeout": rank_timeout})
    gpu = SimGpu(0)
    buffers = [torch.zeros(SPEC.nbytes, dtype=torch.uint8) for _ in range(RANKS)]
    states = [torch.zeros(STATE_BYTES, dtype=torch.uint8) for _ in range(RANKS)]
    scorer.handoff = ScorerHandoff(SimOps(gpu), buffers, SPEC, CPU)
    scorer.ranks = RankCheck(states, SLOTS)
    links, theirs = Ranks(RANKS, rank_timeout), []
    for _ in range(RANKS):
        a, b = socket.socketpair()
        links.add(Channel(a))
        theirs.append(Channel(b))
    trainers = [TrainerHandoff(SimOps(gpu), buffer, SPEC) for buffer in buffers]
    return Rig(scorer, Channel(parent), states, buffers, links, theirs, trainers, gpu,
               torch.empty(STATE_BYTES, dtype=torch.uint8))


def _ahead(index: int) -> _Ahead:
    chunk = (np.arange(RANKS * ROWS * (LENGTH - 1) + 1, dtype=np.uint32) + index) % VOCAB
    return _Ahead(index, RANKS * ROWS, LENGTH, chunk, compare=True)


def test_the_scorer_sends_headers_and_scores_the_staged_batch():
    run = rig(rank_timeout=5.0)
    ahead = deque([_ahead(0), _ahead(1), _ahead(2)])
    run.scorer._stage(ahead)
    assert [batch.staged is not None for batch in ahead] == [True, True, False]  # two ahead, not all
    for request in range(2):
        for trainer in run.trainers:
            trainer.asking(request)
        batch = ahead.popleft()
        run.serve(batch, request)
        run.scorer._stage(ahead)
        for rank, (channel, trainer) in enumerate(zip(run.theirs, run.trainers, strict=True)):
            kind, payload = channel.recv(timeout=1.0)
            index, count, seq_len, chunk, _ = parse_batch(payload)
            assert (kind, index, count, seq_len, chunk.size) == (Kind.BATCH, request, ROWS, LENGTH, 0)  # a header
            tokens = trainer.take(request)
            run.gpu.run()
            assert torch.equal(tokens, rows(batch.chunk, LENGTH)[rank * ROWS:(rank + 1) * ROWS])
    nats = RANKS * ROWS * (LENGTH - 1) * math.log(VOCAB)
    assert [(index, finite) for index, _, finite in run.scorer.records] == [(0, True), (1, True)]
    assert [value for _, value, _ in run.scorer.records] == pytest.approx([nats, nats], rel=1e-6)
    for trainer in run.trainers:
        trainer.asking(2)
    run.scorer._take_final(run.states[0], run.private, run.links, 2)
    assert run.parent.recv(timeout=1.0) == (Kind.SNAPPED, b"final")
    assert [channel.recv(timeout=1.0)[0] for channel in run.theirs] == [Kind.END, Kind.END]


def test_a_rank_whose_step_never_lands_fails_the_run_as_rank_hung_naming_it():
    run = rig(rank_timeout=0.3)
    run.trainers[0].asking(0)  # rank 1 sent NEXT, but its GPU never gets past its step
    batch = _ahead(0)
    run.scorer._stage(deque([batch]))
    with pytest.raises(RunError) as failed:
        run.serve(batch, 0)
    assert failed.value.rule == "run:rank_hung"
    assert "rank 1's GPU work before its request for batch 0 did not finish within 0.3 s" in failed.value.message
    kind, payload = run.parent.recv(timeout=1.0)
    assert kind == Kind.ERROR and parse_json(payload)["rule"] == "run:rank_hung"
    run.gpu.run()
    assert [int(words(buffer)[1]) for buffer in run.buffers] == [0, 0]  # no rank got its rows


def test_a_rank_that_never_signals_at_the_end_fails_the_run_before_the_trained_state_is_taken():
    run = rig(rank_timeout=0.3)
    run.trainers[1].asking(0)
    with pytest.raises(RunError) as failed:
        run.scorer._take_final(run.states[0], run.private, run.links, 0)
    assert failed.value.rule == "run:rank_hung" and "rank 0's GPU work before its request for the end of the " \
        "stream" in failed.value.message
    assert run.parent.recv(timeout=1.0)[0] == Kind.ERROR  # never SNAPPED


def _out_of_memory(*args) -> torch.Tensor:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_gpu_the_trainer_filled_is_out_of_memory_in_the_scorer_not_a_crash(monkeypatch):
    """The scorer's staging copies and forwards need GPU memory beside the trainer's: when there is none left the
    run fails as run:out_of_memory, with what to leave, not as a scorer that died."""
    run = rig(rank_timeout=5.0)
    batch = _ahead(0)
    monkeypatch.setattr(SimOps, "upload", _out_of_memory)
    with pytest.raises(RunError) as failed:
        run.scorer._stage(deque([batch]))
    assert failed.value.rule == "run:out_of_memory"
    assert failed.value.message.startswith("the GPU ran out of memory when the scorer staged batch 0's tokens: the "
                                           "scorer shares the GPU with your trainer")
    monkeypatch.undo()
    run = rig(rank_timeout=5.0)
    run.scorer._stage(deque([batch]))
    for trainer in run.trainers:
        trainer.asking(0)
    with pytest.raises(RunError) as failed:
        run.serve(batch, 0, program=_out_of_memory)
    assert failed.value.rule == "run:out_of_memory"
    assert "the GPU ran out of memory in the scorer's forward on scored batch 0: " in failed.value.message
    assert "2.00 GiB" not in failed.value.message  # the graph saw data: only the type of what it raised is told
    kind, payload = run.parent.recv(timeout=1.0)
    assert kind == Kind.ERROR and parse_json(payload)["rule"] == "run:out_of_memory"


def test_a_gpu_handoff_asked_for_a_run_without_a_gpu_is_refused_not_a_crash():
    parent, mine = socketpair_channels()
    scorer = Scorer(mine, {"device": "cpu", "vocab_size": VOCAB, "threads": 1, "rank_timeout": 5.0})
    parent.send_json(Kind.SHARE, {"where": "memfd", "layout": [["w", [4], "float32"]], "ranks": 1,
                                  "handoff": SPEC.model_dump()})
    with pytest.raises(RunError) as failed:
        scorer.run()
    assert failed.value.rule == "run:protocol" and "not on a GPU" in failed.value.message
    kind, payload = parent.recv(timeout=1.0)
    assert kind == Kind.ERROR and parse_json(payload)["rule"] == "run:protocol"


def socketpair_channels() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return Channel(a), Channel(b, accept_fds=True)


# --- the parent's frames: SHARE and READY with the hand-off --------------------------------------------------------


class _Exited:
    """The exporter's runner, gone after its graph."""

    def wait(self, timeout: float) -> int:
        return 0


def _inode(fd: int) -> int:
    return os.fstat(fd).st_ino


@pytest.mark.parametrize("mode", ["stream", "host"])
def test_on_a_gpu_the_parent_passes_each_rank_its_handoff_buffer_only_in_stream_mode(tmp_path, mode):
    """The path of the descriptors: the scorer's SHARE asks for the hand-off, its READY brings a state buffer then a
    hand-off buffer per rank, and rank r's SHARE carries its own two and its batch channel, in that order. (The GPU
    allocations are memfds here: the parent only passes descriptors on.)"""
    spec = RunSpec(bundle_dir=tmp_path, exporter_bundle_dir=tmp_path, architecture=("a.py", "build_model"),
                   training=("t.py", "train"), tokenizer="bytes", vocab_size=257, max_seq_len=64, max_params=10**6,
                   seed=1, device="cuda", byte_budget=0, artifacts_dir=tmp_path / "artifacts", data_dir="", threads=2,
                   world_size=RANKS, gpu_handoff=mode)
    session = _Session(spec, byte_stream("x" * 400), np.ones(257, dtype=np.int64), tmp_path, 60.0, None,
                       SandboxPolicy(), None, 60.0, None)
    state_layout = [["w", [4], "float32"]]
    ranks_far = []
    for _ in range(RANKS):
        near, far = socket.socketpair()
        session.ranks.add(Channel(near))
        ranks_far.append(Channel(far, accept_fds=True))
    exporter, exporter_far = socket.socketpair()
    scorer, scorer_far = socket.socketpair()
    session.channels["exporter"] = Channel(exporter, accept_fds=True)
    session.selector.register(exporter, selectors.EVENT_READ, "exporter")
    session.channels["scorer"] = Channel(scorer, accept_fds=True)
    session.runners["exporter"] = _Exited()  # type: ignore[assignment]
    session.layout = state_layout
    session.geometry = {"layout": state_layout, "device": "cuda:0"}
    session.outcome.batch_size, session.outcome.seq_len = RANKS * ROWS, LENGTH
    session._share()
    assert session.handoff == (SPEC if mode == "stream" else None)
    session.channels["exporter"].fds.append(layout.new_memfd("graph", 64))
    session._exporter_graph(b"{}")
    kind, payload = Channel(scorer_far, accept_fds=True).recv(timeout=1.0)
    share = parse_json(payload)
    assert kind == Kind.SHARE and share.get("handoff") == (SPEC.model_dump() if mode == "stream" else None)

    made = [layout.new_memfd(f"rank-{rank}-{what}", 64) for what in ("state", "handoff") for rank in range(RANKS)]
    sent = made if mode == "stream" else made[:RANKS]
    Channel(scorer_far).send_json(Kind.READY, {"shares_state": True}, fds=tuple(sent))
    session._scorer_ready(session.channels["scorer"].recv(timeout=1.0)[1])
    for rank, far in enumerate(ranks_far):
        kind, payload = far.recv(timeout=1.0)
        share = parse_json(payload)
        assert kind == Kind.SHARE and share["where"] == "cuda"
        assert share.get("handoff") == (SPEC.model_dump() if mode == "stream" else None)
        buffers = [made[rank], made[RANKS + rank]] if mode == "stream" else [made[rank]]
        assert [_inode(fd) for fd in far.fds[:-1]] == [_inode(fd) for fd in buffers]
        assert len(far.fds) == len(buffers) + 1  # and the batch channel, last
        assert socket.socket(fileno=far.fds[-1]).type == socket.SOCK_STREAM
        far.fds.clear()
    for fd in made:
        os.close(fd)


# --- the driver, loaded only where it is used ------------------------------------------------------------------------


class _Function:
    """A driver entry point as ctypes hands it out: argtypes and restype are set on it."""


def _library(*names: str) -> object:
    library = type("Library", (), {})()
    for name in names:
        setattr(library, name, _Function())
    return library


def test_the_driver_binding_prefers_v2_falls_back_to_v1_and_refuses_neither():
    both = _library("cuStreamWaitValue32_v2", "cuStreamWriteValue32_v2", "cuStreamWaitValue32",
                    "cuStreamWriteValue32")
    ops = cuda_flags.bind(both)
    assert ops.wait is both.cuStreamWaitValue32_v2 and ops.write is both.cuStreamWriteValue32_v2
    assert ops.wait.argtypes == [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    assert ops.wait.restype is ctypes.c_int
    old = _library("cuStreamWaitValue32_v2", "cuStreamWaitValue32", "cuStreamWriteValue32")  # no v2 write
    assert cuda_flags.bind(old).wait is old.cuStreamWaitValue32
    with pytest.raises(cuda_ipc.CudaIpcError, match="PRISM_GPU_HANDOFF=host"):
        cuda_flags.bind(_library("cuMemCreate"))


def test_without_a_cuda_driver_a_handoff_call_is_a_typed_error(monkeypatch):
    def no_driver(*args, **kwargs):
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(cuda_ipc, "_driver", None)
    monkeypatch.setattr(cuda_flags, "_bound", None)
    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    with pytest.raises(cuda_ipc.CudaIpcError, match="no CUDA driver on this node"):
        cuda_flags.write(0, 0, 1)


def test_the_harness_modules_import_without_opening_libcuda():
    spy = """
import ctypes
opened = []
class Spy(ctypes.CDLL):
    def __init__(self, name, *args, **kwargs):
        opened.append(str(name))
        super().__init__(name, *args, **kwargs)
ctypes.CDLL = Spy
import prism_ray.harness.scorer, prism_ray.harness.trainer, prism_ray.harness.session, prism_ray.harness.handoff
print([name for name in opened if "libcuda.so" in name])
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", spy], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_setting_takes_host_or_stream(monkeypatch):
    assert Settings().gpu_handoff == "host"
    monkeypatch.setenv("PRISM_GPU_HANDOFF", "stream")
    assert Settings().gpu_handoff == "stream"
    with pytest.raises(pydantic.ValidationError):
        Settings(gpu_handoff="events")


# --- a CPU run with the setting on -----------------------------------------------------------------------------------

# Inside the trainer (these bundles go straight to the harness, past the static policy): every SHARE it reads and
# every batch it gets is checked; a hand-off offered, or a batch without its tokens, fails the run.
WATCHED = '''
import torch
from prism_ray.harness import trainer as harness

seen = []
parse_batch, parse_json = harness.parse_batch, harness.parse_json

def checked_batch(payload):
    parsed = parse_batch(payload)
    if parsed[3].size == 0:
        raise RuntimeError("a batch came without its tokens")
    seen.append(parsed[0])
    return parsed

def checked_json(payload):
    obj = parse_json(payload)
    if "handoff" in obj:
        raise RuntimeError("a GPU hand-off was offered to a CPU run")
    return obj

harness.parse_batch, harness.parse_json = checked_batch, checked_json

def train(ctx):
    model = ctx.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for batch in ctx.iter_train_batches(model, batch_size=2, seq_len=32, with_logits=True):
        batch.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if not seen:
        raise RuntimeError("the checks never ran")
'''


@pytest.mark.sandbox
@pytest.mark.skipif(not sandbox_available(), reason="bubblewrap is required (apt-get install bubblewrap)")
def test_a_cpu_run_with_the_stream_setting_is_the_cpu_run(bundle_factory, tmp_path):
    """PRISM_GPU_HANDOFF=stream changes nothing on CPU (a CPU node, or the contract check on a GPU node): the rows
    travel in the frames, no descriptor more is passed, and the losses are the same bit for bit."""
    bundle = bundle_factory(bigram_architecture(), WATCHED)
    text = byte_stream("Rows travel in frames on a CPU, whatever the GPU hand-off setting says. " * 12)
    outcomes = {mode: train_on_stream(bundle, text, tmp_path / mode, gpu_handoff=mode,
                                      policy=SandboxPolicy(mode="required"))
                for mode in ("host", "stream")}
    for outcome in outcomes.values():
        assert outcome.status == "completed", outcome.reasons or outcome.log_tail
    assert outcomes["stream"].batches > 2
    assert outcomes["stream"].batch_nats == outcomes["host"].batch_nats
