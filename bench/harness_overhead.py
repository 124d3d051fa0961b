"""Harness overhead: tokens/s of a bare PyTorch loop vs. the full `prism-ray eval` on tiny-gpt (CPU).

The bare loop uses the same model, optimizer, geometry and batches (from the same token cache file);
eval adds the torchrun runner, the sandbox, the socket stream and the scored forward. Target:
eval ÷ bare ≥ 0.95 with with_logits=True (the miner backprops through the harness's forward).

    python bench/harness_overhead.py [--byte-budget 150000]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prism_ray.config import EMBEDDED_DATA_DIR, Settings
from prism_ray.data.dataset import open_dataset
from prism_ray.data.token_cache import load_token_stream
from prism_ray.harness.context import force_seed
from prism_ray.harness.stream import StreamPlan
from prism_ray.pipeline import evaluate

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-gpt"
BATCH, LENGTH = 8, 128
OWN_LOSS = '''
import torch
import torch.nn.functional as F


def train(ctx):
    model = ctx.build_model().to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 20
    model.train()
    for step, batch in enumerate(ctx.iter_train_batches(model, batch_size=8, seq_len=128)):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / warmup)
        logits = model(batch.tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
'''


def bare_loop(settings: Settings) -> float:
    """The same work as examples/tiny-gpt, with no harness at all."""
    spec = importlib.util.spec_from_file_location("tiny_gpt_architecture", EXAMPLE / "architecture.py")
    architecture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(architecture)
    stream = load_token_stream(open_dataset(EMBEDDED_DATA_DIR), "train", "gpt2", settings.cache_dir)
    plan = StreamPlan(np.asarray(stream.tokens), stream.byte_lengths, BATCH, LENGTH, settings.byte_budget)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    force_seed(settings.seed)
    model = architecture.TinyGPT(stream.vocab_size, settings.max_seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    targets = 0
    started = time.perf_counter()
    for step, piece in enumerate(plan.batches()):
        tokens = torch.from_numpy(piece.chunk.astype(np.int64)).unfold(0, LENGTH, LENGTH - 1).contiguous()
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        targets += piece.targets
    return targets / (time.perf_counter() - started)


def eval_tokens_per_second(bundle: Path, settings: Settings) -> float:
    report = evaluate(bundle, settings)
    assert report.ok, report.reasons
    return report.tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--byte-budget", type=int, default=150_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(byte_budget=args.byte_budget, cache_dir=Path(scratch) / "cache")
        settings.gate.mode = "off"
        own_loss = Path(scratch) / "tiny-gpt-own-loss"
        shutil.copytree(EXAMPLE, own_loss)
        (own_loss / "training.py").write_text(OWN_LOSS)
        results: dict[str, list[float]] = {"bare": [], "with_logits": [], "own_loss": []}
        for _ in range(args.rounds):  # interleaved, so machine drift hits every variant alike
            results["bare"].append(bare_loop(settings))
            results["with_logits"].append(eval_tokens_per_second(EXAMPLE, settings))
            results["own_loss"].append(eval_tokens_per_second(own_loss, settings))
    best = {name: max(values) for name, values in results.items()}
    print(f"tiny-gpt on CPU ({len(os.sched_getaffinity(0))} cores), B={BATCH} L={LENGTH}, "
          f"{args.byte_budget:,} bytes, best of {args.rounds}:")
    print(f"  bare PyTorch loop                 {best['bare']:10,.0f} tokens/s")
    print(f"  prism-ray eval, with_logits=True  {best['with_logits']:10,.0f} tokens/s   "
          f"ratio {best['with_logits'] / best['bare']:.3f}  (target ≥ 0.95)")
    print(f"  prism-ray eval, own forward+loss  {best['own_loss']:10,.0f} tokens/s   "
          f"ratio {best['own_loss'] / best['bare']:.3f}  (pays a second forward)")


if __name__ == "__main__":
    main()
