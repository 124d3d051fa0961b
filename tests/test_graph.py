"""The graph format and its interpreter (prism_ray/graph/): what the exporter writes runs bitwise like the eager
model, and what the trusted side refuses to run is refused with a typed rule before anything executes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prism_ray.graph.export import ExportRefused, export_forward
from prism_ray.graph.format import GraphFile
from prism_ray.graph.program import GraphRejected, Program
from prism_ray.harness.shared_state import state_tensors

VOCAB = 40


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.qkv = nn.Linear(16, 48)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied: one state tensor
        self.register_buffer("scale", torch.ones(16))
        self.offsets = torch.arange(16.0) / 100  # a plain tensor attribute: a constant of the graph

    def forward(self, tokens):
        x = self.embed(tokens) * self.scale + self.offsets
        q, k, v = self.qkv(self.norm(x)).split(16, dim=2)
        x = x + F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]
        return self.head(x), None  # a tuple: the first item is the logits


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        return torch.cond(x.sum() > 0, lambda a: a * 2.0, lambda a: a - 1.0, (x,))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, VOCAB)
        self.drop = nn.Dropout(0.3)

    def forward(self, tokens):
        return self.head(self.drop(self.rnn(self.embed(tokens))[0]))


def exported(model: nn.Module, tokens: torch.Tensor) -> tuple[GraphFile, dict, list, list[str]]:
    torch.manual_seed(0)
    model.eval()
    tensors = state_tensors(model)
    file, constants = export_forward(model, tokens, {id(t): name for name, t in tensors})
    file = GraphFile.model_validate_json(file.model_dump_json())  # through the wire format
    return file, {c.name: v for c, v in zip(file.constants, constants, strict=True)}, [t for _, t in tensors], \
        [name for name, _ in tensors]


def eager(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("model", [Attention, Branchy, Recurrent], ids=lambda m: m.__name__)
def test_the_interpreted_graph_equals_the_eager_model_bitwise(model):
    torch.manual_seed(0)
    net = model()
    tokens = torch.randint(0, VOCAB, (3, 12))
    file, constants, state, names = exported(net, tokens)
    program = Program(file, names, constants, torch.device("cpu"))
    assert torch.equal(program(state, tokens), eager(net.eval(), tokens))
    other = torch.randint(0, VOCAB, (3, 12))  # traced once, runs on any batch of the shape
    assert torch.equal(program(state, other), eager(net, other))


def test_state_is_bound_by_name_and_constants_travel_as_bytes():
    torch.manual_seed(0)
    net = Attention()
    file, constants, state, names = exported(net, torch.randint(0, VOCAB, (2, 8)))
    kinds = {item.kind for item in file.graph.inputs}
    assert kinds == {"tokens", "parameter", "buffer", "constant"}
    targets = {item.target for item in file.graph.inputs if item.kind == "parameter"}
    assert "embed.weight" in targets and "head.weight" not in targets  # the tied head reads the embedding's state
    assert [c.shape for c in file.constants] == [[16]]
    doubled = [t * 2 if name == "embed.weight" else t for name, t in zip(names, state, strict=True)]
    tokens = torch.randint(0, VOCAB, (2, 8))
    program = Program(file, names, constants, torch.device("cpu"))
    assert not torch.equal(program(doubled, tokens), program(state, tokens))  # it reads what it is given


def test_graph_mutation_and_random_numbers_are_refused_at_export():
    class Writes(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, VOCAB)
            self.register_buffer("memory", torch.zeros(2, 8, dtype=torch.long))

        def forward(self, tokens):
            self.memory.copy_(tokens)
            return self.embed(tokens)

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, VOCAB)

        def forward(self, tokens):
            return self.embed(tokens) + torch.rand(VOCAB)

    tokens = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(ExportRefused) as caught:
        exported(Writes(), tokens)
    assert caught.value.rule == "contract:graph_mutation"
    with pytest.raises(ExportRefused) as caught:
        exported(Noisy(), tokens)
    assert caught.value.rule == "contract:graph_op" and "rand" in caught.value.message


def tampered(edit) -> GraphFile:
    torch.manual_seed(0)
    file, _, _, _ = exported(Attention(), torch.randint(0, VOCAB, (2, 8)))
    raw = json.loads(file.model_dump_json())
    edit(raw)
    return raw


def node(raw: dict, op_prefix: str) -> dict:
    return next(n for n in raw["graph"]["nodes"] if n["op"].startswith(op_prefix))


@pytest.mark.parametrize("edit, rule", [
    (lambda raw: node(raw, "aten.add").update(op="aten.rand.default"), "contract:graph_op"),
    (lambda raw: node(raw, "aten.add").update(op="aten.empty.memory_format"), "contract:graph_op"),
    (lambda raw: node(raw, "aten.add").update(op="aten.as_strided.default"), "contract:graph_op"),
    (lambda raw: node(raw, "aten.add").update(op="aten.add_.Tensor"), "contract:graph_op"),
    (lambda raw: node(raw, "aten.add").update(op="aten.add.out"), "contract:graph_op"),
    (lambda raw: node(raw, "aten.add").update(op="prims.add.default"), "contract:graph_op"),
    (lambda raw: node(raw, "aten.add").update(op="os.system"), "contract:graph_op"),
    (lambda raw: node(raw, "aten.add").update(args=[{"ref": "nowhere"}, 1]), "contract:graph_format"),
    (lambda raw: node(raw, "aten.add").update(args=[{"pickle": "x"}, 1]), "contract:graph_format"),
    (lambda raw: node(raw, "aten.add").update(args=[{"ref": raw["graph"]["nodes"][-1]["name"]}, 1]),
     "contract:graph_format"),  # a reference forward in the list: a cycle
    (lambda raw: raw["graph"]["nodes"].append(copy.deepcopy(raw["graph"]["nodes"][0])), "contract:graph_format"),
    (lambda raw: raw["graph"]["inputs"].append({"name": "t2", "kind": "tokens"}), "contract:graph_format"),
    (lambda raw: raw["graph"]["inputs"][0].update(target="not.a.state"), "contract:graph_format"),
    (lambda raw: raw["graph"].update(outputs=[]), "contract:graph_format"),
])
def test_a_tampered_graph_is_refused_before_it_runs(edit, rule):
    raw = tampered(edit)
    names = [name for name, _ in state_tensors(Attention())]
    with pytest.raises((GraphRejected, ValueError)) as caught:
        file = GraphFile.model_validate(raw)
        Program(file, names, {c["name"]: torch.zeros(c["shape"]) for c in raw["constants"]}, torch.device("cpu"))
    if isinstance(caught.value, GraphRejected):
        assert caught.value.rule == rule, caught.value.message


def test_a_recursive_subgraph_is_refused():
    torch.manual_seed(0)
    file, constants, _, names = exported(Branchy(), torch.randint(0, VOCAB, (2, 8)))
    raw = json.loads(file.model_dump_json())
    name, graph = next(iter(raw["subgraphs"].items()))
    graph["nodes"].append({"name": "again", "op": "cond", "args": [{"ref": graph["inputs"][0]["name"]},
                                                                   {"graph": name}, {"graph": name},
                                                                   [{"ref": graph["inputs"][0]["name"]}]]})
    with pytest.raises(GraphRejected) as caught:
        Program(GraphFile.model_validate(raw), names, constants, torch.device("cpu"))
    assert caught.value.rule == "contract:graph_format"


def test_the_graph_names_a_device_the_scorer_replaces():
    torch.manual_seed(0)
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, VOCAB)

        def forward(self, tokens):
            return self.embed(tokens) + torch.arange(tokens.shape[1], device=tokens.device)[None, :, None]

    file, constants, state, names = exported(Positions(), torch.randint(0, VOCAB, (2, 8)))
    raw = json.loads(file.model_dump_json())
    assert '"device": "cpu"' in json.dumps(raw)
    for item in raw["graph"]["nodes"]:
        item["kwargs"] = {k: ({"device": "cuda:7"} if k == "device" else v) for k, v in item["kwargs"].items()}
    program = Program(GraphFile.model_validate(raw), names, constants, torch.device("cpu"))
    tokens = torch.randint(0, VOCAB, (2, 8))
    assert program(state, tokens).device.type == "cpu"
