"""The scoring contract (docs/scoring.md) pinned through real runner processes on synthetic byte streams."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import BYTE_LENGTHS, byte_stream, train_on_stream
from prism_ray.evaluation import scoring
from prism_ray.harness.stream import StreamPlan

pytestmark = pytest.mark.sandbox

TEXT = ("Prequential coding: predict, then learn. Ünïcödé — ✓ 日本語 🙂 text keeps multi-byte characters "
        "in the stream so bytes and tokens differ. ") * 40

FIXED_ARCH = """
import torch
from torch import nn

class Fixed(nn.Module):
    '''Predicts the same distribution p(i) ∝ i + 1 at every position.'''
    def __init__(self, vocab):
        super().__init__()
        self.log_p = nn.Parameter(torch.log(torch.arange(1, vocab + 1, dtype=torch.float64)
                                            / (vocab * (vocab + 1) / 2)))
    def forward(self, tokens):
        return self.log_p.expand(tokens.shape[0], tokens.shape[1], -1)

def build_model(ctx):
    return Fixed(ctx.vocab_size)
"""

NO_TRAINING = """
def train(ctx):
    model = ctx.build_model()
    for batch in ctx.iter_train_batches(model, batch_size=3, seq_len=17):
        pass
"""

COUNTING_ARCH = """
import torch
from torch import nn

class Counts(nn.Module):
    '''p(t) = (count[t] + 1) / (total + V), counts of every target it has been trained on.'''
    def __init__(self, vocab):
        super().__init__()
        self.register_buffer("counts", torch.zeros(vocab, dtype=torch.float64))
        self.anchor = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    def forward(self, tokens):
        log_p = torch.log((self.counts + 1) / (self.counts.sum() + self.counts.numel())) + self.anchor
        return log_p.expand(tokens.shape[0], tokens.shape[1], -1)

def build_model(ctx):
    return Counts(ctx.vocab_size)
"""

COUNTING_TRAIN = """
import torch

def train(ctx):
    model = ctx.build_model()
    for batch in ctx.iter_train_batches(model, batch_size=BATCH, seq_len=LENGTH):
        model.counts += torch.bincount(batch.tokens[:, 1:].reshape(-1), minlength=ctx.vocab_size).double()
"""


def test_fixed_distribution_bpb_matches_hand_computation(bundle_factory, tmp_path):
    tokens = byte_stream(TEXT)
    outcome = train_on_stream(bundle_factory(FIXED_ARCH, NO_TRAINING), tokens, tmp_path / "run")
    assert outcome.status == "completed", outcome.reasons
    span = 3 * 16
    batches = (len(tokens) - 1) // span
    targets = tokens[1: 1 + batches * span].astype(np.int64)
    log_p = np.log(np.arange(1, 258, dtype=np.float64) / (257 * 258 / 2))
    expected_nats = -log_p[targets].sum()
    expected_bytes = int((targets != 256).sum())
    expected_bpb = expected_nats / math.log(2) / expected_bytes
    bpb = scoring.bits_per_byte(sum(outcome.batch_nats), sum(outcome.batch_bytes))
    assert outcome.batches == batches
    assert sum(outcome.batch_bytes) == expected_bytes
    assert bpb == pytest.approx(expected_bpb, rel=1e-6)
    assert outcome.stopped_reason == "stream_exhausted"


@pytest.mark.parametrize("batch_size,seq_len", [(1, 2), (4, 9), (2, 64)])
def test_prequential_order_every_target_once(bundle_factory, tmp_path, batch_size, seq_len):
    """A counting learner scores exactly the replayed predict-then-train value: each batch is scored
    before the model has seen it, every target once, in stream order."""
    tokens = byte_stream(TEXT[:1500])
    training = COUNTING_TRAIN.replace("BATCH", str(batch_size)).replace("LENGTH", str(seq_len))
    outcome = train_on_stream(bundle_factory(COUNTING_ARCH, training), tokens, tmp_path / "run")
    assert outcome.status == "completed", outcome.reasons
    counts = np.zeros(257)
    expected = []
    span = batch_size * (seq_len - 1)
    for k in range((len(tokens) - 1) // span):
        targets = tokens[k * span + 1: (k + 1) * span + 1].astype(np.int64)
        log_p = np.log((counts + 1) / (counts.sum() + 257))
        expected.append(-log_p[targets].sum())
        counts += np.bincount(targets, minlength=257)
    assert outcome.batches == len(expected)
    assert np.allclose(outcome.batch_nats, expected, rtol=1e-9)
    assert sum(outcome.batch_targets) == len(expected) * span


@pytest.mark.parametrize("batch_size,seq_len", [(1, 2), (3, 5), (8, 128), (2, 1024)])
def test_stream_plan_scores_each_token_once(batch_size, seq_len):
    tokens = byte_stream(TEXT * 3)
    plan = StreamPlan(tokens, BYTE_LENGTHS, batch_size, seq_len, byte_budget=0)
    pieces = list(plan.batches())
    targets = np.concatenate([piece.chunk[1:] for piece in pieces])
    assert np.array_equal(targets, tokens[1: 1 + len(pieces) * batch_size * (seq_len - 1)])
    assert len(tokens) - 1 - len(targets) < batch_size * (seq_len - 1)  # only an incomplete batch is left out
    rows = [piece.chunk[r * (seq_len - 1): r * (seq_len - 1) + seq_len] for piece in pieces for r in range(batch_size)]
    assert all(len(row) == seq_len for row in rows)
    assert all(rows[g][-1] == rows[g + 1][0] for g in range(len(rows) - 1))  # rows overlap by one token
    assert sum(piece.target_bytes for piece in pieces) == int(BYTE_LENGTHS[targets].sum())


def test_byte_budget_stops_after_first_batch_reaching_it():
    tokens = byte_stream(TEXT)
    plan = StreamPlan(tokens, BYTE_LENGTHS, 2, 33, byte_budget=500)
    pieces = list(plan.batches())
    cumulative = np.cumsum([piece.target_bytes for piece in pieces])
    assert cumulative[-1] >= 500 > cumulative[-2]


def test_curve_is_thinned_and_ends_at_the_total():
    nats = [float(i % 7 + 1) for i in range(2000)]
    sizes = [10] * 2000
    curve = scoring.learning_curve(nats, sizes, 500)
    assert len(curve) <= 500
    assert curve[-1]["bytes"] == 20000
    assert curve[-1]["bpb"] == pytest.approx(scoring.bits_per_byte(sum(nats), 20000))
