"""Copies by behaviour on a real DuckDB file (docs/scoring.md, "Copies"): a completed run whose first per-batch
losses agree with an earlier run of another hotkey under the same conditions is copy:duplicate, whatever its code;
the earliest submission keeps the weight, in whatever order the runs complete. One test runs two real bundles that
differ only in no-op edits through `evaluate`."""

from __future__ import annotations

import itertools
import struct

import pytest

from conftest import scored_report, write_bundle
from miners import BIGRAM_ARCHITECTURE, SGD_TRAINING, bundle_of
from prism_ray.config import AuditSettings, Settings
from prism_ray.evaluation.pipeline import evaluate
from prism_ray.intake.bundle import load_bundle
from prism_ray.ranking.leaderboard import leaderboard, weights
from prism_ray.store import Store

HEAD = [5.545177444479562 * 252, 1380.2549, 1371.0001, 1362.25, 1350.5, 1342.75, 1333.0, 1329.125]

# Different code for each hotkey, so no code fingerprint links them: only behaviour can.
CODES = [SGD_TRAINING, SGD_TRAINING.replace("SGD", "Adam"), SGD_TRAINING.replace("lr=0.5", "lr=0.25"),
         SGD_TRAINING.replace("optimizer.step()", "optimizer.step()\n        optimizer.step()")]


def report(head: list[float] = HEAD, device: str = "cpu", **conditions) -> dict:
    """A completed run's report as the score stage writes it (only the parts the store reads), as fields."""
    return {"head_nats": head, "device": device, "seed": 1337, "byte_budget": 20_000, "tokenizer": "bytes",
            "batch_size": 4, "seq_len": 64, "data": {"path": "data", "pinned": True, "fingerprint": "data-1"},
            **conditions}


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "prism.duckdb", audit=AuditSettings(mode="off")) as opened:
        yield opened


def submit(store: Store, hotkeys: list[str]) -> list[str]:
    ids = [store.create_submission(hotkey, f"{i}.zip", bundle_of({"architecture.py": BIGRAM_ARCHITECTURE,
                                                                     "training.py": CODES[i]})).id
           for i, hotkey in enumerate(hotkeys)]
    assert len(store.claim_next("sched", 60, limit=len(ids))) == len(ids)
    return ids


def finish(store: Store, submission_id: str, run: dict, score: float = 0.4) -> None:
    assert store.complete(submission_id, "sched", scored_report(1 / score - 1, score, **run))


def test_the_later_run_with_the_same_losses_is_a_copy_and_the_earliest_keeps_the_weight(store):
    original, copy, other = submit(store, ["alice", "bob", "carol"])
    finish(store, original, report(), 0.40)
    finish(store, copy, report(), 0.40)
    finish(store, other, report(head=[*HEAD[:-1], HEAD[-1] + 1.0]), 0.20)  # one batch differs: its own learner
    records = {key: store.get_submission(key) for key in (original, copy, other)}
    assert (records[original].copy_of, records[other].copy_of) == (None, None)
    assert records[copy].copy_of == original and records[copy].near_copy_of is None
    [note] = records[copy].notes
    assert note.rule == "copy:duplicate" and original in note.message and "first 8 per-batch losses" in note.message
    assert store.events(copy)[-1].kind == "copy" and store.events(copy)[-1].detail["copy_of"] == original
    rows = store.scored_rows()
    assert {entry.hotkey: entry.copy_of for entry in leaderboard(rows)} == {"alice": None, "bob": original,
                                                                            "carol": None}
    assert weights(rows) == pytest.approx({"alice": 0.4 / 0.6, "carol": 0.2 / 0.6})


def test_the_earliest_submission_is_the_original_in_every_order_of_completion(store, tmp_path):
    """alice's first run, bob's, and alice's own resubmission behave alike: bob's is the copy, whichever run
    completes first (a later submission's run often ends before an earlier one's on a cluster)."""
    outcomes = set()
    for order in itertools.permutations(range(3)):
        with Store(tmp_path / f"{''.join(map(str, order))}.duckdb", audit=AuditSettings(mode="off")) as fresh:
            ids = submit(fresh, ["alice", "bob", "alice"])
            for index in order:
                finish(fresh, ids[index], report())
            records = [fresh.get_submission(key) for key in ids]
            outcomes.add(tuple((record.copy_of and ids.index(record.copy_of),
                                tuple(note.rule for note in record.notes)) for record in records))
    assert outcomes == {((None, ()), (0, ("copy:duplicate",)), (None, ()))}


def test_a_copy_completed_before_its_original_is_relinked_across_a_restart(tmp_path):
    path = tmp_path / "prism.duckdb"
    with Store(path, audit=AuditSettings(mode="off")) as store:
        first_bob, alice, second_bob = submit(store, ["bob", "alice", "bob"])
        finish(store, second_bob, report())
        finish(store, alice, report())  # bob's second run looks like a copy of alice's, until bob's first completes
        assert store.get_submission(second_bob).copy_of == alice
    with Store(path, audit=AuditSettings(mode="off")) as reopened:
        finish(reopened, first_bob, report())
        records = [reopened.get_submission(key) for key in (first_bob, alice, second_bob)]
        assert [record.copy_of for record in records] == [None, first_bob, None]
        assert [[note.rule for note in record.notes] for record in records] == [[], ["copy:duplicate"], []]
        assert first_bob in records[1].notes[0].message
        assert [event.detail["copy_of"] for event in reopened.events(second_bob) if event.kind == "copy"] == [
            alice, None]


@pytest.mark.parametrize("change", [{"seed": 7}, {"batch_size": 8}, {"seq_len": 128}, {"byte_budget": 40_000},
                                    {"tokenizer": "gpt2"}, {"data": {"path": "data", "pinned": True, "fingerprint": "data-2"}},
                                    {"head": HEAD[:7]}],
                         ids=["seed", "batch-size", "seq-len", "budget", "tokenizer", "dataset", "fewer-batches"])
def test_runs_under_other_conditions_are_never_compared(store, change):
    original, later = submit(store, ["alice", "bob"])
    finish(store, original, report())
    finish(store, later, report(**change))
    assert store.get_submission(later).copy_of is None


def test_on_the_cpu_one_ulp_is_another_learner_on_cuda_the_audit_tolerance_applies(store):
    nudged = [*HEAD[:3], struct.unpack("<d", struct.pack("<q", struct.unpack("<q", struct.pack("<d", HEAD[3]))[0]
                                                                + 1))[0], *HEAD[4:]]
    close = [nats * (1 + 5e-5) for nats in HEAD]  # within cuda_rtol = 1e-4
    far = [*HEAD[:-1], HEAD[-1] * (1 + 3e-4)]
    ids = submit(store, ["alice", "bob", "carol", "dave"])
    finish(store, ids[0], report())
    finish(store, ids[1], report(head=nudged))
    finish(store, ids[2], report(head=close, device="cuda"))
    finish(store, ids[3], report(head=far, device="cuda"))
    assert [store.get_submission(key).copy_of for key in ids] == [None, None, ids[0], None]


def test_a_code_copy_keeps_its_intake_link_and_old_reports_are_left_alone(store):
    original = store.create_submission("alice", "a.zip", bundle_of()).id
    code_copy = store.create_submission("bob", "b.zip", bundle_of(
        {"architecture.py": BIGRAM_ARCHITECTURE.replace("Bigram", "Pair"), "training.py": SGD_TRAINING})).id
    older = store.create_submission("carol", "c.zip", bundle_of({"architecture.py": BIGRAM_ARCHITECTURE,
                                                                    "training.py": CODES[1]})).id
    store.claim_next("sched", 60, limit=3)
    finish(store, code_copy, report())
    finish(store, original, report())
    finish(store, older, {})  # a report without head_nats: no signature, no link
    assert [note.rule for note in store.get_submission(code_copy).notes] == ["copy:duplicate"]
    assert "up to names" in store.get_submission(code_copy).notes[0].message  # the intake note, not a second one
    assert (store.get_submission(code_copy).copy_of, store.get_submission(older).copy_of) == (original, None)


# --- end to end: two real bundles that differ only in no-op edits ---------------------------------------------------

NO_OP_ARCHITECTURE = """\
from torch import nn


class NextByte(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.lookup = self.make_table(size)

    def make_table(self, size):
        return nn.Embedding(size, size)

    def forward(self, ids):
        if ids.dim() == 3:  # never: batches are [B, L]
            ids = ids[0]
        return self.lookup(ids)


def build_model(context):
    return NextByte(context.vocab_size)
"""

NO_OP_TRAINING = """\
import torch


def step_once(opt):
    opt.step()
    opt.zero_grad(set_to_none=True)


def train(context):
    net = context.build_model()
    opt = torch.optim.SGD(net.parameters(), lr=0.5 * 1.0)
    for step in context.iter_train_batches(net, batch_size=4, seq_len=64, with_logits=True):
        (step.loss * 1.0).backward()
        step_once(opt)
"""


@pytest.mark.sandbox
def test_a_no_op_edited_copy_trains_bit_identically_and_is_stored_as_a_copy(tmp_path, store):
    settings = Settings(byte_budget=5_000, cache_dir=tmp_path / "cache")
    settings.gate.mode = "off"
    sources = {"alice": (BIGRAM_ARCHITECTURE, SGD_TRAINING), "bob": (NO_OP_ARCHITECTURE, NO_OP_TRAINING),
               "carol": (BIGRAM_ARCHITECTURE, SGD_TRAINING.replace("lr=0.5", "lr=0.25"))}  # carol: another learner
    bundles = {hotkey: load_bundle(write_bundle(tmp_path / hotkey, *code, "tokenizer: bytes\n"))
               for hotkey, code in sources.items()}
    reports = {hotkey: evaluate(bundle, settings) for hotkey, bundle in bundles.items()}
    assert {run.status for run in reports.values()} == {"completed"}, [run.reasons for run in reports.values()]
    original, copy, other = reports.values()
    assert len(original.head_nats) == settings.scoring.copy_batches and original.batches > len(original.head_nats)
    assert struct.pack(f"<{len(original.head_nats)}d", *original.head_nats) == struct.pack(
        f"<{len(copy.head_nats)}d", *copy.head_nats)
    assert (copy.bpb, copy.curve) == (original.bpb, original.curve)  # the whole run, not only its head
    assert other.head_nats[0] == original.head_nats[0] and other.head_nats != original.head_nats  # same init only

    records = {hotkey: store.create_submission(hotkey, f"{hotkey}.zip", bundle) for hotkey, bundle in bundles.items()}
    for name in ("architecture_family", "training_fingerprint", "canonical_fingerprint"):
        assert getattr(records["alice"], name) != getattr(records["bob"], name), name  # the code looks different
    assert records["bob"].copy_of is None and records["bob"].notes == []
    store.claim_next("sched", 60, limit=3)
    for hotkey, run in reports.items():
        assert store.complete(records[hotkey].id, "sched", run)
    stored = {hotkey: store.get_submission(record.id) for hotkey, record in records.items()}
    assert stored["bob"].copy_of == records["alice"].id and [note.rule for note in stored["bob"].notes] == [
        "copy:duplicate"]
    assert (stored["alice"].copy_of, stored["carol"].copy_of) == (None, None)
    # The copy earns nothing; carol, another learner, is paid unless no decided difference separates her from the
    # leader on 5 KB of text (docs/scoring.md, "The decided order").
    paid = weights(store.scored_rows())
    assert "bob" not in paid and "alice" in paid and set(paid) <= {"alice", "carol"}
