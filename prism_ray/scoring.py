"""Scores from the parent's per-batch books (DESIGN §4): prequential bpb, the curve, final_score."""

from __future__ import annotations

import math


def bits_per_byte(nats: float, target_bytes: int) -> float:
    """Σ nats / ln 2 / Σ bytes(targets); NaN when nothing was scored."""
    return nats / math.log(2) / target_bytes if target_bytes > 0 else float("nan")


def learning_curve(batch_nats: list[float], batch_bytes: list[int], max_points: int) -> list[dict[str, float]]:
    """Cumulative target bytes vs. running bpb, thinned to at most max_points (the last batch always kept)."""
    points: list[dict[str, float]] = []
    nats = 0.0
    total = 0
    count = len(batch_nats)
    keep = {round(i * (count - 1) / (max_points - 1)) for i in range(max_points)} if count > max_points else None
    for index, (batch_nat, batch_byte) in enumerate(zip(batch_nats, batch_bytes, strict=True)):
        nats += batch_nat
        total += batch_byte
        if keep is None or index in keep:
            points.append({"bytes": total, "bpb": bits_per_byte(nats, total)})
    return points


def final_score(bpb: float) -> float:
    """Higher is better; a run without a finite bpb has no score."""
    return 1.0 / (1.0 + bpb) if math.isfinite(bpb) and bpb >= 0 else 0.0
