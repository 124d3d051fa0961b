"""AdamW with warmup; backprops through the harness's own forward (with_logits=True), so each batch
costs one forward and one backward."""

import torch


def train(ctx):
    model = ctx.build_model().to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 20
    model.train()
    for step, batch in enumerate(ctx.iter_train_batches(model, batch_size=8, seq_len=128, with_logits=True)):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / warmup)
        batch.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
