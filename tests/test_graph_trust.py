"""The scored forward is a graph, not code (docs/rules.md, "The scored forward"): architecture.py runs only in the
exporter, and every loss, probe and held-out number comes from the trusted scorer running the exported graph. These
bundles bypass the static policy on purpose (they go straight to the harness) and attack from architecture.py,
through the real sandbox: each gets a typed rule or gains nothing."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from conftest import byte_stream, train_on_stream, write_bundle
from miners import bigram_architecture
from prism_ray.harness.isolation import SandboxPolicy, sandbox_available
from prism_ray.harness.records import EvalPass
from prism_ray.intake.bundle import load_bundle

pytestmark = [pytest.mark.sandbox, pytest.mark.skipif(not sandbox_available(), reason="bubblewrap is required (apt-get install bubblewrap)")]

TEXT = "The forward that is scored is data: a graph of ATen operations run by prism-ray's own code. " * 50
VAL_TEXT = "SECRET-VAL Élan vital: this sentence is held out and must never reach a report. " * 20
TRAINING = """
import torch

def train(ctx):
    model = ctx.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for batch in ctx.iter_train_batches(model, batch_size=2, seq_len=64, with_logits=True):
        batch.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""


def run(bundle_factory, tmp_path: Path, architecture: str, **kwargs):
    return train_on_stream(bundle_factory(textwrap.dedent(architecture), TRAINING), byte_stream(TEXT), tmp_path,
                           time_limit=120, policy=SandboxPolicy(mode="required"), **kwargs)


def bpb(outcome) -> float:
    return sum(outcome.batch_nats) / math.log(2) / sum(outcome.batch_bytes)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    directory = tmp_path_factory.mktemp("honest")
    bundle = load_bundle(write_bundle(directory / "bundle", bigram_architecture(), TRAINING, "tokenizer: bytes\n"))
    outcome = train_on_stream(bundle, byte_stream(TEXT), directory / "run", policy=SandboxPolicy(mode="required"))
    assert outcome.status == "completed", outcome.reasons
    return outcome


PEEKER = """
import torch
from torch import nn

SEEN = []

class Peeker(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        self.vocab = vocab
        EXTRA
    def peek(self, tokens):
        ahead = torch.roll(tokens, -1, dims=1)
        return self.table(tokens) + BOOST * nn.functional.one_hot(ahead, self.vocab).to(self.table.weight.dtype)
    def forward(self, tokens):
        RULE

def build_model(ctx):
    return Peeker(ctx.vocab_size)
"""


def peeker(rule: str, extra: str = "pass", boost: str = "30.0") -> str:
    return (PEEKER.replace("        RULE\n", textwrap.indent(textwrap.dedent(rule), " " * 8))
            .replace("EXTRA", extra).replace("BOOST", boost))


# Finding 1: the scorer → prober channel through the model's own state, and models that tell the probe apart.
STATEFUL = {
    # the real batch kept in a registered buffer, replayed for a probe of it
    "buffer_channel": ("self.register_buffer('memory', torch.zeros(2, 64, dtype=torch.long))", """
        same = (self.memory == tokens).cumprod(dim=1).bool()
        self.memory.copy_(tokens)
        return torch.where(same[..., None], self.table(tokens), self.peek(tokens))
    """),
    # the prober used to get one row, the scorer B
    "row_count": ("pass", """
        return self.table(tokens) if tokens.shape[0] == 1 else self.peek(tokens)
    """),
    # honest on the first calls (the instantiation check), peeking later
    "late_python_flag": ("pass", """
        SEEN.append(1)
        return self.peek(tokens) if len(SEEN) > 3 else self.table(tokens)
    """),
}


@pytest.mark.parametrize("attack", sorted(STATEFUL))
def test_state_kept_by_the_model_reaches_no_score(bundle_factory, tmp_path, honest, attack):
    extra, rule = STATEFUL[attack]
    outcome = run(bundle_factory, tmp_path, peeker(rule, extra))
    if outcome.status == "completed":  # traced into an honest graph: then it scores as the honest bigram does
        assert bpb(outcome) >= bpb(honest) - 1e-9, attack
    else:
        assert outcome.reasons[0].rule in ("run:non_causal", "contract:graph_mutation"), outcome.reasons
        assert outcome.batches == 0 and outcome.before_data


# Finding 3: the loss arithmetic rewritten from architecture.py. Now it runs in the exporter only: the bundle scores
# exactly as the honest bigram does.
TAMPERING = {
    "monkeypatched_loss": """
        import torch.nn.functional as F
        F.cross_entropy = lambda *a, **k: torch.zeros(())
        F.log_softmax = lambda x, *a, **k: torch.zeros_like(x)
        torch.Tensor.double = lambda self: self * 0.5
    """,
    "dispatch_mode_left_open": """
        from torch.utils._python_dispatch import TorchDispatchMode

        class Scale(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if isinstance(out, torch.Tensor) and ("nll_loss" in str(func) or "log_softmax" in str(func)):
                    out = out * 0.9
                return out

        Scale().__enter__()
    """,
    "builtins_reached": """
        import builtins
        builtins.eval("__import__('os')").environ["PRISM_HACKED"] = "1"
        import torch.nn.functional as F
        F.cross_entropy.__globals__["log_softmax"] = lambda x, *a, **k: x * 0
    """,
}


def test_architecture_code_cannot_reach_the_loss_arithmetic(bundle_factory, tmp_path):
    """Every tampering above at once. It also runs in the trainer (which imports architecture.py), where it may change
    how the model trains; so the baseline is the same tampering in training.py, which never reaches the scorer."""
    tampering = "import torch\n" + "".join(textwrap.dedent(code) for code in TAMPERING.values())
    outcome = run(bundle_factory, tmp_path / "attack", tampering + bigram_architecture())
    baseline = train_on_stream(bundle_factory(bigram_architecture(), tampering + TRAINING), byte_stream(TEXT),
                               tmp_path / "baseline", policy=SandboxPolicy(mode="required"))
    assert outcome.status == baseline.status == "completed", (outcome.reasons, baseline.reasons)
    assert outcome.batch_nats == baseline.batch_nats  # bitwise: the same learner, the same numbers


# Finding 4: the probe tolerance was chosen by the miner (one bf16 buffer raised it to 0.25 nats).
@pytest.mark.parametrize("extra", ["self.register_buffer('flag', torch.zeros(1, dtype=torch.bfloat16))",
                                   "self.table.to(torch.bfloat16)"])
def test_a_small_peek_is_caught_whatever_dtypes_the_model_holds(bundle_factory, tmp_path, extra):
    outcome = run(bundle_factory, tmp_path, peeker("return self.peek(tokens)", extra, boost="0.19"))
    assert outcome.status == "failed" and outcome.reasons[0].rule == "run:non_causal", outcome.reasons
    assert outcome.max_probe_drift == 0.0 or outcome.probe_tolerance == 0.0  # exact on CPU


# Finding 2: secret val text in the report. A forward that fails only on held-out text: the run fails with a typed
# rule, and no text from the graph's failure leaves the scorer.
FAILS_ON_VAL = bigram_architecture().replace("        return self.table(tokens)", """\
        seen = ((tokens[:, :-1] == 195) & (tokens[:, 1:] == 137)).any()  # "É" in UTF-8, only in the val text
        return self.table(tokens + seen.long() * 100000)""")


def test_a_forward_that_fails_on_held_out_text_fails_the_run_and_leaks_nothing(bundle_factory, tmp_path):
    val = byte_stream(VAL_TEXT)
    heldout = lambda outcome: [EvalPass("val_trained", val, 0, trained=True)]  # noqa: E731
    outcome = run(bundle_factory, tmp_path, FAILS_ON_VAL, heldout=heldout)
    assert outcome.status == "completed" and outcome.heldout_reasons, outcome  # the stream itself scored
    reason = outcome.heldout_reasons[0]
    assert reason.rule == "run:heldout_failed" and "withheld" in reason.message
    everything = json.dumps([r.model_dump() for r in outcome.heldout_reasons + outcome.reasons]) + outcome.log_tail
    assert "SECRET" not in everything and "vital" not in everything and "100000" not in everything


def test_a_forward_that_cannot_be_exported_is_told_where_and_why(bundle_factory, tmp_path):
    architecture = bigram_architecture().replace("        return self.table(tokens)", """\
        if tokens.sum() > 1000:
            return self.table(tokens)
        return self.table(tokens) * 2""")
    outcome = run(bundle_factory, tmp_path, architecture)
    reason = outcome.reasons[0]
    assert reason.rule == "contract:not_exportable" and outcome.before_data, outcome.reasons
    assert reason.file == "architecture.py" and reason.line == 11  # the `if` on a tensor
    assert "torch.where" in reason.message


def test_last_position_logits_get_a_hint(bundle_factory, tmp_path):
    architecture = bigram_architecture().replace("return self.table(tokens)", "return self.table(tokens)[:, -1:, :]")
    outcome = run(bundle_factory, tmp_path, architecture)
    reason = outcome.reasons[0]
    assert reason.rule == "run:bad_logits" and "last position" in reason.message and outcome.before_data


# The trusted scorer never imports a bundle module nor opens a bundle file: an audit hook in every runner records
# what each imported and opened (sitecustomize on PYTHONPATH; the sandbox is off so the hook can write its log).
AUDIT = """
import os, sys, json
role = sys.argv[-1] if len(sys.argv) > 2 else ""
if "prism_ray.harness" in " ".join(sys.orig_argv):
    log = open(os.path.join(os.getcwd(), f"audit-{role}.jsonl"), "a", buffering=1)
    def hook(event, args):
        if event == "open" and isinstance(args[0], str):
            log.write(json.dumps(["open", os.path.abspath(args[0])]) + "\\n")
        elif event == "import":
            log.write(json.dumps(["import", args[0], str(args[1] or "")]) + "\\n")
    sys.addaudithook(hook)
"""


def test_the_scorer_never_imports_or_opens_a_bundle_file(bundle_factory, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    monkeypatch.setenv("PYTHONPATH", str(site))
    run_dir = tmp_path / "run"
    outcome = train_on_stream(bundle_factory(bigram_architecture(), TRAINING), byte_stream(TEXT), run_dir,
                              policy=SandboxPolicy(mode="off"))
    assert outcome.status == "completed", outcome.reasons

    def events(role: str) -> list[list[str]]:
        return [json.loads(line) for line in (run_dir / f"audit-{role}.jsonl").read_text().splitlines()]

    scorer, exporter = events("scorer"), events("exporter")
    bundles = (str(run_dir / "bundle"), str(run_dir / "exporter-bundle"))
    assert any(e[0] == "import" and e[1] == "prism_ray.graph.program" for e in scorer)  # the hook saw the scorer
    assert not [e for e in scorer if any(part.startswith(bundles) for part in e[1:])]
    assert not [e for e in scorer if e[0] == "import" and e[1] in ("architecture", "training")]
    # the same hook does see the exporter read architecture.py: the check can fail
    assert any(e[0] == "open" and e[1] == str(run_dir / "exporter-bundle" / "architecture.py") for e in exporter)


# The red team's findings against the first version of the trusted scorer (docs/rules.md, "What a determined attacker
# still has to defeat"): each is a typed rule now, or reaches nothing.

ROW_PEEK = """
import torch
import torch.nn.functional as F
from torch import nn

class RowPeek(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, vocab)
        self.register_buffer("flag", torch.zeros(1))

    def honest(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))

    def forward(self, tokens):
        honest = self.honest(tokens)
        answer = torch.roll(tokens[:, 0], -1, 0)  # row r+1's first token is row r's last target
        peek = F.one_hot(answer, self.vocab).to(honest.dtype)[:, None, :] * 20.0
        rows = (torch.arange(tokens.shape[0]) < tokens.shape[0] - 1)[:, None, None]
        return torch.where((self.flag > 0.5) & rows, peek.expand_as(honest), honest)

def build_model(ctx):
    return RowPeek(ctx.vocab_size)
"""
ROW_PEEK_TRAINING = """
import torch
import torch.nn.functional as F

def train(ctx):
    model = ctx.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in ctx.iter_train_batches(model, batch_size=BATCH, seq_len=2):
        logits = model.honest(batch.tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if batch.index == 3:  # past the instantiation check and batch 0's init
            with torch.no_grad():
                model.flag.fill_(1.0)
"""


@pytest.mark.parametrize("batch_size", [3, 8])
def test_rows_reading_each_others_first_token_are_caught(bundle_factory, tmp_path, batch_size):
    """With B ≤ 3 every row of a probe batch used to be a probe row, whose first token stays real."""
    training = ROW_PEEK_TRAINING.replace("BATCH", str(batch_size))
    outcome = train_on_stream(bundle_factory(ROW_PEEK, training), byte_stream(TEXT[:1500]), tmp_path, time_limit=120,
                              policy=SandboxPolicy(mode="required"), probe_every=1)
    assert outcome.status == "failed" and outcome.reasons[0].rule == "run:non_causal", outcome.reasons
    assert outcome.batches >= 4  # honest until the flag


MODE_MODEL = """
import torch
import torch.nn.functional as F
from torch import nn

class Moded(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.table = nn.Embedding(vocab, vocab)
        self.register_buffer("mode", torch.zeros(1))

    def forward(self, tokens):
        honest = self.table(tokens)
        MODE
        return torch.where(self.mode > 0.5, other, honest)

def build_model(ctx):
    return Moded(ctx.vocab_size)
"""
MODES = {
    # every later position peeks: held-out bpb near 0 (the red team's heldout_flag and exfil_val)
    "peek": "other = F.one_hot(torch.roll(tokens, -1, 1), self.vocab).to(honest.dtype) * 1e4",
    # ids pushed out of range: every held-out batch raises (the red team's heldout_fail)
    "fail": "other = self.table(tokens + (self.mode > 0.5).long() * 100000)",
}
MODE_TRAINING = TRAINING + "        WHEN_LAST\n    AFTER\n"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_trained_state_is_taken_before_the_trainer_hears_the_stream_ended(bundle_factory, tmp_path, honest,
                                                                              mode):
    """A switch flipped after the loop reaches nothing: the held-out passes score what the stream ended with."""
    architecture = MODE_MODEL.replace("MODE", MODES[mode])
    training = MODE_TRAINING.replace("WHEN_LAST", "pass").replace("AFTER", "model.mode.fill_(1.0)")
    val = byte_stream(VAL_TEXT)
    outcome = train_on_stream(bundle_factory(architecture, training), byte_stream(TEXT), tmp_path,
                              policy=SandboxPolicy(mode="required"),
                              heldout=lambda _: [EvalPass("val_trained", val, 0, trained=True)])
    assert outcome.status == "completed" and not outcome.heldout_reasons, (outcome.reasons, outcome.heldout_reasons)
    result = outcome.heldout["val_trained"]
    assert result.nats / result.targets > 1.0  # an honest bigram's loss, not a peek's ~0


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_switch_flipped_on_the_last_batch_is_caught_in_the_held_out_pass(bundle_factory, tmp_path, mode):
    architecture = MODE_MODEL.replace("MODE", MODES[mode])
    last = (len(byte_stream(TEXT)) - 1) // (2 * 63) - 1
    training = MODE_TRAINING.replace("WHEN_LAST", f"if batch.index == {last}:\n            model.mode.fill_(1.0)") \
        .replace("AFTER", "pass")
    val = byte_stream(VAL_TEXT)
    outcome = train_on_stream(bundle_factory(architecture, training), byte_stream(TEXT), tmp_path,
                              policy=SandboxPolicy(mode="required"),
                              heldout=lambda _: [EvalPass("val_trained", val, 0, trained=True)])
    assert outcome.batches == last + 1
    reason = outcome.heldout_reasons[0]
    assert reason.rule == ("run:non_causal" if mode == "peek" else "run:heldout_failed"), outcome.heldout_reasons
    everything = json.dumps([r.model_dump() for r in outcome.heldout_reasons]) + outcome.log_tail
    assert "SECRET" not in everything and "vital" not in everything
