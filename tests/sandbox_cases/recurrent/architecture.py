"""An LSTM/GRU language model with a causal convolution front end."""

import itertools
import random
from collections import OrderedDict
from enum import Enum
from functools import partial

import numpy as np
import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F


class Cell(Enum):
    LSTM = "lstm"
    GRU = "gru"


class CausalConv(nn.Module):
    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(channels, channels, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, "b t c -> b c t")
        x = self.conv(F.pad(x, (self.pad, 0)))
        return rearrange(x, "b c t -> b t c")


class RecurrentLM(nn.Module):
    def __init__(self, vocab: int, width: int = 256, cell: Cell = Cell.LSTM) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.conv = CausalConv(width, 4)
        rnn = nn.LSTM if cell is Cell.LSTM else nn.GRU
        self.rnn = rnn(width, width, num_layers=2, batch_first=True, dropout=0.1)
        self.extra = nn.RNN(width, width, batch_first=True)
        self.norm = nn.Sequential(OrderedDict([("ln", nn.LayerNorm(width)), ("drop", nn.Dropout(0.1))]))
        self.out = nn.Linear(width, vocab)
        self.act = partial(F.leaky_relu, negative_slope=0.1)
        gains = np.linspace(0.5, 1.0, num=4)
        self.register_buffer("gains", torch.from_numpy(gains).float())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(self.embed(idx)))
        x, _ = self.rnn(x)
        x, _ = self.extra(x)
        return self.out(self.norm(x))


def build_model(ctx):
    random.seed(ctx.seed)
    widths = list(itertools.islice(itertools.cycle([128, 256]), 3))
    return RecurrentLM(ctx.vocab_size, width=widths[-1], cell=Cell("gru"))
