"""The quickstart's plain loop, written against the PRISM interface path."""

import torch
import torch.nn.functional as F
from prism_challenge.evaluator.interface import PrismContext


def train(ctx: PrismContext):
    model = ctx.build_model().to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in ctx.iter_train_batches(model, batch_size=8, seq_len=64):
        tokens = batch.tokens
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
