"""Export a model's eval-mode forward at one batch geometry into the graph format (format.py).

This runs in the exporter's sandbox, beside the miner's architecture.py: nothing it writes is trusted. The trusted
scorer checks everything again (program.py); the checks here only give the miner an early, precise error.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from prism_ray.graph import ops
from prism_ray.graph.format import FORMAT, ConstantSpec, Graph, GraphFile, GraphInput, GraphNode, encode_scalar


class ExportRefused(Exception):
    """The exported graph cannot be scored; `rule` and a message for the miner."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule
        self.message = message


class _Logits(torch.nn.Module):
    """The miner's model with its output reduced to the logits (a tuple's first item, or `.logits`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        output = self.model(tokens)
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        elif not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
            output = output.logits
        if not isinstance(output, torch.Tensor):
            raise ExportRefused("run:bad_logits", f"the model must return a tensor of logits (or a tuple whose first "
                                f"item is one), got {type(output).__name__}")
        return output


def export_forward(model: torch.nn.Module, tokens: torch.Tensor, state_names: dict[int, str]
                   ) -> tuple[GraphFile, list[torch.Tensor]]:
    """The graph of `model(tokens)` in eval mode and its constant tensors. `state_names` maps id(tensor) of each
    parameter and buffer to its name in the shared layout."""
    wrapped = _Logits(model).eval()
    program = torch.export.export(wrapped, (tokens,), strict=False).run_decompositions({})
    signature = program.graph_signature
    mutated = [spec.target for spec in signature.output_specs if spec.kind.name != "USER_OUTPUT"]
    if mutated:
        raise ExportRefused("contract:graph_mutation", f"the forward writes `{mutated[0]}`: the scored forward must "
                            "not change buffers or its input (keep running statistics out of eval mode)")
    constants: list[torch.Tensor] = []
    specs: list[ConstantSpec] = []
    inputs: dict[str, GraphInput] = {}
    for spec in signature.input_specs:
        name = spec.arg.name
        kind = spec.kind.name
        if kind == "USER_INPUT":
            inputs[name] = GraphInput(name=name, kind="tokens")
        elif kind in ("PARAMETER", "BUFFER"):
            target = spec.target.removeprefix("model.")
            tensor = _state_tensor(model, target)
            if tensor is None or id(tensor) not in state_names:
                raise ExportRefused("contract:graph_format", f"the forward reads `{target}`, which is not a "
                                    "parameter or buffer of the model")
            inputs[name] = GraphInput(name=name, kind="parameter" if kind == "PARAMETER" else "buffer",
                                      target=state_names[id(tensor)])
        elif kind == "CONSTANT_TENSOR":
            value = program.constants[spec.target].detach().contiguous().cpu()
            offset = sum(item.nbytes for item in specs)
            specs.append(ConstantSpec(name=name, dtype=str(value.dtype).removeprefix("torch."),
                                      shape=list(value.shape), offset=offset,
                                      nbytes=value.numel() * value.element_size()))
            constants.append(value)
            inputs[name] = GraphInput(name=name, kind="constant", target=name)
        else:
            raise ExportRefused("contract:graph_op", f"the forward holds a {kind.lower()} input, which the scorer "
                                "cannot run (custom objects and effect tokens are not tensor math)")
    writer = _Writer()
    graph = writer.graph(program.graph_module, inputs)
    file = GraphFile(format=FORMAT, batch_size=int(tokens.shape[0]), seq_len=int(tokens.shape[1]), graph=graph,
                     subgraphs=writer.subgraphs, constants=specs)
    return file, constants


def _state_tensor(model: torch.nn.Module, target: str) -> torch.Tensor | None:
    for getter in (model.get_parameter, model.get_buffer):
        try:
            return getter(target)
        except AttributeError:
            continue
    return None


class _Writer:
    """fx graphs into our format; each subgraph written once under a unique name."""

    def __init__(self) -> None:
        self.subgraphs: dict[str, Graph] = {}

    def graph(self, module: torch.fx.GraphModule, inputs: dict[str, GraphInput] | None) -> Graph:
        """One fx graph; `inputs` None for a subgraph, whose placeholders are its operands."""
        placeholders: list[GraphInput] = []
        nodes: list[GraphNode] = []
        outputs: list[Any] = []
        attributes: dict[str, str] = {}  # get_attr node → the subgraph's name
        for node in module.graph.nodes:
            if node.op == "placeholder":
                placeholders.append(inputs[node.name] if inputs is not None
                                    else GraphInput(name=node.name, kind="operand"))
            elif node.op == "get_attr":
                child = getattr(module, node.target)
                if not isinstance(child, torch.fx.GraphModule):
                    raise ExportRefused("contract:graph_op", f"the forward reads an attribute `{node.target}` that is "
                                        "not a subgraph")
                attributes[node.name] = f"g{len(self.subgraphs)}"
                self.subgraphs[attributes[node.name]] = self.graph(child, None)
            elif node.op == "call_function":
                nodes.append(GraphNode(name=node.name, op=_op_name(node.target),
                                       args=[_arg(a, attributes) for a in node.args],
                                       kwargs={k: _arg(v, attributes) for k, v in node.kwargs.items()}))
            elif node.op == "output":
                result = node.args[0]
                items = result if isinstance(result, (tuple, list)) else [result]
                outputs = [_arg(item, attributes) for item in items]
            else:
                raise ExportRefused("contract:graph_op", f"the exported graph holds a `{node.op}` node")
        return Graph(inputs=placeholders, nodes=nodes, outputs=outputs)


def _op_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    if target is torch.ops.higher_order.cond:
        return "cond"
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        name = f"aten.{target._opname}.{target._overloadname}"
        try:
            ops.resolve(name)
        except ops.OpNotAllowed as error:
            raise ExportRefused("contract:graph_op", f"the forward uses {error}") from None
        return name
    raise ExportRefused("contract:graph_op", f"the forward uses `{getattr(target, '__name__', target)}`, "
                        "which is not an ATen operation the scorer runs")


def _arg(value: Any, attributes: dict[str, str]) -> Any:
    if isinstance(value, torch.fx.Node):
        if value.op == "get_attr":
            return {"graph": attributes[value.name]}
        return {"ref": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return encode_scalar(value)
    if isinstance(value, (tuple, list)):
        return [_arg(item, attributes) for item in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise ExportRefused("contract:graph_op", f"the forward passes a {type(value).__name__} to an operation, which the "
                        "scorer cannot encode (fixed shapes only: no symbolic sizes)")
