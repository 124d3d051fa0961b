"""The scorer: the sandboxed process that computes every number a score rests on. It never imports training.py.

It builds the architecture under the forced seed (the instantiation probe: parameter cap, lazy parameters, a first
causality check), maps the trainer's shared state read-only, and per batch: copies that state into private memory
(the snapshot, before the trainer may see the batch), scores the batch on the snapshot in eval mode and reports
Σ −ln p(target). For causality probes it stages the snapshot for the prober, a process forked from it at start
that only ever sees probe inputs, never the real future. After the trainer has exited it runs the held-out
passes: the trained state and the true step-0 state (the snapshot the first batch was scored on).
See docs/architecture.md, "Trust boundaries".
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prism_ray.harness import cuda_ipc, layout, shared_state
from prism_ray.harness.context import RunError, count_parameters, device_of, force_seed, logits_of, rows
from prism_ray.harness.probes import causality_tolerance, non_causal_message
from prism_ray.harness.protocol import Channel, Kind, parse_batch, parse_json

PROBE_SEQ_LEN = 64
_SOFTMAX_BYTES = 256 << 20  # rows of logits turned into log-probs at once


def target_log_probs(model: torch.nn.Module, tokens: torch.Tensor, vocab_size: int,
                     targets: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target) at every position of [B, L] tokens → [B, L−1], in float32 or wider (float64 logits stay
    float64); the targets are the tokens' own next tokens unless given. A few rows at a time: a [B, L, V] float32
    softmax at once can need gigabytes for GPT-2's vocabulary."""
    targets = tokens[:, 1:] if targets is None else targets
    with torch.no_grad():
        logits = logits_of(model(tokens), tokens.shape, vocab_size)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        batch, length, vocab = logits.shape
        rows_at_once = max(1, _SOFTMAX_BYTES // (length * vocab * dtype.itemsize))
        out = torch.empty(batch, length - 1, dtype=dtype, device=tokens.device)
        for first in range(0, batch, rows_at_once):
            chunk = slice(first, first + rows_at_once)
            predicted = logits[chunk, :-1].to(dtype).reshape(-1, vocab)
            out[chunk] = -F.cross_entropy(predicted, targets[chunk].reshape(-1), reduction="none").view(-1, length - 1)
    return out


class Scorer:
    def __init__(self, channel: Channel, spec: dict, builder: Callable[..., Any], context: Any):
        self.channel = channel
        self.spec = spec
        self.builder = builder
        self.ctx = context
        self.device = torch.device(spec["device"])
        self.vocab_size = spec["vocab_size"]

    def fail(self, rule: str, message: str) -> RunError:
        self.channel.send_json(Kind.ERROR, {"rule": rule, "message": message})
        return RunError(rule, message, reported=True)

    def build(self) -> torch.nn.Module:
        force_seed(self.spec["seed"])
        model = self.builder(self.ctx)
        if not isinstance(model, torch.nn.Module):
            raise self.fail("contract:build_model", f"build_model returned {type(model).__name__}, "
                            "not a torch.nn.Module")
        return model.to(self.device).eval()

    def run(self, probe_fd: int) -> None:
        model = self.probe_model()
        self.channel.send_json(Kind.LAYOUT, {"layout": shared_state.layout_of(model)})
        kind, payload = self.channel.recv()
        if kind == Kind.END:  # the trainer never reached iter_train_batches
            return
        if kind != Kind.SHARE:
            raise self.fail("run:protocol", f"unexpected frame {kind.name} from the parent")
        share = parse_json(payload)
        slots, nbytes = layout.plan_slots(share["layout"])
        exported: list[int] = []  # descriptors of the GPU buffers this process shares (through the parent)
        if share["where"] == "memfd":
            shared = shared_state.map_memfd(self.channel.take_fd(), nbytes, writable=False)
        else:
            shared, fd = cuda_ipc.allocate(nbytes, self.device)
            shared.zero_()
            exported.append(fd)
        step0 = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        shared_state.bind(model, slots, step0)  # the forced init, in the trainer's dtypes: the step-0 twin's state
        private = torch.empty_like(step0)
        shared_state.bind(model, slots, private, copy=False)
        if self.device.type == "cuda":
            staged, fd = cuda_ipc.allocate(nbytes, self.device)
            exported.append(fd)
        else:
            os.ftruncate(probe_fd, nbytes)  # the memfd the prober inherited; the trainer never receives it
            staged = shared_state.map_memfd(probe_fd, nbytes, writable=True)
        self.channel.send_json(Kind.READY, {"shares_state": share["where"] != "memfd",
                                            "shares_probe": staged.is_cuda}, fds=tuple(exported))
        for fd in exported:
            os.close(fd)
        if self._stream(model, shared, private, step0, staged, slots):
            self._heldout(model, shared, private, step0, slots)

    def _stream(self, model: torch.nn.Module, shared: torch.Tensor, private: torch.Tensor, step0: torch.Tensor,
                staged: torch.Tensor, slots: list[layout.Slot]) -> bool:
        """Snapshot, score and stage probes until the parent says FINAL (True: held-out follows) or END."""
        last: tuple[int, torch.Tensor] | None = None
        while True:
            kind, payload = self.channel.recv()
            if kind == Kind.SNAPSHOT:
                private.copy_(shared)
                if last is None:  # the first batch is scored on the forced init, nothing else
                    self._check_init(private, step0, slots)
                _synchronize(private)
                self.channel.send(Kind.SNAPPED, payload)
            elif kind == Kind.BATCH:
                index, _, seq_len, chunk, _ = parse_batch(payload)
                torch.manual_seed(self.spec["seed"] + index)  # anything random in an eval forward repeats in an audit
                log_probs = target_log_probs(model, rows(chunk, seq_len).to(self.device), self.vocab_size)
                nats = -float(log_probs.double().sum())
                self.channel.send_record(index, nats if math.isfinite(nats) else 0.0, math.isfinite(nats))
                last = (index, log_probs)
            elif kind == Kind.PROBE:
                request = parse_json(payload)
                if last is None or last[0] != request["index"]:
                    raise self.fail("run:protocol", "probe of a batch the scorer does not hold")
                staged.copy_(private)
                _synchronize(staged)
                for row in request["rows"]:
                    self.channel.send_row(last[0], row, last[1][row].cpu().numpy())
            elif kind in (Kind.FINAL, Kind.END):
                return kind == Kind.FINAL
            else:
                raise self.fail("run:protocol", f"unexpected frame {kind.name} from the parent")

    def _check_init(self, private: torch.Tensor, step0: torch.Tensor, slots: list[layout.Slot]) -> None:
        if torch.equal(private, step0):
            return
        changed = next(slot.name for slot, mine, theirs in zip(slots, shared_state.views(step0, slots),
                                                               shared_state.views(private, slots), strict=True)
                       if not torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8)))
        raise self.fail("run:init_changed", f"`{changed}` differs from a fresh ctx.build_model() when the first batch "
                        "is scored: every run starts from the forced random init. Initialise weights (and buffers: "
                        "torch.zeros, not torch.empty) in build_model, not in training.py; converting dtype or "
                        "device before iter_train_batches is fine")

    def _heldout(self, model: torch.nn.Module, shared: torch.Tensor, private: torch.Tensor, step0: torch.Tensor,
                 slots: list[layout.Slot]) -> None:
        """The trainer has exited: score parent-sent batches with its final state (aux 1) or step-0 state (aux 0)."""
        private.copy_(shared)
        twin = self.build()
        shared_state.bind(twin, slots, step0, copy=False)
        models = {0: twin, 1: model}
        self.channel.send(Kind.READY)
        while True:
            kind, payload = self.channel.recv()
            if kind == Kind.END:
                return
            if kind != Kind.BATCH:
                raise self.fail("run:protocol", f"unexpected frame {kind.name} from the parent")
            index, _, seq_len, chunk, which = parse_batch(payload)
            log_probs = target_log_probs(models[which], rows(chunk, seq_len).to(self.device), self.vocab_size)
            nats = -float(log_probs.double().sum())
            self.channel.send_record(index, nats if math.isfinite(nats) else 0.0, math.isfinite(nats))

    def probe_model(self) -> torch.nn.Module:
        """Instantiate the architecture under the forced seed, materialise lazy parameters with a dummy forward,
        count parameters and check causality on random tokens — before any data."""
        model = self.build()
        seq_len = min(PROBE_SEQ_LEN, self.spec["max_seq_len"])
        generator = torch.Generator().manual_seed(self.spec["seed"])
        tokens = torch.randint(0, self.vocab_size, (2, seq_len), generator=generator).to(device_of(model, "cpu"))
        clean = target_log_probs(model, tokens, self.vocab_size)
        params = count_parameters(model)
        self.channel.send_json(Kind.INFO, {"model_params": params})
        if params > self.spec["max_params"]:
            raise self.fail("contract:param_cap", f"the model has {params:,} parameters, over the cap of "
                            f"{self.spec['max_params']:,}")
        boundary = seq_len // 2
        perturbed = tokens.clone()
        perturbed[:, boundary:] = (tokens[:, boundary:] + 1) % self.vocab_size
        perturbed[1] = (tokens[1] + 7) % self.vocab_size  # a different later row: rows must not mix either
        probed = target_log_probs(model, perturbed, self.vocab_size, targets=tokens[:, 1:])
        drift = float((clean[0, :boundary] - probed[0, :boundary]).abs().max())
        if not drift <= causality_tolerance([str(p.dtype) for p in model.parameters()], self.device.type):
            raise self.fail("run:non_causal", non_causal_message(boundary, drift))
        return model


def _synchronize(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()


def run_prober(channel: Channel, spec: dict, builder: Callable[..., Any], context: Any, probe_fd: int) -> None:
    """The forked prober: the model on staged snapshots, one probe row at a time; never a real batch."""
    device = torch.device(spec["device"])
    vocab_size = spec["vocab_size"]
    kind, payload = channel.recv()
    if kind == Kind.END:
        return
    if kind != Kind.SHARE:
        raise RunError("run:protocol", f"unexpected frame {kind.name} for the prober")
    share = parse_json(payload)
    slots, nbytes = layout.plan_slots(share["layout"])
    if share["where"] == "cuda":
        staged = cuda_ipc.open_fd(channel.take_fd(), nbytes, device)
    else:
        staged = shared_state.map_memfd(probe_fd, nbytes, writable=False)
    force_seed(spec["seed"])
    model = builder(context).to(device).eval()
    shared_state.bind(model, slots, staged, copy=False)
    channel.send(Kind.READY)
    while True:
        kind, payload = channel.recv()
        if kind == Kind.END:
            return
        if kind != Kind.BATCH:
            raise RunError("run:protocol", f"unexpected frame {kind.name} for the prober")
        index, row, seq_len, chunk, boundary = parse_batch(payload)
        tokens = torch.from_numpy(chunk[:seq_len].astype(np.int64))[None].to(device)
        # targets before the boundary: the input's own next tokens, then the real token AT the boundary (the input
        # holds filler there), so a model that peeks past the boundary is compared on what it would have seen
        targets = torch.from_numpy(np.append(chunk[1:boundary], chunk[seq_len]).astype(np.int64)).to(device)
        with torch.no_grad():
            logits = logits_of(model(tokens), tokens.shape, vocab_size)[0, :boundary]
            log_probs = -F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                                         reduction="none")
        channel.send_row(index, row, log_probs.cpu().numpy())
