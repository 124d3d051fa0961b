"""`self` inside `__init__` is trusted as a new instance; calling `__init__` by hand on torch.Tensor would make
`self.double = …` a store into torch.Tensor."""

import torch
from torch import nn


class Scaled:
    def __init__(self, scale):
        original = torch.Tensor.double
        self.double = lambda tensor: original(tensor) * scale


Scaled.__init__(torch.Tensor, 0.9)  # <-


def build_model(ctx):
    return nn.Sequential(nn.Embedding(ctx.vocab_size, 32), nn.Linear(32, ctx.vocab_size))
