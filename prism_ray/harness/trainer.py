"""The trainer's side of the harness: what `ctx` does inside the process that runs training.py.

Nothing computed here decides a score (docs/architecture.md, "Trust boundaries"): the miner's code may rewrite any
of it. This module only serves the miner: it hands batches over as the scorer releases them, shares the scored
model's parameters with the scorer (shared_state.py) and, with `with_logits=True`, runs a forward with its autograd
graph so the miner can backprop without writing the loss.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from prism_ray.harness import cuda_ipc, landlock, layout, shared_state
from prism_ray.harness.context import PrismBatch, RunError, device_of, force_seed, logits_of, rows
from prism_ray.harness.handoff import CudaOps, TrainerHandoff
from prism_ray.harness.protocol import Channel, Kind, parse_batch, parse_json

_cross_entropy = torch.nn.functional.cross_entropy  # bound before miner import, for with_logits


class TrainerHarness:
    """Runner-side state behind `ctx` in the trainer: the channel, the forced build and the one stream."""

    def __init__(self, channel: Channel, spec: dict):
        self.channel = channel
        self.spec = spec
        self.builder: Callable[..., Any] | None = None
        self.built: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self.stream_started = False
        self.stream_finished = False

    def fail(self, rule: str, message: str) -> RunError:
        self.channel.send_json(Kind.ERROR, {"rule": rule, "message": message})
        return RunError(rule, message, reported=True)

    def guard_artifacts(self) -> None:
        """Ranks other than 0 may not write into the artifacts dir (they share it with rank 0 in one sandbox).
        Before any miner module is imported: Landlock lets this process write only beneath a scratch dir of its own
        (its TMPDIR) and /dev, and an audit hook refuses Python-level writes into the artifacts dir with a typed
        reason at once (docs/rules.md, "Several ranks")."""
        root = os.path.abspath(self.spec["artifacts_dir"])
        scratch = tempfile.mkdtemp(prefix=f"prism-rank{self.spec['rank']}-")
        os.environ["TMPDIR"] = tempfile.tempdir = scratch
        self.spec["landlock"] = landlock.confine_writes([scratch, "/dev"])
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        changes = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.truncate",
                   "os.chmod", "os.utime", "shutil.copyfile", "shutil.move"}
        reported: list[bool] = []

        def inside(path: Any) -> bool:
            if isinstance(path, int) or path is None:
                return False
            try:
                full = os.path.abspath(os.fsdecode(path))
            except (TypeError, ValueError):
                return False
            return full == root or full.startswith(root + os.sep)

        def hook(event: str, args: tuple) -> None:
            if event == "open":
                path, mode, flags = args
                writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & writes)
                if not (writing and inside(path)):
                    return
            elif event in changes:
                if not any(inside(arg) for arg in args[:2]):
                    return
            else:
                return
            message = (f"rank {self.spec['rank']} wrote into the artifacts dir ({event}): only rank 0 may write "
                       "artifacts; guard saves with `if ctx.rank == 0:`")
            if not reported:
                reported.append(True)
                self.channel.send_json(Kind.ERROR, {"rule": "run:artifacts_rank", "message": message})
            raise RunError("run:artifacts_rank", message, reported=True)

        sys.addaudithook(hook)

    def build(self, ctx: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
        assert self.builder is not None
        force_seed(self.spec["seed"])
        model = self.builder(ctx, *args, **kwargs)
        if not isinstance(model, torch.nn.Module):
            raise self.fail("contract:build_model", f"build_model returned {type(model).__name__}, "
                            "not a torch.nn.Module")
        self.built.add(model)
        return model

    def wrap_builder(self, builder: Callable[..., Any]) -> Callable[..., Any]:
        """Every call of the architecture's build_model, however it is reached, runs under the forced seed."""
        self.builder = builder

        def build_model(ctx: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
            return self.build(ctx, *args, **kwargs)

        build_model.__name__ = getattr(builder, "__name__", "build_model")
        build_model.__doc__ = builder.__doc__
        return build_model

    def unwrap(self, model: Any) -> Any:
        # DDP keeps the model in .module, torch.compile in ._orig_mod: both wrap a built model.
        for _ in range(4):
            if model in self.built:
                return model
            inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
            if inner is None:
                break
            model = inner
        return model if model in self.built else None

    def stream(self, model: Any, batch_size: int, seq_len: int | None, tokenizer: str | None,
               with_logits: bool) -> Iterator[PrismBatch]:
        if self.stream_started:
            raise self.fail("run:stream_reused", "ctx.iter_train_batches may be called once per run")
        self.stream_started = True
        if tokenizer is not None and not isinstance(tokenizer, str):  # ctx.reference_tokenizer(...), as upstream
            tokenizer = getattr(tokenizer, "name", tokenizer)
        if tokenizer is not None and tokenizer != self.spec["tokenizer"]:
            raise self.fail("contract:tokenizer", f"iter_train_batches(tokenizer={tokenizer!r}) does not match "
                            f"the bundle's tokenizer {self.spec['tokenizer']!r} (set it in prism.yaml)")
        built = self.unwrap(model)
        if built is None:
            raise self.fail("run:model_identity", "the model passed to iter_train_batches must be the one "
                            "returned by ctx.build_model() (wrappers such as DDP or torch.compile are fine)")
        seq_len = self.spec["max_seq_len"] if seq_len is None else seq_len
        self.channel.send_json(Kind.GEOMETRY, {"batch_size": batch_size, "seq_len": seq_len,
                                               "with_logits": bool(with_logits),
                                               "layout": shared_state.layout_of(built),
                                               "device": str(device_of(built, self.spec["device"]))})
        flat, slots, handoff, batches = self._share(built)
        return self._batches(model, built, flat, slots, handoff, batches, with_logits)

    def _share(self, built: torch.nn.Module) -> tuple[torch.Tensor, list[layout.Slot], TrainerHandoff | None, Channel]:
        """Move the model's state into the buffer the scorer reads (the parent says where it lives); the GPU
        hand-off's buffer (docs/architecture.md, "The GPU hand-off") and the batch channel to the scorer come with
        it."""
        kind, payload = self.channel.recv()
        if kind == Kind.REFUSE:
            reason = parse_json(payload)
            raise RunError(reason["rule"], reason["message"], reported=True)
        if kind != Kind.SHARE:
            raise self.fail("run:protocol", f"unexpected frame {kind.name} from the parent")
        share = parse_json(payload)
        slots, nbytes = layout.plan_slots(share["layout"])
        if share["where"] == "memfd":
            flat = shared_state.map_memfd(self.channel.take_fd(), nbytes, writable=True)
        else:
            flat = cuda_ipc.open_fd(self.channel.take_fd(), nbytes, device_of(built, "cuda"))
        handoff = None
        if "handoff" in share:
            spec = layout.HandoffSpec.model_validate(share["handoff"])
            if not flat.is_cuda:
                raise self.fail("run:protocol", "the GPU hand-off was offered for weights that are not on a GPU")
            handoff = TrainerHandoff(CudaOps(), cuda_ipc.open_fd(self.channel.take_fd(), spec.nbytes, flat.device),
                                     spec)
        batches = Channel(socket.socket(fileno=self.channel.take_fd()))
        shared_state.bind(built, slots, flat)
        self.channel.send(Kind.READY)
        return flat, slots, handoff, batches

    def _batches(self, model: Any, built: torch.nn.Module, flat: torch.Tensor, slots: list[layout.Slot],
                 handoff: TrainerHandoff | None, batches: Channel, with_logits: bool) -> Iterator[PrismBatch]:
        device = device_of(built, self.spec["device"])
        for request in itertools.count():
            if handoff is not None:  # instead of a host sync: the scorer's GPU waits for this rank's step
                handoff.asking(request)
            batches.send(Kind.NEXT)
            kind, payload = batches.recv()
            if kind == Kind.END:
                self.stream_finished = True
                return
            if kind != Kind.BATCH:
                raise self.fail("run:protocol", f"unexpected frame {kind.name} from the scorer")
            index, batch_size, seq_len, chunk, _ = parse_batch(payload)
            if handoff is None:
                tokens = rows(chunk, seq_len).to(device, non_blocking=True)
            elif chunk.size or (batch_size, seq_len) != (handoff.spec.rows, handoff.spec.seq_len):
                raise self.fail("run:protocol", "a GPU hand-off batch header that does not match the hand-off")
            else:
                tokens = handoff.take(request)
            batch = PrismBatch(tokens=tokens, index=index)
            if with_logits:
                batch.logits = logits_of(model(tokens), tokens.shape, self.spec["vocab_size"])
                predicted = batch.logits[:, :-1].reshape(-1, batch.logits.shape[-1]).float()
                batch.loss = _cross_entropy(predicted, tokens[:, 1:].reshape(-1))
            yield batch
            moved = shared_state.bound(built, slots, flat)
            if moved is not None:
                raise self.fail("run:params_reallocated", f"`{moved}` was replaced by a new tensor during training "
                                "(e.g. `.data = …`, `.half()` or `.to(...)` after iter_train_batches). The scorer "
                                "reads the tensors iter_train_batches was given: update them in place, and convert "
                                "dtype or device before calling iter_train_batches")
            if flat.is_cuda and handoff is None:
                # The scorer copies the weights as soon as NEXT arrives: the step must have landed. (CUDA events
                # cannot cross the sandboxes' PID namespaces, so without the GPU hand-off this is the one host sync
                # per batch.)
                torch.cuda.current_stream(flat.device).synchronize()

