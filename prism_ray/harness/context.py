"""What miner code sees in a runner: `ctx`, the batches, the PRISM interface module, and the forced seed.

Used by the sandboxed processes that run miner code (the trainer runs training.py, the exporter only
architecture.py); nothing here decides a score: the trusted scorer runs the exported graph, and the trainer reports
nothing that counts (docs/architecture.md, "Trust boundaries").
"""

from __future__ import annotations

import random
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class RunError(Exception):
    """A typed failure raised inside a runner; `reported` when the parent was already told."""

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
    """One scored batch. `tokens` is [B, L]; with `with_logits=True` the trainer-side forward's `logits`
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


def rows(chunk: np.ndarray, seq_len: int) -> torch.Tensor:
    """The B·(L−1)+1 stream tokens of a batch as [B, L] rows that overlap by one token."""
    return torch.from_numpy(chunk.astype(np.int64)).unfold(0, seq_len, seq_len - 1).contiguous()


def device_of(model: torch.nn.Module, default: str) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device(default)


def logits_of(output: Any, shape: torch.Size, vocab_size: int) -> torch.Tensor:
    """The [B, L, ≥V] floating-point logits a model returned (a tuple's first item and `.logits` are accepted)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        output = output.logits
    if type(output) is not torch.Tensor:
        raise RunError("run:bad_logits", f"the model must return a plain torch.Tensor of logits, got "
                       f"{type(output).__module__}.{type(output).__qualname__}")
    batch_size, seq_len = shape
    if output.dim() != 3 or output.shape[0] != batch_size or output.shape[1] != seq_len or output.shape[2] < vocab_size:
        raise RunError("run:bad_logits", f"logits must have shape [{batch_size}, {seq_len}, ≥{vocab_size}], "
                       f"got {list(output.shape)}")
    if not output.is_floating_point():
        raise RunError("run:bad_logits", f"logits must be floating point, got {output.dtype}")
    return output


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def make_context_class(backend: Any) -> type:
    """The PrismContext the miner sees, bound to this runner's harness (`build`, `stream`)."""

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
            return backend.build(self, *args, **kwargs)

        def iter_train_batches(self, model: Any, batch_size: int = 8, seq_len: int | None = None,
                               tokenizer: str | None = None, with_logits: bool = False) -> Iterator[PrismBatch]:
            return backend.stream(model, batch_size, seq_len, tokenizer, with_logits)

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
