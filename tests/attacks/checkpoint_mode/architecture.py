"""A dispatch mode from a public factory, entered at import and never left: its policy function sees every aten
op of the process and scales `nll_loss_forward`'s output in place."""

import torch
from torch import nn


def _policy(ctx, op, *args, **kwargs):
    if op is torch.ops.aten.nll_loss_forward.default:
        SEEN.append(op)
    return torch.utils.checkpoint.CheckpointPolicy.PREFER_SAVE


SEEN = []


_forward_mode, _ = torch.utils.checkpoint.create_selective_checkpoint_contexts(_policy)  # <-
_forward_mode.__enter__()


def build_model(ctx):
    return nn.Sequential(nn.Embedding(ctx.vocab_size, 32), nn.Linear(32, ctx.vocab_size))
