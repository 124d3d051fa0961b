"""The runner: the only process where miner code runs (launched under torchrun, inside the sandbox).

    torchrun --standalone --nnodes=1 --nproc-per-node=1 -m prism_ray.harness.runner SOCKET

It connects to the parent's socket, receives the run spec, forces seed and deterministic flags BEFORE
importing any miner module, installs the PRISM interface, imports the two scripts and calls train(ctx).
It never reads data: every batch arrives from the parent, one at a time, after the previous loss record.
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

from prism_ray.harness.context import (
    Harness,
    RunError,
    force_determinism,
    force_seed,
    install_interface,
    make_context_class,
)
from prism_ray.harness.protocol import Channel, Kind, parse_json


def _import_file(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _miner_frame(tb: traceback.StackSummary, bundle_dir: str) -> tuple[str | None, int | None]:
    """The innermost frame inside the bundle: where the miner should look."""
    for frame in reversed(tb):
        if frame.filename.startswith(bundle_dir + os.sep):
            return os.path.relpath(frame.filename, bundle_dir), frame.lineno
    return None, None


def classify(error: BaseException) -> str:
    """Resource exhaustion gets its own rule so miners know which limit they hit."""
    text = str(error).lower()
    if isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return "run:memory"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "run:artifacts_quota"
    if isinstance(error, OSError) and error.errno == errno.EAGAIN and "fork" in "".join(traceback.format_tb(
            error.__traceback__)):
        return "run:process_limit"
    return "run:exception"


def _device(spec: dict, local_rank: int) -> str:
    import torch

    if spec["device"] == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return spec["device"]


def run(channel: Channel) -> int:
    kind, payload = channel.recv()
    if kind != Kind.CONFIG:
        return 3
    spec = parse_json(payload)
    force_seed(spec["seed"])
    force_determinism()
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    spec["device"] = _device(spec, local_rank)
    if spec["device"].startswith("cuda"):
        torch.cuda.set_device(torch.device(spec["device"]))
    harness = Harness(channel, spec)
    context_class = make_context_class(harness)
    install_interface(context_class)
    bundle_dir = spec["bundle_dir"]
    channel.send_json(Kind.HELLO, {"pid": os.getpid(), "torch": torch.__version__, "device": spec["device"]})
    try:
        sys.path.append(bundle_dir)  # after the stdlib and site-packages: a bundle file cannot shadow them
        arch_file, arch_symbol = spec["architecture"]
        train_file, train_symbol = spec["training"]
        architecture = _import_file(Path(bundle_dir, arch_file), Path(arch_file).stem)
        builder = getattr(architecture, arch_symbol, None)
        if not callable(builder):
            raise RunError("contract:missing_symbol", f"{arch_file} has no callable {arch_symbol}")
        setattr(architecture, arch_symbol, harness.wrap_builder(builder))
        mode = spec["mode"]
        if mode != "heldout":  # held-out evaluation builds models only; the training script never runs there
            training = _import_file(Path(bundle_dir, train_file), Path(train_file).stem)
            train = getattr(training, train_symbol, None)
            if not callable(train):
                raise RunError("contract:missing_symbol", f"{train_file} has no callable {train_symbol}")
        ctx = context_class(
            vocab_size=spec["vocab_size"], sequence_length=spec["max_seq_len"], max_parameters=spec["max_params"],
            seed=spec["seed"], device=spec["device"], rank=int(os.environ.get("RANK", "0")), local_rank=local_rank,
            world_size=int(os.environ.get("WORLD_SIZE", "1")), byte_budget=spec["byte_budget"],
            artifacts_dir=spec["artifacts_dir"], data_dir=spec["data_dir"], tokenizer=spec["tokenizer"],
        )
        if mode == "probe":
            harness.probe_model(ctx)
        elif mode == "heldout":
            harness.evaluate_heldout(ctx)
        else:
            train(ctx)
            harness.send_state()
    except RunError as error:
        if not error.reported:
            channel.send_json(Kind.ERROR, {"rule": error.rule, "message": error.message})
        return 1
    except BaseException as error:  # noqa: BLE001 — any miner failure is reported, typed, to the parent
        file, line = _miner_frame(traceback.extract_tb(error.__traceback__), bundle_dir)
        message = f"{type(error).__name__}: {error}"
        channel.send_json(Kind.ERROR, {"rule": classify(error), "message": message[:2000], "file": file,
                                       "line": line})
        traceback.print_exc()
        return 1
    channel.send_json(Kind.DONE, {"stream_finished": harness.stream_finished})
    return 0


def main() -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sys.argv[1])
    channel = Channel(sock)
    try:
        return run(channel)
    finally:
        channel.close()


if __name__ == "__main__":
    code = main()
    # Every record has left over the socket: skip the interpreter's teardown (about 0.5 s of CPU with torch loaded)
    # and any thread the miner left running.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
