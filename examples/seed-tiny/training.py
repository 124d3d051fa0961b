"""The quickstart's plain loop, written against the PRISM interface path. At several ranks, an explicit all-reduce
averages the gradients of each rank's rows (each rank gets batch_size / world_size of them)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from prism_challenge.evaluator.interface import PrismContext


def train(ctx: PrismContext):
    model = ctx.build_model().to(ctx.device)
    if ctx.world_size > 1:
        dist.init_process_group("nccl" if ctx.device.startswith("cuda") else "gloo")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in ctx.iter_train_batches(model, batch_size=8, seq_len=64):
        tokens = batch.tokens
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        if ctx.world_size > 1:
            for parameter in model.parameters():
                dist.all_reduce(parameter.grad)
                parameter.grad /= ctx.world_size
        optimizer.step()
    if ctx.world_size > 1:
        dist.destroy_process_group()
