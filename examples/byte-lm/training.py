"""A plain loop: the miner computes its own loss on the batch it was handed. At several ranks, DDP averages the
gradients of each rank's rows (batch_size is the global batch: each rank gets batch_size / world_size rows)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel


def train(ctx):
    model = ctx.build_model().to(ctx.device)
    net = model
    if ctx.world_size > 1:
        dist.init_process_group("nccl" if ctx.device.startswith("cuda") else "gloo")
        net = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for batch in ctx.iter_train_batches(net, batch_size=16, seq_len=256):
        logits = net(batch.tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    if ctx.world_size > 1:
        dist.destroy_process_group()
