"""A training loop on the scored stream: AdamW, cosine schedule, clipping, bf16 autocast."""

from __future__ import annotations

import math
import time

import torch
from architecture import build_model
from prism_challenge.evaluator.interface import PrismContext
from torch.optim.lr_scheduler import CosineAnnealingLR

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


def lr_at(step: int, warmup: int = 100, base: float = 3e-4) -> float:
    return base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, 1000) / 1000))


def train(ctx: PrismContext) -> None:
    torch.manual_seed(ctx.seed)
    model = build_model(ctx).to(ctx.device)
    compiled = torch.compile(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), fused=False)
    scheduler = CosineAnnealingLR(opt, T_max=1000)
    scaler = torch.amp.GradScaler(enabled=False)
    device_type = "cuda" if str(ctx.device).startswith("cuda") else "cpu"
    started = time.time()
    for step, batch in enumerate(ctx.iter_train_batches(compiled, batch_size=8, seq_len=128, with_logits=True)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            loss = batch.loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        scheduler.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} after {time.time() - started:.0f}s")
    torch.save(model.state_dict(), f"{ctx.artifacts_dir}/model.pt")
    path = ctx.artifacts_dir + "/optimizer.pt"
    torch.save(opt.state_dict(), path)
