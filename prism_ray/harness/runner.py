"""Entry point of the sandboxed processes that run miner code: `python -m prism_ray.harness.runner SOCKET ROLE`.

ROLE `trainer` imports architecture.py and training.py and calls train(ctx); ROLE `exporter` imports architecture.py
only (its bundle copy has no training file) and exports the model's forward as a graph. Each connects to the
parent's socket, reads its spec, forces seed and deterministic flags BEFORE importing any miner module and installs
the PRISM interface. No runner reads data: every batch comes from the parent. The scorer, which runs no miner code,
has an entry point of its own (scorer.py).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import socket
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from prism_ray.harness.context import RunError, force_determinism, force_seed, install_interface, make_context_class
from prism_ray.harness.protocol import Channel, Kind, parse_json


def _import_file(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _module_name(path: str) -> str:
    """The name an import of the file would give it (`models/arch.py` → models.arch), which is the name the static
    policy resolves it by: under its bare stem it would shadow a top-level `arch.py` for every later import."""
    dotted = path[:-3].replace("/", ".") if path.endswith(".py") else path
    return dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted


def _check_names(bundle_dir: str) -> None:
    """A bundle module whose name the interpreter already holds would never be imported: `import cython_runtime`
    gets the loaded module, not the file the policy read (the policy refuses the names it finds installed)."""
    names = {entry.name[:-3] if entry.name.endswith(".py") else entry.name for entry in os.scandir(bundle_dir)
             if entry.name.endswith(".py") or entry.is_dir()}
    taken = sorted(name for name in names if name in sys.modules)
    if taken:
        raise RunError("contract:module_name", f"bundle module {', '.join(taken)} has the name of a module the "
                       "runner has already loaded, so importing it would not load your file; rename it")


def _miner_frame(tb: traceback.StackSummary, bundle_dir: str) -> tuple[str | None, int | None]:
    """The innermost frame inside the bundle: where the miner should look."""
    for frame in reversed(tb):
        if frame.filename.startswith(bundle_dir + os.sep):
            return os.path.relpath(frame.filename, bundle_dir), frame.lineno
    return None, None


def classify(error: BaseException) -> str:
    """Resource exhaustion gets its own rule so miners know which limit they hit."""
    text = str(error).lower()
    frames = "".join(traceback.format_tb(error.__traceback__))
    if isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return "run:out_of_memory"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "run:artifacts_quota"
    forking = "multiprocessing" in frames or (error.errno == errno.EAGAIN and "fork" in frames) \
        if isinstance(error, OSError) else False
    if forking:
        return "run:process_limit"
    return "run:exception"


_HINTS = {
    "run:process_limit": " (the sandbox runs no worker processes: use DataLoader(num_workers=0) — the stream is "
                         "already in memory — and no multiprocessing)",
    "run:artifacts_rank": " (ranks other than 0 may write only beneath their own TMPDIR; only rank 0 may write "
                          "ctx.artifacts_dir: guard saves with `if ctx.rank == 0:`)",
}


class _ExporterBackend:
    """What `ctx` does in the exporter: build_model only (architecture code must not stream or train)."""

    builder: Any = None

    def build(self, ctx: Any, *args: Any, **kwargs: Any) -> Any:
        return self.builder(ctx, *args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        raise RunError("run:forbidden_call", "ctx.iter_train_batches may only be called from training code")


def _device(requested: str, local_rank: int, world_size: int) -> str:
    import torch

    # Ray sets CUDA_VISIBLE_DEVICES to the run's GPUs: one per rank, rank r on the r-th
    if requested == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" or (requested.startswith("cuda") and world_size > 1):
        return f"cuda:{local_rank}"
    return requested


def _rank_env(spec: dict) -> None:
    """The torch.distributed environment of this rank, as torchrun sets it, before any miner code runs."""
    rank, world_size = int(spec.get("rank", 0)), int(spec.get("world_size", 1))
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0"})


def run(channel: Channel, spec: dict, role: str) -> int:
    if role == "trainer":
        _rank_env(spec)
    force_seed(spec["seed"])
    force_determinism()
    import torch

    torch.set_num_threads(max(1, spec["threads"]))
    spec["device"] = _device(spec["device"], int(os.environ.get("LOCAL_RANK", "0")) if role == "trainer" else 0,
                             int(spec.get("world_size", 1)))
    if spec["device"].startswith("cuda"):
        torch.cuda.set_device(torch.device(spec["device"]))
    bundle_dir = spec["bundle_dir"]
    channel.send_json(Kind.HELLO, {"role": role, "pid": os.getpid(), "torch": torch.__version__,
                                   "device": spec["device"]})
    try:
        if role == "trainer":
            from prism_ray.harness.trainer import TrainerHarness

            backend: Any = TrainerHarness(channel, spec)
            if int(spec.get("rank", 0)) > 0:
                backend.guard_artifacts()
        else:
            backend = _ExporterBackend()
        ctx = _context(spec, backend)  # the PRISM interface exists before any miner module is imported
        sys.path.append(bundle_dir)  # after the stdlib and site-packages: a bundle file cannot shadow them
        _check_names(bundle_dir)
        arch_file, arch_symbol = spec["architecture"]
        architecture = _import_file(Path(bundle_dir, arch_file), _module_name(arch_file))
        builder = getattr(architecture, arch_symbol, None)
        if not callable(builder):
            raise RunError("contract:missing_symbol", f"{arch_file} has no callable {arch_symbol}")
        if role == "trainer":
            setattr(architecture, arch_symbol, backend.wrap_builder(builder))
            _train(spec, ctx)
        else:
            from prism_ray.harness.exporter import Exporter

            backend.builder = builder
            if not Exporter(channel, spec, builder, ctx).run():
                return 0  # no DONE: the parent that said END reads nothing more
    except RunError as error:
        if not error.reported:
            channel.send_json(Kind.ERROR, {"rule": error.rule, "message": error.message})
        return 1
    except BaseException as error:  # noqa: BLE001 — any miner failure is reported, typed, to the parent
        file, line = _miner_frame(traceback.extract_tb(error.__traceback__), bundle_dir)
        rule = classify(error)
        if int(spec.get("rank", 0)) > 0 and (spec["artifacts_dir"] in str(error) or "ermission denied" in str(error)):
            rule = "run:artifacts_rank"  # Landlock refused a write (torch.save's C++ writer names no path)
        message = f"{type(error).__name__}: {str(error)[:2000]}{_HINTS.get(rule, '')}"
        channel.send_json(Kind.ERROR, {"rule": rule, "message": message, "file": file, "line": line})
        traceback.print_exc(limit=20)
        return 1
    channel.send(Kind.DONE)
    return 0


def _train(spec: dict, ctx: Any) -> None:
    train_file, train_symbol = spec["training"]
    training = _import_file(Path(spec["bundle_dir"], train_file), _module_name(train_file))
    train = getattr(training, train_symbol, None)
    if not callable(train):
        raise RunError("contract:missing_symbol", f"{train_file} has no callable {train_symbol}")
    train(ctx)
    if _cuda_in_use():  # the last optimizer step must land before the scorer reads the final weights
        import torch

        torch.cuda.synchronize()


def _cuda_in_use() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _context(spec: dict, backend: Any) -> Any:
    context_class = make_context_class(backend)
    install_interface(context_class)
    return context_class(
        vocab_size=spec["vocab_size"], sequence_length=spec["max_seq_len"], max_parameters=spec["max_params"],
        seed=spec["seed"], device=spec["device"], rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
        byte_budget=spec["byte_budget"], artifacts_dir=spec["artifacts_dir"], data_dir=spec["data_dir"],
        tokenizer=spec["tokenizer"],
    )


def _connect(path: str) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return Channel(sock, accept_fds=True)


def main() -> int:
    socket_path, role = sys.argv[1], sys.argv[2]
    if role == "trainer":
        # A loop's first optimizer imports torch._dynamo (about 1 s of CPU): here it overlaps the other runners'
        # start instead of delaying the trainer's first batch request, which the export waits for.
        import torch._dynamo  # noqa: F401
    channel = _connect(socket_path)
    kind, payload = channel.recv()
    if kind != Kind.CONFIG:
        return 3
    return run(channel, parse_json(payload), role)


if __name__ == "__main__":
    code = main()
    # Every record has left over the socket: skip the interpreter's teardown (about 0.5 s of CPU with torch loaded)
    # and any thread the miner left running.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
