"""What the miner's code sees inside the runner: `ctx`, the scored batches, the PRISM interface module.

This module runs in the untrusted process. The loss functions are bound here, at import, before any
miner module is imported, so later monkeypatching of `torch.nn.functional` cannot reach them; each
batch's loss record is sent to the parent before the batch is handed to the miner.
"""

from __future__ import annotations

import io
import math
import random
import sys
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prism_ray.harness.protocol import Channel, Kind, parse_batch, parse_json

# Bound before miner import (DESIGN §6): the scoring arithmetic calls these originals, so a later
# monkeypatch of torch cannot change a recorded loss; the integrity check below also reports the attempt.
_cross_entropy = torch.nn.functional.cross_entropy
_Tensor = torch.Tensor
_float32 = torch.float32
_float64 = torch.float64
_item, _detach, _to, _reshape, _narrow = _Tensor.item, _Tensor.detach, _Tensor.to, _Tensor.reshape, _Tensor.narrow
_div = torch.div
_float, _getattr, _type = float, getattr, type
_save, _load = torch.save, torch.load

_GUARDED = (
    (torch.Tensor, ("item", "detach", "to", "reshape", "narrow", "float", "__getitem__", "__truediv__", "sum",
                    "unfold", "contiguous", "backward")),
    (torch, ("div", "where", "log_softmax", "randint", "arange", "from_numpy", "set_grad_enabled",
             "get_rng_state", "set_rng_state")),
    (torch.nn.functional, ("cross_entropy", "log_softmax", "nll_loss")),
    (torch.nn.Module, ("__call__", "parameters")),
)
_SNAPSHOT = tuple((owner, name, getattr(owner, name)) for owner, names in _GUARDED for name in names)


def tampered_with() -> str | None:
    """The first harness-critical torch attribute that no longer is what it was at import, if any."""
    for owner, name, original in _SNAPSHOT:
        if _getattr(owner, name, None) is not original:
            return f"{_getattr(owner, '__name__', 'torch')}.{name}"
    return None


class RunError(Exception):
    """A typed failure raised inside the runner; the parent is told before the miner can catch it."""

    def __init__(self, rule: str, message: str, reported: bool = False):
        super().__init__(f"[{rule}] {message}")
        self.rule = rule
        self.message = message
        self.reported = reported


def force_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def force_determinism() -> None:
    # torch.use_deterministic_algorithms would also import torch._inductor's config (about 1 s of CPU per runner,
    # as much as torch itself); compiled code gets the same flag from TORCHINDUCTOR_DETERMINISTIC=1 (runner_env).
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@dataclass
class PrismBatch:
    """One scored batch. `tokens` is [B, L]; with `with_logits=True` the harness forward's `logits`
    ([B, L, V]) and `loss` (mean next-token cross-entropy) carry their autograd graph."""

    tokens: torch.Tensor
    index: int
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[:, 1:]

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]


@dataclass(frozen=True)
class TrainingRecipe:
    """Kept for PRISM v2 bundles that import it; prism-ray does not read it."""

    learning_rate: float = 3e-4
    batch_size: int = 8
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    weight_decay: float = 0.01


class Harness:
    """Runner-side state behind `ctx`: the channel, the forced build and the one scored stream."""

    def __init__(self, channel: Channel, spec: dict):
        self.channel = channel
        self.spec = spec
        self.builder: Callable[..., Any] | None = None
        self.built: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self.scored_model: torch.nn.Module | None = None
        self.stream_started = False
        self.stream_finished = False

    def fail(self, rule: str, message: str) -> RunError:
        self.channel.send_json(Kind.ERROR, {"rule": rule, "message": message})
        return RunError(rule, message, reported=True)

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
        if tokenizer is not None and tokenizer != self.spec["tokenizer"]:
            raise self.fail("contract:tokenizer", f"iter_train_batches(tokenizer={tokenizer!r}) does not match "
                            f"the bundle's tokenizer {self.spec['tokenizer']!r} (set it in prism.yaml)")
        built = self.unwrap(model)
        if built is None:
            raise self.fail("run:model_identity", "the model passed to iter_train_batches must be the one "
                            "returned by ctx.build_model() (wrappers such as DDP or torch.compile are fine)")
        self.scored_model = built
        seq_len = self.spec["max_seq_len"] if seq_len is None else seq_len
        self.channel.send_json(Kind.GEOMETRY, {"batch_size": batch_size, "seq_len": seq_len,
                                               "with_logits": bool(with_logits)})
        return self._batches(model, built, with_logits)

    def _batches(self, model: Any, built: torch.nn.Module, with_logits: bool) -> Iterator[PrismBatch]:
        vocab_size = self.spec["vocab_size"]
        first = True
        while True:
            kind, payload = self.channel.recv()
            if kind == Kind.END:
                self.stream_finished = True
                return
            if kind == Kind.REFUSE:
                reason = parse_json(payload)
                raise RunError(reason["rule"], reason["message"], reported=True)
            if kind != Kind.BATCH:
                raise self.fail("run:protocol", f"unexpected frame {kind.name} from the parent")
            index, batch_size, seq_len, chunk, probe = parse_batch(payload)
            flat = torch.from_numpy(chunk.astype(np.int64))
            tokens = flat.unfold(0, seq_len, seq_len - 1).contiguous().to(_device_of(built, self.spec["device"]))
            batch = PrismBatch(tokens=tokens, index=index)
            nats = self._score(model, batch, vocab_size, with_logits, probe)
            self.channel.send_record(index, nats if math.isfinite(nats) else 0.0, math.isfinite(nats))
            if first:
                first = False
                self._check_size(built)
            yield batch
            self.channel.send(Kind.NEXT)

    def _check_size(self, built: torch.nn.Module) -> int:
        params = count_parameters(built)
        self.channel.send_json(Kind.INFO, {"model_params": params})
        if params > self.spec["max_params"]:
            raise self.fail("contract:param_cap", f"the model has {params:,} parameters, over the cap of "
                            f"{self.spec['max_params']:,}")
        return params

    def _forward(self, model: Any, tokens: torch.Tensor, vocab_size: int, with_grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(with_grad):
            return self._logits(model(tokens), tokens.shape, vocab_size)

    def _score(self, model: Any, batch: PrismBatch, vocab_size: int, with_logits: bool, probe: int = -1) -> float:
        """Σ −ln p(target) over the batch's B·(L−1) targets, in float32 or wider."""
        self._check_integrity()
        rng = _rng_state() if probe >= 0 else None
        logits = self._forward(model, batch.tokens, vocab_size, with_logits)
        if rng is not None:
            self._causality_probe(model, batch.tokens, logits, vocab_size, with_logits, probe, rng)
        length = batch.tokens.shape[1] - 1
        predicted = _reshape(_narrow(logits, 1, 0, length), (-1, logits.shape[-1]))
        if predicted.dtype not in (_float32, _float64):
            predicted = _to(predicted, _float32)
        targets = _reshape(_narrow(batch.tokens, 1, 1, length), (-1,))
        summed = _cross_entropy(predicted, targets, reduction="sum")
        if with_logits:
            batch.logits = logits
            batch.loss = _div(summed, predicted.shape[0])
        nats = _float(_item(_to(_detach(summed), _float64)))
        self._check_integrity()
        return nats

    def _check_integrity(self) -> None:
        patched = tampered_with()
        if patched is not None:
            raise self.fail("run:tampering", f"{patched} was replaced at run time; the harness and torch must not "
                            "be monkeypatched")

    def _causality_probe(self, model: Any, tokens: torch.Tensor, logits: torch.Tensor, vocab_size: int,
                         with_grad: bool, position: int, rng: tuple) -> None:
        """Perturb every stream position ≥ p (later rows included) and require the same predictions before p,
        under the RNG state of the scoring forward (so dropout masks match)."""
        batch_size, seq_len = tokens.shape
        stream_index = (torch.arange(batch_size, device=tokens.device)[:, None] * (seq_len - 1)
                        + torch.arange(seq_len, device=tokens.device)[None, :])
        future = stream_index >= position
        shift = torch.randint(1, vocab_size, tokens.shape, generator=torch.Generator().manual_seed(position))
        perturbed = torch.where(future, (tokens + shift.to(tokens.device)) % vocab_size, tokens)
        after = _rng_state()
        _set_rng_state(rng)
        probed = self._forward(model, perturbed, vocab_size, with_grad).detach()
        _set_rng_state(after)
        clean = ~future
        reference = torch.log_softmax(logits.detach()[clean].to(_float32), dim=-1)
        candidate = torch.log_softmax(probed[clean].to(_float32), dim=-1)
        tolerance = 1e-3 if logits.dtype in (_float32, _float64) else 5e-2
        drift = float((reference - candidate).abs().max()) if reference.numel() else 0.0
        if not drift <= tolerance:
            raise self.fail("run:non_causal", f"predictions at stream positions before {position} changed by "
                            f"{drift:.3g} when later tokens changed: the model sees the future (attention mask, "
                            f"shifts, cross-row mixing or batch statistics)")

    def _logits(self, output: Any, shape: torch.Size, vocab_size: int) -> torch.Tensor:
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        elif not isinstance(output, _Tensor) and hasattr(output, "logits"):
            output = output.logits
        if type(output) is not _Tensor:
            raise self.fail("run:bad_logits", f"the model must return a plain torch.Tensor of logits, got "
                            f"{type(output).__module__}.{type(output).__qualname__}")
        batch_size, seq_len = shape
        if output.dim() != 3 or output.shape[0] != batch_size or output.shape[1] != seq_len \
                or output.shape[2] < vocab_size:
            raise self.fail("run:bad_logits", f"logits must have shape [{batch_size}, {seq_len}, ≥{vocab_size}], "
                            f"got {list(output.shape)}")
        if not output.is_floating_point():
            raise self.fail("run:bad_logits", f"logits must be floating point, got {output.dtype}")
        return output

    def send_state(self) -> None:
        """Hand the scored model's trained weights to the parent, which writes them for the held-out pass."""
        if not self.stream_finished or self.scored_model is None:
            return
        buffer = io.BytesIO()
        _save({k: _detach(v).cpu() for k, v in self.scored_model.state_dict().items()}, buffer)
        self.channel.send(Kind.STATE, buffer.getvalue())

    def evaluate_heldout(self, ctx: Any) -> None:
        """Score parent-sent batches with the trained model (flag 1) or its true step-0 twin (flag 0): both
        built by build_model under the forced seed, the trained one loaded with weights_only=True."""
        twin = self.build(ctx)
        trained = self.build(ctx)
        trained.load_state_dict(_load(self.spec["state_path"], map_location="cpu", weights_only=True))
        device = torch.device(self.spec["device"])
        models = {0: twin.to(device).eval(), 1: trained.to(device).eval()}
        vocab_size = self.spec["vocab_size"]
        while True:
            kind, payload = self.channel.recv()
            if kind == Kind.END:
                return
            if kind != Kind.BATCH:
                raise self.fail("run:protocol", f"unexpected frame {kind.name} from the parent")
            index, batch_size, seq_len, chunk, which = parse_batch(payload)
            tokens = torch.from_numpy(chunk.astype(np.int64)).unfold(0, seq_len, seq_len - 1).contiguous()
            with torch.no_grad():
                nats = self._score(models[which], PrismBatch(tokens=tokens.to(device), index=index), vocab_size,
                                   with_logits=False)
            self.channel.send_record(index, nats if math.isfinite(nats) else 0.0, math.isfinite(nats))

    def probe_model(self, ctx: Any) -> None:
        """Instantiate the architecture under the forced seed, materialise lazy parameters with a dummy
        forward, count parameters and check causality — before any training or data."""
        model = self.build(ctx)
        seq_len = min(64, self.spec["max_seq_len"])
        generator = torch.Generator().manual_seed(self.spec["seed"])
        tokens = torch.randint(0, self.spec["vocab_size"], (2, seq_len), generator=generator)
        tokens = tokens.to(_device_of(model, self.spec["device"]))
        rng = _rng_state()
        logits = self._forward(model, tokens, self.spec["vocab_size"], False)
        self._check_size(model)
        self._causality_probe(model, tokens, logits, self.spec["vocab_size"], False, seq_len // 2, rng)


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _device_of(model: torch.nn.Module, default: str) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device(default)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def make_context_class(harness: Harness) -> type:
    """The PrismContext the miner sees, bound to this run's harness."""

    @dataclass(frozen=True)
    class PrismContext:
        vocab_size: int
        sequence_length: int
        max_parameters: int
        seed: int
        device: str
        rank: int
        local_rank: int
        world_size: int
        byte_budget: int
        artifacts_dir: str
        data_dir: str
        tokenizer: str

        @property
        def max_seq_len(self) -> int:
            return self.sequence_length

        @property
        def max_params(self) -> int:
            return self.max_parameters

        def build_model(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
            return harness.build(self, *args, **kwargs)

        def iter_train_batches(self, model: Any, batch_size: int = 8, seq_len: int | None = None,
                               tokenizer: str | None = None, with_logits: bool = False) -> Iterator[PrismBatch]:
            return harness.stream(model, batch_size, seq_len, tokenizer, with_logits)

        def reference_tokenizer(self, name: str | None = None) -> Any:
            from prism_ray.data.tokenizers import get_tokenizer

            return get_tokenizer(name or self.tokenizer)

    return PrismContext


def install_interface(context_class: type) -> None:
    """Make `from prism_challenge.evaluator.interface import PrismContext` work unchanged."""
    interface = types.ModuleType("prism_challenge.evaluator.interface")
    interface.PrismContext = context_class
    interface.PrismBatch = PrismBatch
    interface.TrainingRecipe = TrainingRecipe
    package = types.ModuleType("prism_challenge")
    package.__path__ = []
    evaluator = types.ModuleType("prism_challenge.evaluator")
    evaluator.__path__ = []
    evaluator.interface = interface
    package.evaluator = evaluator
    sys.modules.update({"prism_challenge": package, "prism_challenge.evaluator": evaluator,
                        "prism_challenge.evaluator.interface": interface})
