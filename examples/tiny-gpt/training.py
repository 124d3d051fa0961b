"""AdamW with warmup; backprops through the harness's own forward (with_logits=True), so each batch
costs one forward and one backward. At several ranks, each gets batch_size / world_size of the rows and an
explicit all-reduce averages their gradients."""

import torch
import torch.distributed as dist


def train(ctx):
    model = ctx.build_model().to(ctx.device)
    if ctx.world_size > 1:
        dist.init_process_group("nccl" if ctx.device.startswith("cuda") else "gloo")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 20
    model.train()
    for step, batch in enumerate(ctx.iter_train_batches(model, batch_size=8, seq_len=128, with_logits=True)):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / warmup)
        batch.loss.backward()
        if ctx.world_size > 1:
            for parameter in model.parameters():
                dist.all_reduce(parameter.grad)
                parameter.grad /= ctx.world_size
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if ctx.world_size > 1:
        dist.destroy_process_group()
