"""A GPT with the everyday tools of a training script: typed config, attention kernels, init helpers, einops."""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import einops
import numpy as np
import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class Norm(enum.Enum):
    LAYER = enum.auto()
    RMS = enum.auto()

    @classmethod
    def _missing_(cls, value):
        return cls.LAYER


@dataclass(frozen=True)
class Config:
    width: int = 64
    heads: int = 4
    layers: int = 2
    norm: Norm = Norm.RMS
    dropout: float = 0.0
    tags: list[str] = field(default_factory=list)


class Shape(NamedTuple):
    batch: int
    time: int


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.width) if config.norm is Norm.RMS else nn.LayerNorm(config.width)
        self.attn = nn.MultiheadAttention(config.width, config.heads, batch_first=True, dropout=config.dropout)
        self.mlp = nn.Sequential(nn.Linear(config.width, 4 * config.width), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * config.width, config.width))
        self.act = functools.partial(F.gelu, approximate="tanh")
        self.split = Rearrange("b t (h d) -> b h t d", h=config.heads)
        nn.init.trunc_normal_(self.mlp[0].weight, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        out, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        x = x + out
        q = self.split(x)
        with sdpa_kernel([SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION]):
            y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        x = x + einops.rearrange(y, "b h t d -> b t (h d)")
        return x + self.mlp(self.norm(x))


class GPT(nn.Module):
    def __init__(self, config: Config, vocab: int, max_len: int) -> None:
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(vocab, config.width)
        self.pos = nn.Parameter(torch.zeros(1, max_len, config.width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.head = nn.Linear(config.width, vocab, bias=False)
        self.head.weight = self.tok.weight
        scale = 1 / math.sqrt(2 * config.layers)
        for block in self.blocks:
            nn.init.normal_(block.mlp[2].weight, std=0.02 * scale)
        self.register_buffer("decay", torch.from_numpy(np.linspace(1.0, 0.5, max_len, dtype=np.float32)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        shape = Shape(*tokens.shape)
        mask = torch.triu(torch.ones(shape.time, shape.time, dtype=torch.bool, device=tokens.device), 1)
        x = self.tok(tokens) + self.pos[:, :shape.time]
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False) if self.training else block(
                x, mask)
        return self.head(x)


def build_model(ctx):
    config = replace(Config(), layers=2)
    return GPT(config, ctx.vocab_size, ctx.max_seq_len)
