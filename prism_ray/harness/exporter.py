"""The exporter: a sandboxed process beside architecture.py (never training.py) that turns the miner's model into
data. It builds the model under the forced seed, materialises lazy parameters, reports the state layout, and once
the trainer has said its batch geometry exports the eval-mode forward at exactly that [B, L] (graph/export.py).
The graph, the initial state and the constants go to the parent in a memfd; the parent hands them to the trusted
scorer only after this process has exited. Nothing here is trusted: the scorer checks it all again.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

import torch

from prism_ray.graph.export import ExportRefused, export_forward
from prism_ray.harness import layout, shared_state
from prism_ray.harness.context import RunError, count_parameters, force_seed
from prism_ray.harness.protocol import Channel, Kind, parse_json

LAZY_SEQ_LEN = 64  # the dummy forward that materialises lazy parameters

_HINT = ("the scored forward is the model's eval-mode forward exported with torch.export at the run's fixed "
         "[batch_size, seq_len] (docs/miner.md, \"What is scored\"): keep shapes fixed, do not branch in Python on "
         "tensor values (.item(), .tolist(), `if x.sum() > 0`) — use torch.where or torch.cond — and keep Python-side "
         "state out of forward")
_DATA_DEPENDENT_HINT = ("the forward branches on a tensor's value or makes a shape from one: use torch.where or "
                        "torch.cond, and shapes that depend only on [batch_size, seq_len]")


class Exporter:
    def __init__(self, channel: Channel, spec: dict, builder: Callable[..., Any], context: Any):
        self.channel = channel
        self.spec = spec
        self.builder = builder
        self.ctx = context

    def fail(self, rule: str, message: str, file: str | None = None, line: int | None = None) -> RunError:
        self.channel.send_json(Kind.ERROR, {"rule": rule, "message": message, "file": file, "line": line})
        return RunError(rule, message, reported=True)

    def run(self) -> bool:
        """False when the parent ended the run instead of asking for the export: it reads nothing more."""
        force_seed(self.spec["seed"])
        model = self.builder(self.ctx)
        if not isinstance(model, torch.nn.Module):
            raise self.fail("contract:build_model", f"build_model returned {type(model).__name__}, "
                            "not a torch.nn.Module")
        model = model.to("cpu").eval()
        seq_len = min(LAZY_SEQ_LEN, self.spec["max_seq_len"])
        generator = torch.Generator().manual_seed(self.spec["seed"])
        with torch.no_grad():  # lazy modules get their parameters on a first call
            model(torch.randint(0, self.spec["vocab_size"], (2, seq_len), generator=generator))
        self.channel.send_json(Kind.LAYOUT, {"layout": shared_state.layout_of(model),
                                             "model_params": count_parameters(model)})
        if self.spec.get("scored", True):  # the contract check asks for the layout only
            _warm_up()  # while the trainer starts and asks for its geometry
        kind, payload = self.channel.recv()
        if kind == Kind.END:  # the trainer never reached iter_train_batches, or the run scores nothing
            return False
        if kind != Kind.EXPORT:
            raise self.fail("run:protocol", f"unexpected frame {kind.name} from the parent")
        request = parse_json(payload)
        tensors = shared_state.state_tensors(model)
        with torch.no_grad():  # the trainer's dtype casts before iter_train_batches are part of its init
            for (_, tensor), (_, _, dtype) in zip(tensors, request["layout"], strict=True):
                tensor.data = tensor.data.to(getattr(torch, dtype))
        tokens = torch.randint(0, self.spec["vocab_size"], (request["batch_size"], request["seq_len"]),
                               generator=generator)
        try:
            file, constants = export_forward(model, tokens, {id(tensor): name for name, tensor in tensors})
        except ExportRefused as error:
            raise self.fail(error.rule, error.message) from None
        except Exception as error:  # noqa: BLE001 — torch.export's refusal, pointed at the miner's line
            where, line = _miner_frame(error, self.spec["bundle_dir"])
            data_dependent = "data-dependent" in str(error) or "data dependent" in str(error)
            raise self.fail("contract:not_exportable", f"torch.export could not trace the forward: "
                            f"{type(error).__name__}: {_first_lines(str(error))}. Hint: "
                            f"{_DATA_DEPENDENT_HINT if data_dependent else _HINT}", where, line) from None
        slots, nbytes = layout.plan_slots(request["layout"])
        blob = layout.new_memfd("prism-graph", nbytes + sum(c.nbytes for c in file.constants))
        try:
            flat = shared_state.map_memfd(blob, nbytes, writable=True)
            with torch.no_grad():
                for (_, tensor), view in zip(tensors, shared_state.views(flat, slots), strict=True):
                    view.copy_(tensor)
            for spec, value in zip(file.constants, constants, strict=True):
                os.pwrite(blob, value.view(-1).view(torch.uint8).numpy().tobytes(), nbytes + spec.offset)
            self.channel.send(Kind.GRAPH, file.model_dump_json().encode(), fds=(blob,))
        finally:
            os.close(blob)
        return True


def _warm_up() -> None:
    """torch.export's first call in a process costs seconds of set-up whatever it traces: pay it on a module of our
    own, off the critical path (the real export then takes about a fifth of the time)."""
    tiny = torch.nn.Sequential(torch.nn.Embedding(4, 4), torch.nn.Linear(4, 4)).eval()
    names = {id(tensor): name for name, tensor in shared_state.state_tensors(tiny)}
    export_forward(tiny, torch.zeros(1, 2, dtype=torch.long), names)


def _miner_frame(error: BaseException, bundle_dir: str) -> tuple[str | None, int | None]:
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename.startswith(bundle_dir + os.sep):
            return os.path.relpath(frame.filename, bundle_dir), frame.lineno
    return None, None


def _first_lines(text: str, lines: int = 6, limit: int = 1500) -> str:
    return "\n".join(text.strip().splitlines()[:lines])[:limit]
