"""Held-out delta, memorisation gap and step-0 anomaly, end to end through `evaluate` on the embedded data."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from conftest import write_bundle
from miners import bigram_architecture, learner_loop
from prism_ray.config import EMBEDDED_DATA_DIR, Settings
from prism_ray.data.dataset import open_dataset
from prism_ray.data.preparation import SplitRule, prepare
from prism_ray.data.token_cache import load_token_stream
from prism_ray.evaluation.pipeline import evaluate

pytestmark = pytest.mark.sandbox

NO_OP = """
def train(ctx):
    model = ctx.build_model()
    for batch in ctx.iter_train_batches(model, batch_size=4, seq_len=128):
        pass
"""

HASHED = """
import torch
from torch import nn

class Hashed(nn.Module):
    '''A 4-gram lookup table: big enough to memorise what it is shown.'''
    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Embedding(1 << 12, vocab)
        nn.init.zeros_(self.table.weight)
    def forward(self, tokens):
        padded = torch.nn.functional.pad(tokens, (3, 0))
        key = (padded[:, 3:] * 1000003 + padded[:, 2:-1] * 10007 + padded[:, 1:-2] * 101 + padded[:, :-3]) % (1 << 12)
        return self.table(key)

def build_model(ctx):
    return Hashed(ctx.vocab_size)
"""

MEMORISER = """
import torch

def train(ctx):
    model = ctx.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    seen = []
    for batch in ctx.iter_train_batches(model, batch_size=4, seq_len=128, with_logits=True):
        seen.append(batch.tokens)
        batch.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for _ in range(8):  # replay: memorise the bytes already scored
        for tokens in seen:
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     tokens[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
"""


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    settings = Settings(byte_budget=20_000, cache_dir=tmp_path_factory.mktemp("cache"))
    settings.gate.mode = "off"
    return settings


def evaluate_bundle(tmp_path, settings, architecture, training):
    bundle = write_bundle(tmp_path / "bundle", architecture, training, "tokenizer: bytes\n")
    report = evaluate(bundle, settings)
    assert report.status == "completed", report.reasons
    assert report.heldout.status == "completed", report.heldout
    return report


def test_learner_beats_its_twin_and_is_not_penalised(tmp_path, settings):
    report = evaluate_bundle(tmp_path, settings, bigram_architecture(), learner_loop())
    held = report.heldout
    assert held.heldout_delta > 0.05
    assert held.twin_step0_loss == report.step0_loss  # the true step-0 twin
    assert held.gap < settings.scoring.gap_threshold
    assert report.score.penalty == 1.0 and report.score.anomaly == 1
    assert report.score.tie_break > 0 and report.final_score > report.score.base


def test_no_op_loop_has_zero_delta_and_zero_init_head_is_ordinary(tmp_path, settings):
    report = evaluate_bundle(tmp_path, settings, bigram_architecture("nn.init.zeros_(self.table.weight)"), NO_OP)
    assert abs(report.heldout.heldout_delta) < 1e-9
    assert report.step0_loss == pytest.approx(math.log(257))
    assert report.score.anomaly == 1 and "step0_anomaly" not in report.score.flags


def test_memoriser_is_penalised(tmp_path, settings):
    report = evaluate_bundle(tmp_path, settings, HASHED, MEMORISER)
    assert report.heldout.gap > settings.scoring.gap_threshold
    assert report.score.penalty < 1.0 and "memorisation_gap" in report.score.flags


def test_initialisation_from_data_statistics_is_zeroed(tmp_path, settings):
    stream = load_token_stream(open_dataset(EMBEDDED_DATA_DIR), "train", "bytes", settings.cache_dir)
    counts = np.bincount(np.asarray(stream.tokens[:200_000]), minlength=257) + 1
    log_freq = [round(float(x), 4) for x in np.log(counts / counts.sum())]
    init = f"self.table.weight.data[:] = torch.tensor({log_freq})"
    report = evaluate_bundle(tmp_path, settings, bigram_architecture(init), NO_OP)
    assert report.step0_loss < 0.9 * math.log(257)
    assert report.final_score == 0.0 and "step0_anomaly" in report.score.flags


def test_a_val_split_too_small_for_one_batch_is_scored_on_bpb_alone(tmp_path, settings):
    """A val split shorter than one batch of the run's geometry cannot score the twin: the run keeps its bpb."""
    def split_of(doc_id: str) -> str:  # SplitRule(500, 500, 0): the bucket of sha256(id) decides
        return "train" if int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 1000 < 500 else "val"

    pages = [text for text in open_dataset(EMBEDDED_DATA_DIR).iter_documents("train")][:40]
    train_ids = [doc_id for doc_id in (f"page-{n}" for n in range(200)) if split_of(doc_id) == "train"]
    val_id = next(doc_id for doc_id in (f"short-{n}" for n in range(100)) if split_of(doc_id) == "val")
    records = [{"id": doc_id, "text": text} for doc_id, text in zip(train_ids, pages, strict=False)]
    records.append({"id": val_id, "text": "A val page of a few dozen bytes."})
    source = tmp_path / "pages.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    prepare([source], tmp_path / "locked", SplitRule(500, 500, 0))

    small_val = settings.model_copy(update={"data_dir": tmp_path / "locked"})
    bundle = write_bundle(tmp_path / "bundle", bigram_architecture(), learner_loop(), "tokenizer: bytes\n")
    report = evaluate(bundle, small_val)
    assert report.status == "completed", report.reasons
    assert report.heldout.status == "val_too_small" and "fewer than one 4×128 batch" in report.heldout.message
    assert report.final_score == pytest.approx(1 / (1 + report.bpb)) and "no_heldout" in report.score.flags


def test_a_prior_written_in_after_the_first_batch_is_zeroed(tmp_path, settings):
    """Uniform on batch 0, then a bigram prior counted from text smuggled in training.py (here: a few kB of the
    test split, which the run never sees): the anomaly check covers the first batches, not only the first."""
    text = next(iter(open_dataset(EMBEDDED_DATA_DIR).iter_documents("test")))[:6000]
    smuggle = f"""
import torch

PRIOR_TEXT = {text!r}

def train(ctx):
    model = ctx.build_model()
    raw = torch.tensor(list(PRIOR_TEXT.encode()))
    counts = torch.full((ctx.vocab_size, ctx.vocab_size), 0.05)
    counts.index_put_((raw[:-1], raw[1:]), torch.ones(len(raw) - 1), accumulate=True)
    for step, batch in enumerate(ctx.iter_train_batches(model, batch_size=4, seq_len=128)):
        if step == 0:
            with torch.no_grad():
                model.table.weight.copy_(counts.log() - counts.sum(1, keepdim=True).log())
"""
    report = evaluate_bundle(tmp_path, settings, bigram_architecture("nn.init.zeros_(self.table.weight)"), smuggle)
    assert report.step0_loss == pytest.approx(math.log(257))  # batch 0 looked untrained
    assert report.final_score == 0.0 and "step0_anomaly" in report.score.flags
