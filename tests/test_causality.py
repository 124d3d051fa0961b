"""The causality probes (docs/rules.md, "Threat model"): leaks are caught, ordinary causal models are not flagged."""

from __future__ import annotations

import socket

import pytest
import torch

from conftest import byte_stream, train_on_stream
from prism_ray.harness.context import RunError
from prism_ray.harness.protocol import Channel, Kind, parse_json
from prism_ray.harness.scorer import Scorer

pytestmark = pytest.mark.sandbox

TEXT = "A causal model may look back, never ahead. " * 120

LOOP = """
import torch

def train(ctx):
    model = ctx.build_model()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for batch in ctx.iter_train_batches(model, batch_size=2, seq_len=32, with_logits=True):
        batch.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""

HEADER = """
import torch
import torch.nn.functional as F
from torch import nn

class Net(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.qkv = nn.Linear(32, 96)
        self.head = nn.Linear(32, vocab)
"""

FOOTER = """
def build_model(ctx):
    return Net(ctx.vocab_size)
"""

LEAKS = {
    "unmasked_attention": """
    def forward(self, tokens):
        q, k, v = self.qkv(self.embed(tokens)).split(32, dim=2)
        return self.head(F.scaled_dot_product_attention(q, k, v, is_causal=False))
""",
    "roll_peek": """
    def forward(self, tokens):
        return self.head(self.embed(tokens) + self.embed(torch.roll(tokens, -1, dims=1)))
""",
    "cross_row_mixing": """
    def forward(self, tokens):
        x = self.embed(tokens)
        return self.head(x + x.mean(dim=0, keepdim=True))
""",
}

GATED_LEAK = HEADER + """
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, tokens):
        peek = F.one_hot(torch.roll(tokens, -1, dims=1), self.head.out_features).float()
        return self.head(self.embed(tokens)) + 20.0 * self.gate * peek
""" + FOOTER

CAUSAL_ZOO = HEADER + """
        self.dropout = nn.Dropout(0.2)
        self.conv = nn.Conv1d(32, 32, kernel_size=4)
        self.rnn = nn.GRU(32, 32, batch_first=True)

    def forward(self, tokens):
        x = self.dropout(self.embed(tokens))
        q, k, v = self.qkv(x).split(32, dim=2)
        x = x + F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                               dropout_p=0.1 if self.training else 0.0, is_causal=True).squeeze(1)
        x = x + self.conv(F.pad(x.transpose(1, 2), (3, 0))).transpose(1, 2)
        x = x + self.rnn(x)[0]
        return self.head(self.dropout(x))
""" + FOOTER


def run(bundle_factory, tmp_path, architecture, **kwargs):
    return train_on_stream(bundle_factory(architecture, LOOP), byte_stream(TEXT), tmp_path / "run", **kwargs)


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_leak_is_caught_at_the_first_batch(bundle_factory, tmp_path, leak):
    outcome = run(bundle_factory, tmp_path, HEADER + LEAKS[leak] + FOOTER)
    assert outcome.status == "failed"
    assert outcome.reasons[0].rule == "run:non_causal"
    assert outcome.batches == 0  # the leaking batch was never recorded


def test_learned_leak_is_caught_later(bundle_factory, tmp_path):
    outcome = run(bundle_factory, tmp_path, GATED_LEAK, probe_every=1)
    assert outcome.status == "failed"
    assert outcome.reasons[0].rule == "run:non_causal"
    assert outcome.batches >= 1  # invisible at step 0: the gate starts at zero


def test_dropout_attention_convolution_and_recurrence_pass(bundle_factory, tmp_path):
    outcome = run(bundle_factory, tmp_path, CAUSAL_ZOO, probe_every=1)
    assert outcome.status == "completed", outcome.reasons


def test_instantiation_probe_catches_a_leak_before_any_data(bundle_factory, tmp_path):
    outcome = run(bundle_factory, tmp_path, HEADER + LEAKS["unmasked_attention"] + FOOTER)
    assert [r.rule for r in outcome.reasons] == ["run:non_causal"], outcome.reasons
    assert outcome.before_data and outcome.batches == 0


def test_instantiation_probe_counts_lazy_parameters(bundle_factory, tmp_path):
    lazy = HEADER.replace("self.head = nn.Linear(32, vocab)", "self.head = nn.LazyLinear(vocab)") + """
    def forward(self, tokens):
        return self.head(self.embed(tokens))
""" + FOOTER
    outcome = run(bundle_factory, tmp_path, lazy, max_params=10_000)
    assert [r.rule for r in outcome.reasons] == ["contract:param_cap"]
    assert outcome.before_data and outcome.batches == 0
    assert outcome.model_params == 257 * 32 + 32 * 96 + 96 + 32 * 257 + 257


@pytest.mark.parametrize("failing_call", [1, 3])
def test_a_forward_that_raises_in_the_instantiation_probe_is_the_bundles_failure(failing_call):
    """The probe's perturbed input is a third input the graph sees before data: a graph that raises on it (an index
    out of range that depends on the tokens, say) fails as run:forward_failed, like one that raises on the first
    call, and never as a crash of the trusted scorer."""
    parent, mine = socket.socketpair()
    scorer = Scorer(Channel(mine), {"device": "cpu", "vocab_size": 257, "threads": 1, "rank_timeout": 5.0})
    calls = []

    def graph(state, tokens):
        calls.append(tokens)
        if len(calls) == failing_call:
            raise IndexError("index out of range in self")
        return torch.zeros(*tokens.shape, 257)

    with pytest.raises(RunError) as caught:
        scorer._check_forward(graph, [], 2, 8)
    assert caught.value.rule == "run:forward_failed" and "IndexError" in caught.value.message
    assert len(calls) == failing_call
    told = Channel(parent)
    frames = [told.recv(timeout=5) for _ in range(1 if failing_call == 1 else 2)]  # INFO comes after two calls
    assert frames[-1][0] == Kind.ERROR and parse_json(frames[-1][1])["rule"] == "run:forward_failed"
