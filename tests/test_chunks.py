"""Chunks of the scored stream (docs/scoring.md, "Chunks"): the same byte ranges whatever the batch geometry."""

from __future__ import annotations

import math

import pytest

from prism_ray.config import Settings
from prism_ray.evaluation.chunks import chunk_curve
from prism_ray.evaluation.report import HeldoutResult, TrainResult, assemble
from prism_ray.harness.records import TrainOutcome


def test_batches_are_spread_over_their_bytes_and_split_at_chunk_edges():
    curve = chunk_curve([10.0, 30.0], [40, 60], byte_budget=100, chunks=4)
    assert curve.bytes == [25, 25, 25, 25]
    assert curve.nats == pytest.approx([6.25, 3.75 + 5.0, 12.5, 12.5])


def test_two_geometries_of_the_same_per_byte_loss_give_the_same_chunks():
    per_byte = [0.9 - 0.0005 * index for index in range(1000)]  # a learning curve, one loss per byte

    def batches(size: int) -> tuple[list[float], list[int]]:
        sizes = [min(size, 1000 - start) for start in range(0, 1000, size)]
        return [math.fsum(per_byte[start:start + n]) for start, n in zip(range(0, 1000, size), sizes, strict=True)], sizes

    small, large = chunk_curve(*batches(10), 1000, 10), chunk_curve(*batches(100), 1000, 10)
    assert small.nats == pytest.approx(large.nats)
    assert math.fsum(small.nats) == pytest.approx(math.fsum(per_byte))


def test_bytes_past_the_budget_are_left_out_and_a_short_run_has_no_chunks():
    curve = chunk_curve([10.0, 10.0], [80, 80], byte_budget=100, chunks=2)
    assert curve.span == 100 and curve.nats == pytest.approx([6.25, 6.25])
    assert chunk_curve([10.0], [50], byte_budget=100, chunks=2) is None
    assert chunk_curve([10.0], [50], byte_budget=0, chunks=2).span == 50


def test_the_report_carries_the_chunks_of_a_scored_run(tmp_path):
    settings = Settings()
    sizes = [4000] * 50
    outcome = TrainOutcome(status="completed", batch_size=4, seq_len=256, batch_nats=[3000.0 - 10 * k for k in
                           range(50)], batch_targets=[1024] * 50, batch_bytes=sizes, planned_batches=50,
                           stream_seconds=1.0)
    result = TrainResult(outcome=outcome, data=None, heldout=HeldoutResult(status="not_run"), tokenizer="gpt2",
                         vocab_size=50257, seed=1337, byte_budget=200_000, run_dir=str(tmp_path))
    report = assemble(result, "sha", "x", settings, {}, None)
    assert report.status == "completed" and report.chunks is not None
    assert report.chunks.span == 200_000 and len(report.chunks.nats) == settings.scoring.ranking.chunks
    assert math.fsum(report.chunks.nats) == pytest.approx(math.fsum(outcome.batch_nats))
    assert math.fsum(report.chunks.bytes) * report.bpb == pytest.approx(
        math.fsum(nats / math.log(2) for nats in report.chunks.nats))
