"""A byte-level GRU language model (vocab 257: bytes + end-of-text)."""

import torch
from torch import nn

DIM = 128


class ByteGRU(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, DIM)
        self.rnn = nn.GRU(DIM, DIM, num_layers=1, batch_first=True)
        self.head = nn.Linear(DIM, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(tokens))
        return self.head(hidden)


def build_model(ctx):
    return ByteGRU(ctx.vocab_size)
