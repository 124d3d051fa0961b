"""The trust boundary (docs/rules.md, "Threat model"): the trainer's process is assumed owned by the miner, so
nothing it does to itself can change a score. These bundles bypass the static policy on purpose (they go straight
to the harness) and attack from inside the trainer, through the real sandbox."""

from __future__ import annotations

import math
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
])
def test_the_batch_channel_takes_only_requests(bundle_factory, tmp_path, honest, step, expected):
    outcome = run(bundle_factory, tmp_path, trainer(BATCH_CHANNEL, step))
    assert [reason.rule for reason in outcome.reasons] == ["run:crash"], outcome.reasons or outcome.log_tail
    assert expected in outcome.reasons[0].message
    assert outcome.batch_nats == honest.batch_nats[:len(outcome.batch_nats)]  # what was scored before stays right
