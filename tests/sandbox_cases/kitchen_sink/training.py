"""Compiled training with OneCycleLR, clipping, autocast, an EMA and a few standard-library helpers."""

import collections
import copy
import itertools
import random
import re
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

LOG_LINE = "step {step:>5d} loss {loss:.3f} lr {lr:.2e}"
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.benchmark = True


class Schedule(ABC):
    @abstractmethod
    def __call__(self, step: int) -> float: ...


class Warmup(Schedule):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)


def windows(values: list[float], size: int) -> Iterator[float]:
    queue = collections.deque(maxlen=size)
    for value in values:
        queue.append(value)
        yield sum(queue) / len(queue)


def train(ctx):
    random.seed(ctx.seed)
    rng = np.random.default_rng(ctx.seed)
    torch.manual_seed(int(rng.integers(0, 2**31 - 1)))
    torch.set_float32_matmul_precision("high")
    if torch.cuda.is_available():
        torch.backends.cuda.enable_flash_sdp(True)
    kernels = torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=True, enable_mem_efficient=False)
    model = ctx.build_model().to(ctx.device)
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=3e-4, betas=(0.9, 0.95))
    scheduler = OneCycleLR(optimizer, max_lr=1e-3, total_steps=10_000, pct_start=0.1)
    warm = LambdaLR(torch.optim.SGD(rest, lr=0.1), Warmup(10))
    scaler = torch.amp.GradScaler(enabled=torch.cuda.is_available())
    ema = copy.deepcopy(model).requires_grad_(False)
    losses: list[float] = []
    started = time.perf_counter()
    pattern = re.compile(r"^blocks\.(\d+)\.")
    depth = max((int(m.group(1)) for name, _ in model.named_parameters() if (m := pattern.match(name))), default=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        stream = ctx.iter_train_batches(compiled, batch_size=8, seq_len=64, with_logits=True)
        for step, batch in zip(itertools.count(), stream):
            with kernels, torch.autocast(device_type="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16):
                loss = batch.loss
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if step < 10_000:
                scheduler.step()
            warm.step()
            with torch.no_grad():
                for shadow, live in zip(ema.parameters(), model.parameters(), strict=True):
                    shadow.lerp_(live, 0.001)
            losses.append(loss.item())
            if step % 100 == 0:
                print(LOG_LINE.format(step=step, loss=losses[-1], lr=scheduler.get_last_lr()[0]),
                      f"{time.perf_counter() - started:.1f}s depth {depth}")
    smooth = list(windows(losses, 50))
    torch.save({"ema": ema.state_dict(), "smooth": smooth}, f"{ctx.artifacts_dir}/final.pt")
