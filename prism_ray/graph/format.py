"""The graph format the exporter writes and the trusted scorer reads: JSON we define, never pickle.

A graph is a list of nodes in execution order. Each node calls one operation (`aten.<name>.<overload>`, `getitem`
of a multi-output result, or `cond` over two subgraphs) on arguments encoded as JSON: numbers, booleans, null,
strings and lists as themselves; `{"ref": name}` for an earlier node or input; `{"dtype"|"device"|"layout"|
"memory_format": name}`; `{"float": "inf"|"-inf"|"nan"}`; `{"graph": name}` for a subgraph. Inputs are the token
batch, state tensors (by their name in the shared layout) and constants, whose raw bytes (with dtype and shape) travel
beside the JSON. docs/architecture.md, "Trust boundaries".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT = "prism-graph/1"
MAX_NODES = 200_000
MAX_JSON_BYTES = 64 << 20
# A tensor's shape as a sandbox sends it: a few dimensions of sane size (a red team's two million dimensions held the
# parent's GIL for minutes multiplying them out)
MAX_DIMS, MAX_DIM = 16, 1 << 40


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GraphInput(_Strict):
    name: str = Field(max_length=200)
    kind: Literal["tokens", "parameter", "buffer", "constant", "operand"]
    target: str | None = Field(default=None, max_length=1000)  # a state name, or a constant's name


class GraphNode(_Strict):
    name: str = Field(max_length=200)
    op: str = Field(max_length=200)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class Graph(_Strict):
    inputs: list[GraphInput]
    nodes: list[GraphNode] = Field(max_length=MAX_NODES)
    outputs: list[Any]


class ConstantSpec(_Strict):
    name: str = Field(max_length=1000)
    dtype: str
    shape: list[Annotated[int, Field(ge=0, lt=MAX_DIM)]] = Field(max_length=MAX_DIMS)
    offset: int = Field(ge=0)  # into the blob, after the initial state
    nbytes: int = Field(ge=0)


class GraphFile(_Strict):
    format: Literal["prism-graph/1"]
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=2)
    graph: Graph
    subgraphs: dict[str, Graph] = Field(default_factory=dict)
    constants: list[ConstantSpec] = Field(default_factory=list)


def encode_scalar(value: Any) -> Any:
    """A Python float that JSON cannot hold as a number."""
    if isinstance(value, float) and value != value:
        return {"float": "nan"}
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return {"float": "inf" if value > 0 else "-inf"}
    return value
