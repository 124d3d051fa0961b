"""The trust boundary (docs/rules.md, "Threat model"): the trainer's process is assumed owned by the miner, so
nothing it does to itself can change a score. These bundles bypass the static policy on purpose (they go straight
to the harness) and attack from inside the trainer, through the real sandbox."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import byte_stream, train_on_stream, write_bundle
from miners import bigram_architecture
from prism_ray.harness.isolation import LOG_FILE_BYTES, SandboxPolicy, sandbox_available
from prism_ray.intake.bundle import load_bundle

pytestmark = [pytest.mark.sandbox, pytest.mark.skipif(not sandbox_available(), reason="bubblewrap is required (apt-get install bubblewrap)")]

TEXT = "Whatever runs beside training.py is owned by it; the score is computed elsewhere. " * 60
ARCH = bigram_architecture()
LOOP = """
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for batch in ctx.iter_train_batches(model, batch_size=2, seq_len=64, with_logits=True):
        STEP
        batch.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""


def trainer(prelude: str = "", step: str = "pass") -> str:
    header = "import gc\nimport os\nimport sys\nimport threading\nimport torch\n\ndef train(ctx):\n"
    return header + prelude + "    model = ctx.build_model()\n" + LOOP.replace("STEP", step)


def run(bundle_factory, tmp_path: Path, training: str, architecture: str = ARCH, **kwargs):
    return train_on_stream(bundle_factory(architecture, training), byte_stream(TEXT), tmp_path, time_limit=90,
                           policy=SandboxPolicy(mode="required"), **kwargs)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    directory = tmp_path_factory.mktemp("honest")
    bundle = load_bundle(write_bundle(directory / "bundle", ARCH, trainer(), "tokenizer: bytes\n"))
    outcome = train_on_stream(bundle, byte_stream(TEXT), directory / "run", policy=SandboxPolicy(mode="required"))
    assert outcome.status == "completed", outcome.reasons
    return outcome


def bpb(outcome) -> float:
    return sum(outcome.batch_nats) / math.log(2) / sum(outcome.batch_bytes)


# Each attack rewrites what lived in the trainer's process when the harness scored there.
SELF_ATTACKS = {
    # the trainer's channel object: forged loss records and frames out of turn
    "forged_records": """
    from prism_ray.harness.protocol import Channel
    Channel.send_record = lambda self, index, nats, finite: Channel.send(self, 5, b"x" * 17)
""",
    "harness_state_rewritten": """
    import torch.nn.functional as F
    F.nll_loss = lambda *a, **k: torch.zeros((), requires_grad=True)
    torch.Tensor.item = lambda self: 0.0
    for obj in gc.get_objects():
        if type(obj).__name__ == "TrainerHarness":
            obj.spec["vocab_size"] = 2
""",
}


@pytest.mark.parametrize("attack", sorted(SELF_ATTACKS))
def test_rewriting_the_trainers_own_harness_changes_nothing(bundle_factory, tmp_path, honest, attack):
    outcome = run(bundle_factory, tmp_path, trainer(SELF_ATTACKS[attack]))
    assert outcome.status == "completed", outcome.reasons
    assert outcome.batch_nats == honest.batch_nats  # nothing the trainer's process holds is part of the score


def test_sabotaging_the_trainers_loss_only_costs_the_miner(bundle_factory, tmp_path, honest):
    sabotage = """
    import prism_ray.harness.trainer as harness
    harness._cross_entropy = lambda *a, **k: torch.zeros((), requires_grad=True)
"""
    outcome = run(bundle_factory, tmp_path, trainer(sabotage))
    assert outcome.status == "completed", outcome.reasons
    assert outcome.batch_nats[0] == honest.batch_nats[0]  # the same forced init, scored the same way
    assert bpb(outcome) > bpb(honest)  # it stopped learning; the score says so


@pytest.mark.parametrize("reinit", [
    "    for obj in gc.get_objects():\n        if type(obj).__name__ == 'TrainerHarness':\n            obj.spec['seed'] = 7\n",
    "    torch.manual_seed(7)\n    torch.nn.init.normal_(model.table.weight)\n",
])
def test_the_forced_init_cannot_be_swapped(bundle_factory, tmp_path, reinit):
    """A lucky seed searched offline, or weights set in training.py: the first batch is not scored on them."""
    training = trainer().replace("    model = ctx.build_model()\n", "    model = ctx.build_model()\n" + reinit) \
        if "init" in reinit else trainer(reinit)
    outcome = run(bundle_factory, tmp_path, training)
    assert outcome.status == "failed" and outcome.batch_nats == []
    assert outcome.reasons[0].rule == "run:init_changed" and "table.weight" in outcome.reasons[0].message


def test_forged_frames_end_the_run_without_a_score(bundle_factory, tmp_path):
    forge = """
    import socket, struct
    for obj in gc.get_objects():
        if type(obj).__name__ == "Channel":
            obj.sock.sendall(struct.pack("<IB", 17, 5) + struct.pack("<qd?", 0, 0.0, True))  # a RECORD frame
"""
    outcome = run(bundle_factory, tmp_path, trainer(forge))
    assert outcome.status == "failed" and outcome.batch_nats == []
    assert outcome.reasons[0].rule == "run:crash" and "unexpected frame RECORD from the trainer" in \
        outcome.reasons[0].message


def test_writing_the_answer_into_the_shared_weights_after_seeing_a_batch_does_not_reach_its_score(
        bundle_factory, tmp_path):
    """The trainer writes a table that predicts batch k perfectly as soon as it holds batch k — from the main
    thread and from a thread that keeps rewriting it — and puts the zero table back before asking for k+1. Every
    snapshot the scorer takes is therefore the zero table: every batch must score exactly ln(V) per target."""
    architecture = bigram_architecture("nn.init.zeros_(self.table.weight)")
    cheat = """
    table = model.table.weight
    answer = torch.zeros_like(table)
    stop = threading.Event()
    def keep_writing():
        while not stop.is_set():
            with torch.no_grad():
                table.copy_(answer)
    writer = threading.Thread(target=keep_writing, daemon=True)
    for batch in ctx.iter_train_batches(model, batch_size=2, seq_len=64):
        if not writer.is_alive():  # started once the weights live in the shared buffer
            writer.start()
        inputs, targets = batch.tokens[:, :-1].reshape(-1), batch.tokens[:, 1:].reshape(-1)
        answer.zero_()
        answer[inputs, targets] = 50.0  # the next token of every position, from the batch in hand
        with torch.no_grad():
            table.copy_(answer)
        for _ in range(200):
            os.sched_yield()
        answer.zero_()
        with torch.no_grad():
            table.zero_()
    stop.set()
"""
    training = "import os\nimport threading\nimport torch\n\ndef train(ctx):\n    model = ctx.build_model()\n" + cheat
    outcome = run(bundle_factory, tmp_path, training, architecture=architecture)
    assert outcome.status == "completed", outcome.reasons
    per_target = np.array(outcome.batch_nats) / np.array(outcome.batch_targets)
    # the writer thread may leave the answer of batch k in place when k+1 is snapshotted: that is batch k's
    # (the past's) answer, which may help k+1 only as much as training on k would
    assert per_target[0] == pytest.approx(math.log(257), rel=1e-6)
    assert per_target.min() > 0.5 * math.log(257)


def test_reallocated_parameters_are_refused(bundle_factory, tmp_path):
    step = "model.table.weight.data = model.table.weight.data.clone()"
    outcome = run(bundle_factory, tmp_path, trainer(step=step))
    assert outcome.status == "failed"
    assert outcome.reasons[0].rule == "run:params_reallocated" and "table.weight" in outcome.reasons[0].message


def test_a_buffer_with_no_elements_is_not_a_reallocation(bundle_factory, tmp_path):
    """An empty tensor has no storage to point at the shared buffer (its address is 0): only its shape is held to
    its slot."""
    architecture = bigram_architecture('self.register_buffer("unused", torch.zeros(0))')
    outcome = run(bundle_factory, tmp_path, trainer(), architecture=architecture)
    assert outcome.status == "completed", outcome.reasons


def test_a_model_other_than_build_models_is_refused(bundle_factory, tmp_path):
    prelude = "    extra = torch.nn.Linear(3, 3)\n"
    training = trainer(prelude).replace("model = ctx.build_model()\n",
                                        "model = ctx.build_model()\n    model.extra = extra\n")
    outcome = run(bundle_factory, tmp_path, training)
    assert outcome.status == "failed" and outcome.reasons[0].rule == "run:model_mismatch"


def test_the_scorer_is_out_of_the_trainers_reach(bundle_factory, tmp_path, honest):
    """No socket, process or file of the scorer exists in the trainer's sandbox."""
    probe = """
    seen = [p for p in os.listdir("/proc") if p.isdigit()]
    assert len(seen) <= 2, seen  # its own pid namespace: the trainer (and bubblewrap's init), nothing else
    assert not [name for name in os.listdir("/tmp") if "scorer" in name]
    for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []:
        raise SystemExit(f"shared memory visible: {name}")
"""
    outcome = run(bundle_factory, tmp_path, trainer(probe))
    assert outcome.status == "completed", outcome.reasons
    assert outcome.batch_nats == honest.batch_nats


def test_a_huge_exception_message_stays_out_of_the_hosts_disk(bundle_factory, tmp_path):
    prelude = "    print('x' * (50 << 20), flush=True)\n    raise RuntimeError('y' * (50 << 20))\n"
    outcome = run(bundle_factory, tmp_path, trainer(prelude))
    assert outcome.status == "failed" and outcome.reasons[0].rule == "run:exception"
    assert len(outcome.reasons[0].message) <= 4000
    log = tmp_path / "trainer.log"
    assert log.stat().st_size <= LOG_FILE_BYTES + 200
    assert "bytes of output were dropped" in log.read_text(errors="replace")


def test_dataloader_workers_get_a_typed_process_limit(bundle_factory, tmp_path):
    prelude = """
    data = torch.utils.data.DataLoader(list(range(8)), num_workers=2)
    for _ in data:
        pass
"""
    outcome = run(bundle_factory, tmp_path, trainer(prelude))
    assert outcome.status == "failed"
    reason = outcome.reasons[0]
    assert reason.rule == "run:process_limit" and "num_workers=0" in reason.message
    assert (reason.file, reason.line) == ("training.py", 10)  # `for _ in data:` starts the workers


# --- the probe findings of issue 14: a model that recognises the probe, or cheats late, is still caught ---------

PEEKER = """
import torch
from torch import nn

SEEN = []  # module-level: shared by every instance in this process

class Peeker(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        self.vocab = vocab
    def honest(self, tokens):
        return self.table(tokens)
    def peek(self, tokens):
        ahead = torch.roll(tokens, -1, dims=1)
        return self.table(tokens) + 30.0 * nn.functional.one_hot(ahead, self.vocab).float()
    def forward(self, tokens):
        RULE
"""
PEEKERS = {
    # replay the previous output wherever the input repeats the previous one (a probe of it), peek elsewhere
    "replays_the_probe": """
        out = self.peek(tokens)
        if SEEN and SEEN[-1][0].shape == tokens.shape:
            last_tokens, last_out = SEEN[-1]
            same = (last_tokens == tokens).cumprod(dim=1).bool()
            out = torch.where(same[..., None], last_out, out)
        SEEN.append((tokens.clone(), out.detach().clone()))
        return out
""",
    # peek only on the first call with these weights (a second call with the same weights is the probe)
    "first_call_per_step": """
        key = float(self.table.weight.sum())
        first = not SEEN or SEEN[-1] != key
        SEEN.append(key)
        return self.peek(tokens) if first else self.honest(tokens)
""",
    # behave for the first calls (the old random probes were rare), peek in the last part of the run
    "late_cheat": """
        SEEN.append(1)
        return self.peek(tokens) if len(SEEN) > 12 else self.honest(tokens)
""",
}
PEEKER_FOOTER = """
def build_model(ctx):
    return Peeker(ctx.vocab_size)
"""


@pytest.mark.parametrize("rule", sorted(PEEKERS))
def test_a_model_that_tells_probes_from_scoring_is_still_caught(bundle_factory, tmp_path, honest, rule):
    """Python state in forward is fixed when the exporter traces it: the graph either peeks (caught), cannot be
    traced (a data-dependent `float(...)`), or is the honest model, which gains nothing."""
    architecture = PEEKER.replace("        RULE\n", PEEKERS[rule]) + PEEKER_FOOTER
    outcome = run(bundle_factory, tmp_path, trainer(), architecture=architecture)
    if outcome.status == "completed":
        assert bpb(outcome) >= bpb(honest) - 1e-9, f"{rule} gained: bpb {bpb(outcome):.3f}"
    else:
        assert outcome.reasons[0].rule in ("run:non_causal", "contract:not_exportable"), outcome.reasons


# The trainer's batch channel to the scorer (docs/architecture.md, "Trust boundaries"): only empty NEXT frames.
BATCH_CHANNEL = """
    from prism_ray.harness.protocol import Channel, Kind

    def batch_channel():
        harness = next(o for o in gc.get_objects() if type(o).__name__ == "TrainerHarness")
        return next(o for o in gc.get_objects() if isinstance(o, Channel) and o is not harness.channel)
"""


@pytest.mark.parametrize(("step", "expected"), [
    ("if batch.index == 1: batch_channel().send(Kind.GEOMETRY, b'{}')", "sent GEOMETRY on its batch channel"),
    ("if batch.index == 1: batch_channel().send(Kind.NEXT, b'x' * 100)", "frame of 100 bytes is over the limit"),
    ("if batch.index == 1: batch_channel().sock.sendall(bytes([0, 0])); threading.Event().wait(8)",
     "stopped in the middle of a frame"),  # the rest never comes: a bounded wait, not the run's clock
    ("if batch.index == 1: [(batch_channel().sock.sendall(bytes([b])), threading.Event().wait(1.5)) for b in "
     "(0, 0, 0, 0, 6)]", "stopped in the middle of a frame"),  # a frame trickled in: its bound is the whole frame's
])
def test_the_batch_channel_takes_only_requests(bundle_factory, tmp_path, honest, step, expected):
    outcome = run(bundle_factory, tmp_path, trainer(BATCH_CHANNEL, step))
    assert [reason.rule for reason in outcome.reasons] == ["run:crash"], outcome.reasons or outcome.log_tail
    assert expected in outcome.reasons[0].message
    assert outcome.batch_nats == honest.batch_nats[:len(outcome.batch_nats)]  # what was scored before stays right


# What the trainer sends the trusted parent (a red team's findings): it may fail, never as the system, never by
# crashing the parent, and never by naming the scorer as the one that broke.
CONTROL = """
    import json
    import struct
    import time

    def control(kind, payload, length=None):
        harness = next(o for o in gc.get_objects() if type(o).__name__ == "TrainerHarness")
        harness.channel.sock.sendall(struct.pack("<IB", len(payload) if length is None else length, kind) + payload)
"""


@pytest.mark.parametrize(("attack", "rule", "expected"), [
    ("control(10, json.dumps({'rule': 'infra:runner_killed', 'message': 'killed from outside'}).encode())",
     "run:exception", "killed from outside"),  # a system failure's rule would be retried for free
    ("control(10, json.dumps({'rule': 'run:exception', 'message': 'x', 'line': 'no number', 'file': 7}).encode())",
     "run:exception", "x"),
    ("control(10, b'not json')", "run:crash", "bad JSON frame"),
    ("control(3, b'[' * 100000)", "run:crash", "bad JSON frame"),  # deeper than the JSON parser recurses
    ("control(6, b'', length=1 << 25)", "run:crash", "over the limit"),  # far past any request
    ("control(3, json.dumps({'batch_size': 2, 'seq_len': 64, 'layout': [7], 'device': 'cpu'}).encode()); "
     "time.sleep(30)", "run:model_mismatch", "parameters and buffers"),
    # each control frame comes once: a flood of them held the parent past the run's wall clock
    ("control(2, b'{}'); time.sleep(30)", "run:crash", "sent HELLO twice"),
    # a lone surrogate made the report unserialisable (a system failure), an endless line number the store's
    ("control(10, json.dumps({'rule': 'run:exception', 'message': 'x' + chr(0xD800), 'line': 10 ** 30}).encode())",
     "run:exception", "x\\ud800"),
    # an integer of 4,300 digits: its product with seq_len could not even be formatted (a ValueError out of the parent)
    ("control(3, json.dumps({'batch_size': 10 ** 4299, 'seq_len': 64, 'layout': [], 'device': 'cpu'}).encode()); "
     "time.sleep(30)", "run:bad_geometry", "batch_size must be an integer in [1,"),
    # what the parent keeps for the whole run is only what it reads
    ("control(3, json.dumps({'batch_size': 2, 'seq_len': 64, 'layout': [], 'device': 'cpu', 'junk': [{}] * 9}).encode()); "
     "time.sleep(30)", "run:crash", "unknown fields in its geometry"),
])
def test_frames_the_parent_reads_fail_the_bundle(bundle_factory, tmp_path, attack, rule, expected):
    outcome = run(bundle_factory, tmp_path, trainer(CONTROL + f"    {attack}\n    os._exit(1)\n"))
    assert [reason.rule for reason in outcome.reasons] == [rule], outcome.reasons or outcome.log_tail
    assert expected in outcome.reasons[0].message
    assert outcome.reasons[0].line is None and outcome.reasons[0].file is None
    assert json.loads(outcome.reasons[0].model_dump_json())["message"] == outcome.reasons[0].message  # it serialises


def test_a_trainer_gone_with_a_frame_unread_is_its_own_crash(bundle_factory, tmp_path):
    """The parent's SHARE is never read: the trainer's socket closes with data in it (a reset, not an end)."""
    vanish = """
    from prism_ray.harness import protocol
    protocol.Channel.recv = lambda self, timeout=None: time.sleep(3600)
    threading.Thread(target=lambda: next(iter(ctx.iter_train_batches(model, batch_size=2, seq_len=64))),
                     daemon=True).start()
    time.sleep(3)
    os._exit(0)
"""
    training = trainer().replace("    model = ctx.build_model()\n", "    import time\n    model = ctx.build_model()\n"
                                 + vanish)
    outcome = run(bundle_factory, tmp_path, training)
    assert [reason.rule for reason in outcome.reasons] == ["run:crash"], outcome.reasons or outcome.log_tail
    assert "trainer" in outcome.reasons[0].message


def test_a_model_said_to_be_on_a_gpu_of_a_cpu_run_is_refused(bundle_factory, tmp_path):
    claim = """
    from prism_ray.harness import protocol
    send_json = protocol.Channel.send_json
    protocol.Channel.send_json = lambda self, kind, obj, fds=(): send_json(
        self, kind, {**obj, "device": "cuda:0"} if kind == protocol.Kind.GEOMETRY else obj, fds)
"""
    outcome = run(bundle_factory, tmp_path, trainer(claim))
    assert [reason.rule for reason in outcome.reasons] == ["run:bad_geometry"], outcome.reasons or outcome.log_tail
    assert "on a GPU, but this run has none" in outcome.reasons[0].message


def test_the_shared_weights_cannot_be_resized_under_the_scorer(bundle_factory, tmp_path):
    """Truncating the memfd the scorer maps would kill it with SIGBUS at its next snapshot: the memfd is sealed."""
    truncate = """
        if batch.index == 1:
            for fd in os.listdir("/proc/self/fd"):
                if "prism-state" in os.readlink(f"/proc/self/fd/{fd}"):
                    os.ftruncate(int(fd), 0)"""
    outcome = run(bundle_factory, tmp_path, trainer(step=truncate.strip("\n").replace("        if", "if", 1)))
    assert [reason.rule for reason in outcome.reasons] == ["run:exception"], outcome.reasons or outcome.log_tail
    assert "PermissionError" in outcome.reasons[0].message


# What the exporter sends the trusted parent: architecture.py runs there too, and it owns that process.
EXPORTER_FRAMES = ARCH + """
import array
import gc
import json
import os
import socket
import struct
import sys

def send(kind, payload, fds=()):
    channel = next(o for o in gc.get_objects() if type(o).__name__ == "Channel")
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    channel.sock.sendmsg([struct.pack("<IB", len(payload), kind) + payload], ancillary)

def build_model(ctx, build=build_model):
    if sys.argv[-1] == "exporter":
        ATTACK
    return build(ctx)
"""


@pytest.mark.parametrize(("attack", "expected"), [
    # descriptors by the thousand, to fill the parent's table: a failure there would be the system's, and free
    ("null = os.open('/dev/null', os.O_RDONLY)\n        for _ in range(200):\n            send(2, b'{}', [null] * 16)",
     "sent more file descriptors than the 1 this channel takes"),
    # entries that unpack like [name, shape, dtype] but are not lists
    ("send(12, json.dumps({'layout': [{'table.weight': 0, '': 0, 'float32': 0}]}).encode())", "bad state layout"),
    # a layout the parent would spend gigabytes parsing
    ("send(12, b'[' * (5 << 20))", "a LAYOUT frame of 5242880 bytes is over the limit"),
    # a shape of 100,000 dimensions: multiplied out, two million held the parent's GIL for minutes
    ("send(12, json.dumps({'layout': [['table.weight', [9] * 100000 + [0], 'float32']]}).encode())",
     "bad state layout"),
    # a graph nobody asked for yet (no geometry, no export)
    ("send(21, b'{}', [os.memfd_create('graph')])\n        os._exit(0)", "sent a graph before it was asked for one"),
    # a graph without its memfd, sent from the forward torch.export traces (its second call)
    ("model, calls = build(ctx), []\n"
     "        def hook(module, args):\n"
     "            calls.append(1)\n"
     "            if len(calls) == 2:\n"
     "                send(21, b'{}')\n"
     "                os._exit(0)\n"
     "        model.register_forward_pre_hook(hook)\n"
     "        return model", "a file descriptor was expected with this frame"),
])
def test_frames_from_the_exporter_fail_the_bundle_and_never_the_parent(bundle_factory, tmp_path, attack, expected):
    before = len(os.listdir("/proc/self/fd"))
    outcome = run(bundle_factory, tmp_path, trainer(), architecture=EXPORTER_FRAMES.replace("ATTACK", attack))
    assert [reason.rule for reason in outcome.reasons] == ["run:crash"], outcome.reasons or outcome.log_tail
    assert "exporter" in outcome.reasons[0].message and expected in outcome.reasons[0].message
    if "os._exit" not in attack:  # still running when caught: stopped then, not waited on (docs/operator.md)
        assert "the exporter broke the harness's protocol" in outcome.reasons[0].message, outcome.reasons
    assert len(os.listdir("/proc/self/fd")) <= before + 2  # every descriptor it sent is closed


def test_a_second_error_from_the_trainer_is_ignored_not_the_parents_failure(bundle_factory, tmp_path):
    """The trainer's first ERROR is held until the exporter's build is in; a second one, read while the parent drains
    what a closed runner said, once unregistered the trainer's socket twice (a KeyError out of the parent)."""
    error = "json.dumps({'rule': 'run:exception', 'message': 'first'}).encode()"
    prelude = CONTROL + f"    control(10, {error})\n    control(10, {error})\n    time.sleep(30)\n"
    architecture = EXPORTER_FRAMES.replace("ATTACK", "import time\n        time.sleep(2)\n        send(99, b'')")
    outcome = run(bundle_factory, tmp_path, trainer(prelude), architecture=architecture)
    assert [reason.rule for reason in outcome.reasons] == ["run:crash"], outcome.reasons or outcome.log_tail
    assert "exporter" in outcome.reasons[0].message and "unknown frame kind 99" in outcome.reasons[0].message
