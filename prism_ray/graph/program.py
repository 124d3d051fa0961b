"""Rebuild an exported graph from its JSON and run it: the only code that executes a scored forward.

Nothing here imports or calls miner code. Every node is resolved against the allowlist (ops.py) before anything
runs; arguments are decoded from a closed set of JSON shapes; references must point at earlier nodes; a `cond`
runs one of two subgraphs by a boolean tensor. Devices named in the graph are replaced by the scorer's device
(the exporter traces on CPU). Intermediate results are dropped after their last use, as eager code would.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch

from prism_ray.graph import ops
from prism_ray.graph.format import Graph, GraphFile

_DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
                   "channels_last": torch.channels_last}
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_MAX_DEPTH = 8  # nesting of argument lists
_MAX_SUBGRAPH_DEPTH = 16
_MAX_STRING = 256


class GraphRejected(ValueError):
    """The graph breaks the format or uses an operation the scorer does not run; `rule` says which."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule
        self.message = message


@dataclass(frozen=True)
class _Ref:
    index: int


@dataclass
class _Step:
    call: Any  # an OpOverload, operator.getitem, or a _Cond
    args: list[Any]
    kwargs: dict[str, Any]
    drop: tuple[int, ...]  # environment slots whose last use this is


class _Cond:
    def __init__(self, if_true: _Body, if_false: _Body):
        self.if_true, self.if_false = if_true, if_false

    def __call__(self, predicate: Any, operands: list[Any]) -> list[Any]:
        if isinstance(predicate, torch.Tensor):
            if predicate.numel() != 1 or predicate.dtype != torch.bool:
                raise RuntimeError("cond needs a one-element boolean tensor")
            predicate = bool(predicate)
        if not isinstance(predicate, bool):
            raise RuntimeError("cond needs a boolean predicate")
        return (self.if_true if predicate else self.if_false).run(list(operands))


class _Body:
    """One compiled graph: its inputs are environment slots 0…n−1, each node's result the next slot."""

    def __init__(self, graph: Graph, file: GraphFile, device: torch.device, depth: int, seen: tuple[str, ...]):
        if depth > _MAX_SUBGRAPH_DEPTH:
            raise GraphRejected("contract:graph_format", "subgraphs nest too deeply")
        self.file, self.device, self.depth, self.seen = file, device, depth, seen
        self.slots: dict[str, int] = {}
        for item in graph.inputs:
            self._name(item.name)
        self.inputs = graph.inputs
        last_use: dict[int, int] = {}
        raw: list[tuple[Any, list[Any], dict[str, Any]]] = []
        for position, node in enumerate(graph.nodes):
            call = self._call(node.op)
            args = [self._decode(a, 0) for a in node.args]
            kwargs = {str(k)[:_MAX_STRING]: self._decode(v, 0) for k, v in node.kwargs.items()}
            if call is operator.getitem and (len(args) != 2 or not isinstance(args[0], _Ref)
                                             or not isinstance(args[1], int) or isinstance(args[1], bool) or kwargs):
                raise GraphRejected("contract:graph_format", "getitem takes a node and an integer index")
            if isinstance(call, _CondSpec):
                call, args = self._cond(call, args, kwargs)
            for ref in _refs((args, kwargs)):
                last_use[ref] = position
            raw.append((call, args, kwargs))
            self._name(node.name)
        self.outputs = [self._decode(o, 0) for o in graph.outputs]
        for ref in _refs(self.outputs):
            last_use[ref] = len(raw)  # kept to the end
        drops: dict[int, list[int]] = {}
        for slot, position in last_use.items():
            drops.setdefault(position, []).append(slot)
        self.steps = [_Step(call, args, kwargs, tuple(drops.get(position, ())))
                      for position, (call, args, kwargs) in enumerate(raw)]

    def _name(self, name: str) -> None:
        if name in self.slots:
            raise GraphRejected("contract:graph_format", f"`{ops.printable(name)}` is defined twice")
        self.slots[name] = len(self.slots)

    def _call(self, op: str) -> Any:
        if op == "getitem":
            return operator.getitem
        if op == "cond":
            return _CondSpec()
        try:
            return ops.resolve(op)
        except ops.OpNotAllowed as error:
            raise GraphRejected("contract:graph_op", str(error)) from None

    def _cond(self, spec: _CondSpec, args: list[Any], kwargs: dict[str, Any]) -> tuple[_Cond, list[Any]]:
        if kwargs or len(args) != 4 or not isinstance(args[1], _Subgraph) or not isinstance(args[2], _Subgraph) \
                or not isinstance(args[3], list):
            raise GraphRejected("contract:graph_format", "cond takes a predicate, two subgraphs and a list of operands")
        branches = [self._subgraph(args[1].name), self._subgraph(args[2].name)]
        for branch in branches:
            if len(branch.inputs) != len(args[3]):
                raise GraphRejected("contract:graph_format", "a cond branch takes another number of operands")
        return _Cond(*branches), [args[0], args[3]]

    def _subgraph(self, name: str) -> _Body:
        graph = self.file.subgraphs.get(name)
        if graph is None or name in self.seen:
            raise GraphRejected("contract:graph_format", f"subgraph `{ops.printable(name)}` is missing or recursive")
        if any(item.kind != "operand" for item in graph.inputs):
            raise GraphRejected("contract:graph_format", "a subgraph's inputs are its operands only")
        return _Body(graph, self.file, self.device, self.depth + 1, (*self.seen, name))

    def _decode(self, value: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise GraphRejected("contract:graph_format", "arguments nest too deeply")
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, str):
            if len(value) > _MAX_STRING:
                raise GraphRejected("contract:graph_format", "a string argument is too long")
            return value
        if isinstance(value, list):
            return [self._decode(item, depth + 1) for item in value]
        if isinstance(value, dict) and len(value) == 1:
            (key, item), = value.items()
            if key == "ref" and isinstance(item, str):
                if item not in self.slots:
                    raise GraphRejected("contract:graph_format",
                                        f"`{ops.printable(item)}` is used before it is defined")
                return _Ref(self.slots[item])
            if key == "dtype" and item in _DTYPES:
                return _DTYPES[item]
            if key == "device" and isinstance(item, str):
                return self.device
            if key == "layout" and item == "strided":
                return torch.strided
            if key == "memory_format" and item in _MEMORY_FORMATS:
                return _MEMORY_FORMATS[item]
            if key == "float" and item in _FLOATS:
                return _FLOATS[item]
            if key == "graph" and isinstance(item, str):
                return _Subgraph(item)
        raise GraphRejected("contract:graph_format", f"an argument of an unknown kind: {ops.printable(repr(value))}")

    def run(self, inputs: list[Any]) -> list[Any]:
        env: list[Any] = list(inputs) + [None] * len(self.steps)
        base = len(inputs)
        for position, step in enumerate(self.steps):
            env[base + position] = step.call(*_fill(step.args, env), **_fill(step.kwargs, env))
            for slot in step.drop:
                env[slot] = None
        return _fill(self.outputs, env)


class _CondSpec:
    pass


@dataclass(frozen=True)
class _Subgraph:
    name: str


def _refs(value: Any) -> list[int]:
    if isinstance(value, _Ref):
        return [value.index]
    if isinstance(value, list):
        return [ref for item in value for ref in _refs(item)]
    if isinstance(value, tuple):
        return [ref for item in value for ref in _refs(item)]
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in _refs(item)]
    return []


def _fill(value: Any, env: list[Any]) -> Any:
    if isinstance(value, _Ref):
        return env[value.index]
    if isinstance(value, list):
        return [_fill(item, env) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, env) for key, item in value.items()}
    return value


class Program:
    """The scored forward: state tensors (by layout name) and a token batch in, logits out."""

    def __init__(self, file: GraphFile, state_names: list[str], constants: dict[str, torch.Tensor],
                 device: torch.device):
        self.file = file
        self.body = _Body(file.graph, file, device, 0, ())
        index = {name: position for position, name in enumerate(state_names)}
        self.sources: list[tuple[str, Any]] = []
        tokens = 0
        for item in file.graph.inputs:
            if item.kind == "tokens":
                tokens += 1
                self.sources.append(("tokens", None))
            elif item.kind in ("parameter", "buffer") and item.target in index:
                self.sources.append(("state", index[item.target]))
            elif item.kind == "constant" and item.target in constants:
                self.sources.append(("constant", constants[item.target]))
            else:
                raise GraphRejected("contract:graph_format", f"input `{ops.printable(item.name)}` ({item.kind}) names "
                                    f"nothing the scorer holds: `{ops.printable(str(item.target))}`")
        if tokens != 1:
            raise GraphRejected("contract:graph_format", "the forward must take exactly one input: the token batch")
        if len(self.body.outputs) != 1 or not isinstance(self.body.outputs[0], _Ref):
            raise GraphRejected("contract:graph_format", "the forward must return exactly one tensor: the logits")

    def parameter_names(self) -> list[str]:
        return [str(item.target) for item in self.file.graph.inputs if item.kind == "parameter"]

    def state_names(self) -> set[str]:
        return {str(item.target) for item in self.file.graph.inputs if item.kind in ("parameter", "buffer")}

    def __call__(self, state: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        inputs = [tokens if kind == "tokens" else state[source] if kind == "state" else source
                  for kind, source in self.sources]
        with torch.inference_mode():
            output = self.body.run(inputs)[0]
        if not isinstance(output, torch.Tensor):
            raise RuntimeError("the forward returned something other than a tensor")
        return output
