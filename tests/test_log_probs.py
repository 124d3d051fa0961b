"""The scorer's log-probs: block by block, bit for bit what F.cross_entropy gives on the whole batch."""

import pytest
import torch
import torch.nn.functional as F

from prism_ray.harness import scorer
from prism_ray.harness.scorer import target_log_probs


def whole(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One cross-entropy over every position of the batch, as a plain loop scores it."""
    batch, length, vocab = logits.shape
    wide = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, vocab)
    return -F.cross_entropy(wide, targets.reshape(-1), reduction="none").view(batch, length - 1)


@pytest.mark.parametrize(("batch", "length", "vocab", "dtype"), [
    (8, 128, 50257, torch.float32),  # many blocks, each a few rows
    (4, 64, 257, torch.float32),  # one block
    (3, 7, 300, torch.float16),
    (2, 5, 1000, torch.bfloat16),
    (2, 9, 513, torch.float64),
    (1, 2, 50257, torch.float32),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_blocks_equal_one_cross_entropy_bit_for_bit(batch, length, vocab, dtype, threads):
    generator = torch.Generator().manual_seed(batch * length + vocab)
    logits = (torch.randn(batch, length, vocab, generator=generator) * 4).to(dtype)
    targets = torch.randint(0, vocab, (batch, length - 1), generator=generator)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, expected = target_log_probs(logits, targets), whole(logits, targets)
    finally:
        torch.set_num_threads(before)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(got, expected)


def test_a_block_boundary_inside_a_batch_row_changes_nothing(monkeypatch):
    """Blocks cut batch rows anywhere (here every 3 positions, across rows): each position still sees only its own
    logits, and a row's last position, which has no target, never shows."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 10, 64, generator=generator).transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
    logits[1, 9] = float("nan")  # a last position: dropped, so it cannot reach any target
    targets = torch.randint(0, 64, (3, 9), generator=generator)
    monkeypatch.setattr(scorer, "_BLOCK_BYTES_CPU", 3 * 64 * 4)
    got = target_log_probs(logits, targets)
    assert torch.isfinite(got).all()
    assert torch.equal(got, whole(logits, targets))
