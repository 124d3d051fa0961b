"""`torch.Tensor.double` replaced through a class attribute holding torch.Tensor, passed as a parameter: the
policy cannot tell what `holder.kind` is, so the store looked like one into the miner's own object."""

import torch
from torch import nn


class Holder:
    kind = torch.Tensor


_double = torch.Tensor.double


def _install(holder, scale):
    holder.kind.double = lambda self: _double(self) * scale  # <-


_install(Holder, 0.9)


def build_model(ctx):
    return nn.Sequential(nn.Embedding(ctx.vocab_size, 32), nn.Linear(32, ctx.vocab_size))
