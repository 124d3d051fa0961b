"""Copies at intake on a real DuckDB file: renamed, reformatted and re-commented copies of another hotkey's code are
flagged copy:duplicate and earn no weight; a numbers-only change is a near-copy; a genuinely different bundle and a
hotkey's own resubmission are neither."""

from __future__ import annotations

import pytest

from conftest import scored_report
from miners import BIGRAM_ARCHITECTURE, SGD_TRAINING, bundle_of
from prism_ray.config import AuditSettings, ScoringSettings
from prism_ray.intake.fingerprint import code_fingerprints
from prism_ray.ranking.leaderboard import leaderboard, weights
from prism_ray.store import NewSubmission, Store

RENAMED = {
    "architecture.py": """\
import torch
from torch import nn


class NextByte(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.lookup = nn.Embedding(size, size)

    def forward(self, ids):
        return self.lookup(ids)


def build_model(context):
    return NextByte(context.vocab_size)
""",
    "training.py": """\
import torch


def train(context):
    net = context.build_model()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for step in context.iter_train_batches(net, batch_size=4, seq_len=64, with_logits=True):
        step.loss.backward()
        opt.step()
        opt.zero_grad()
""",
}

REFORMATTED = {
    "architecture.py": """\
import torch
from torch import nn
class Bigram( nn.Module ):
    def __init__(self, vocab: int) -> None:
        super().__init__(); self.table = nn.Embedding(
            vocab,
            vocab,
        )
    def forward(self, tokens: "torch.Tensor"):
        return (self.table(tokens))
def build_model(ctx):
    return Bigram(ctx.vocab_size)
""",
    "training.py": """\
import torch
def train(ctx) -> None:
    model = ctx.build_model(); optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for batch in ctx.iter_train_batches(model, batch_size=4, seq_len=64,
                                        with_logits=True):
        batch.loss.backward(); optimizer.step(); optimizer.zero_grad()
""",
}

RECOMMENTED = {
    "architecture.py": '"""My own bigram model (honest!)."""\n' + BIGRAM_ARCHITECTURE.replace(
        "    def forward", "    # the whole model is one lookup\n    def forward").replace(
        "def build_model(ctx):\n", 'def build_model(ctx):\n    """Entry point."""\n    ...\n'),
    "training.py": SGD_TRAINING.replace("def train(ctx):\n", 'def train(ctx):\n    """Plain SGD."""  # tuned by hand\n'),
}

# The same code split differently across renamed files, entered through renamed symbols.
RENAMED_FILES = {
    "layers.py": BIGRAM_ARCHITECTURE.replace("def build_model(ctx):\n    return Bigram(ctx.vocab_size)\n", ""),
    "model.py": "from layers import Bigram\n\n\ndef make(ctx):\n    return Bigram(ctx.vocab_size)\n",
    "loop.py": SGD_TRAINING.replace("def train", "def fit"),
    "prism.yaml": "architecture: model.py::make\ntraining: loop.py::fit\ntokenizer: bytes\n",
}
SPLIT = {
    "blocks.py": RENAMED_FILES["layers.py"],
    "architecture.py": RENAMED_FILES["model.py"].replace("from layers", "from blocks"),
    "training.py": SGD_TRAINING.replace("def train", "def fit"),
    "prism.yaml": "architecture: architecture.py::make\ntraining: training.py::fit\ntokenizer: bytes\n",
}


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "prism.duckdb", audit=AuditSettings(mode="off")) as opened:  # weights at once (test_audits)
        yield opened


@pytest.mark.parametrize("variant", [RENAMED, REFORMATTED, RECOMMENTED], ids=["renamed", "reformatted", "recommented"])
def test_renamed_reformatted_and_recommented_copies_are_flagged(store, variant):
    original = store.create_submission("alice", "a.zip", bundle_of())
    copy = store.create_submission("bob", "b.zip", bundle_of(variant))
    assert copy.fingerprint != original.fingerprint  # not the exact-duplicate rule: the bytes differ
    assert (copy.status, copy.copy_of, copy.near_copy_of) == ("pending", original.id, None)  # still evaluated
    [note] = copy.notes
    assert note.rule == "copy:duplicate" and original.id in note.message
    assert store.events(copy.id)[0].detail["copy_of"] == original.id
    assert (original.copy_of, original.notes) == (None, [])


def test_copies_split_over_renamed_files_are_flagged(store):
    original = store.create_submission("alice", "a.zip", bundle_of(RENAMED_FILES))
    assert store.create_submission("bob", "b.zip", bundle_of(SPLIT)).copy_of == original.id
    assert code_fingerprints(bundle_of(SPLIT)) == code_fingerprints(bundle_of(RENAMED_FILES))


@pytest.mark.parametrize("change", [("architecture.py", "return self.table(tokens)", "return self.table(tokens).relu()"),
                                    ("training.py", "SGD", "Adam"),
                                    ("training.py", "batch.loss.backward()", "(2 * batch.loss).backward()")])
def test_a_genuinely_different_bundle_is_not_a_copy(store, change):
    path, old, new = change
    files = {"architecture.py": BIGRAM_ARCHITECTURE, "training.py": SGD_TRAINING}
    files[path] = files[path].replace(old, new)
    store.create_submission("alice", "a.zip", bundle_of())
    different = store.create_submission("bob", "b.zip", bundle_of(files))
    assert (different.copy_of, different.near_copy_of, different.notes) == (None, None, [])


NORMED = BIGRAM_ARCHITECTURE.replace("nn.Embedding(vocab, vocab)", "nn.Embedding(vocab, vocab, max_norm=2.0)")
NORMED_PAIR = ({"architecture.py": NORMED, "training.py": SGD_TRAINING},
               {"architecture.py": NORMED.replace("2.0", "1.0"), "training.py": SGD_TRAINING})


@pytest.mark.parametrize(("first", "later"), [
    ({"architecture.py": BIGRAM_ARCHITECTURE, "training.py": SGD_TRAINING},
     {"architecture.py": BIGRAM_ARCHITECTURE, "training.py": SGD_TRAINING.replace("lr=0.5", "lr=0.1")}),
    ({"architecture.py": NORMED, "training.py": SGD_TRAINING},
     {"architecture.py": NORMED.replace("2.0", "1.0"), "training.py": SGD_TRAINING.replace("seq_len=64", "seq_len=128")}),
], ids=["learning-rate", "architecture-and-training-numbers"])
def test_a_numbers_only_change_is_a_near_copy_not_a_copy(store, first, later):
    original = store.create_submission("alice", "a.zip", bundle_of(first))
    near = store.create_submission("bob", "b.zip", bundle_of(later))
    assert (near.status, near.copy_of, near.near_copy_of) == ("pending", None, original.id)
    assert [note.rule for note in near.notes] == ["copy:near"] and original.id in near.notes[0].message
    assert near.architecture_family == original.architecture_family


def test_a_hotkey_resubmitting_its_own_code_is_not_a_copy_but_later_copiers_are(store):
    first = store.create_submission("alice", "a.zip", bundle_of())
    again = store.create_submission("alice", "a2.zip", bundle_of(REFORMATTED))  # a new row: the bytes differ
    assert (again.reused, again.copy_of, again.near_copy_of) == (False, None, None)
    tuned = store.create_submission("alice", "a3.zip", bundle_of(
        {"architecture.py": BIGRAM_ARCHITECTURE, "training.py": SGD_TRAINING.replace("lr=0.5", "lr=0.2")}))
    assert (tuned.copy_of, tuned.near_copy_of) == (None, None)  # tuning one's own numbers is no near-copy
    assert store.create_submission("bob", "b.zip", bundle_of(RENAMED)).copy_of == first.id
    assert store.create_submission("carol", "c.zip", bundle_of(RECOMMENTED)).copy_of == first.id
    exact = store.create_submission("dave", "d.zip", bundle_of(REFORMATTED))  # the same bytes: the old rule
    assert (exact.status, exact.duplicate_of, exact.copy_of) == ("duplicate", again.id, None)


def test_one_batch_of_intakes_decides_as_the_same_intakes_one_by_one(store, tmp_path):
    """Group commit writes a burst of posts in one call: every rule (own resubmission, exact duplicate, copy,
    near-copy) must see the earlier items of the same call as it sees stored rows."""
    store.create_submission("erin", "e.zip", bundle_of(NORMED_PAIR[0]))  # already stored before the burst
    burst = [("alice", bundle_of()), ("bob", bundle_of(RENAMED)), ("alice", bundle_of()),
             ("dave", bundle_of()), ("carol", bundle_of(NORMED_PAIR[1])), ("carol", bundle_of(RECOMMENTED)),
             ("frank", bundle_of(NORMED_PAIR[1]))]
    batched = store.create_submissions([NewSubmission(hotkey, f"{i}.zip", bundle) for i, (hotkey, bundle)
                                        in enumerate(burst)])
    with Store(tmp_path / "one-by-one.duckdb", audit=AuditSettings(mode="off")) as alone:
        alone.create_submission("erin", "e.zip", bundle_of(NORMED_PAIR[0]))
        single = [alone.create_submission(hotkey, f"{i}.zip", bundle) for i, (hotkey, bundle) in enumerate(burst)]
        stored_alone = {alone.list_submissions(hotkey="erin")[0].id: "stored"}

    def decisions(records, known):
        position = dict(known)
        for i, record in enumerate(records):
            position.setdefault(record.id, i)
        return [(record.status, record.reused, position.get(record.duplicate_of), position.get(record.copy_of),
                 position.get(record.near_copy_of), [note.rule for note in record.notes]) for record in records]

    first = {store.list_submissions(hotkey="erin")[0].id: "stored"}
    assert decisions(batched, first) == decisions(single, stored_alone)
    assert [decision[:5] for decision in decisions(batched, first)] == [
        ("pending", False, None, None, None), ("pending", False, None, 0, None), ("pending", True, None, None, None),
        ("duplicate", False, 0, None, None), ("pending", False, None, None, "stored"), ("pending", False, None, 0, None),
        ("duplicate", False, 4, None, None)]
    assert [record.seq for record in batched if not record.reused] == sorted(
        record.seq for record in batched if not record.reused)  # stored in arrival order


def test_a_copy_is_ranked_but_earns_no_weight_and_the_original_keeps_it(store):
    original = store.create_submission("alice", "a.zip", bundle_of())
    copy = store.create_submission("bob", "b.zip", bundle_of(RENAMED))
    other = store.create_submission("carol", "c.zip", bundle_of(
        {"architecture.py": BIGRAM_ARCHITECTURE, "training.py": SGD_TRAINING.replace("SGD", "Adam")}))
    store.claim_next("sched", 60, limit=3)
    for record, score in ((original, 0.40), (copy, 0.45), (other, 0.20)):  # the copy happened to score best
        assert store.complete(record.id, "sched", scored_report(1 / score - 1, score))
    rows = store.scored_rows()
    assert [(entry.hotkey, entry.copy_of) for entry in leaderboard(rows)] == [("bob", original.id), ("alice", None),
                                                                               ("carol", None)]
    assert weights(rows) == pytest.approx({"alice": 0.40 / 0.60, "carol": 0.20 / 0.60})
    two_tier = weights(rows, ScoringSettings(weights_mode="two_tier"))
    assert two_tier == pytest.approx({"alice": 1.0})  # owner and best variant of the family, the copier nothing
    assert {row.architecture_family for row in rows} == {original.architecture_family}
