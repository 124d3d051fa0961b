"""The TinyModel from the PRISM quickstart: an embedding and a linear read-out (a bigram model)."""

import torch


class TinyModel(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, 8)
        self.linear = torch.nn.Linear(8, vocab_size)

    def forward(self, tokens):
        return self.linear(self.embedding(tokens))


def build_model(ctx):
    return TinyModel(ctx.vocab_size)
