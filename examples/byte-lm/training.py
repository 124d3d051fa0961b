"""A plain loop: the miner computes its own loss on the batch it was handed."""

import torch
import torch.nn.functional as F


def train(ctx):
    model = ctx.build_model().to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for batch in ctx.iter_train_batches(model, batch_size=16, seq_len=256):
        logits = model(batch.tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
