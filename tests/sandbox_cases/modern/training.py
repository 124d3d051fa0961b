"""DDP when launched with several ranks, a Muon-style optimizer, an EMA copy, and a step counter."""

import copy
import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

STEP = 0


@torch.compile
def orthogonalise(grad: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = grad.bfloat16()
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.to(grad.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                update = orthogonalise(buf) if p.ndim == 2 else buf
                p.add_(update, alpha=-group["lr"])


def train(ctx):
    global STEP
    model = ctx.build_model().to(ctx.device)
    if ctx.world_size > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        model = DistributedDataParallel(model, device_ids=[ctx.local_rank] if torch.cuda.is_available() else None)
    matrices = [p for p in model.parameters() if p.ndim == 2]
    others = [p for p in model.parameters() if p.ndim != 2]
    opts = [Muon(matrices), torch.optim.Adam(others, lr=3e-4, fused=False)]
    ema = copy.deepcopy(model).requires_grad_(False)
    torch.set_float32_matmul_precision("high")
    history = defaultdict(list)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(ctx.seed)
    for batch in ctx.iter_train_batches(model, batch_size=4, seq_len=64, with_logits=True):
        batch.loss.backward()
        if ctx.world_size > 1:
            dist.all_reduce(batch.loss.detach(), op=dist.ReduceOp.SUM)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for shadow, live in zip(ema.parameters(), model.parameters(), strict=True):
                shadow.lerp_(live, 1 - 0.999)
        STEP += 1
        if (loss := batch.loss.item()) and math.isfinite(loss):
            history["loss"].append(loss)
    if ctx.rank == 0:
        torch.save(ema.state_dict(), f"{ctx.artifacts_dir}/ema.pt")
