"""GPU check in one call: a nanoGPT-style GPT (about 11.6M parameters, bf16) on GPT-2 tokens, the embedded data.

Prints one markdown table: tokens/s of the bare loop and of `prism-ray eval` (own forward, with_logits=True), the
harness's peak GPU memory ÷ the bare loop's, the stream's ceiling, and the bpb of the same bundle scored twice.

- Precision: bf16 parameters. build_model returns the model in bfloat16, so the trainer trains it in bf16 and the
  scorer, which scores the trainer's tensors in their own dtype, computes its forward in bf16 too. (With
  torch.autocast in training.py the parameters would stay float32 and the scorer, which never runs training.py,
  would score in float32: a slower forward than the trainer's.) The loss is taken on float32 logits.
- Bare loops run the bundle's very training.py in a fresh process with a plain `ctx` (no sandbox, no scorer, no
  deterministic-algorithms flag: a miner's own machine), timed from the first batch to train() returning, after a
  device synchronize; "bare + scorer forward" also runs the scorer's per-batch work (`target_log_probs`, no grad,
  its host sync included) before each step: the floor of the own-forward path.
- Eval runs are `prism_ray.evaluation.pipeline.evaluate` (gate off, one-batch held-out passes, which are not
  timed); tokens/s is the report's (first batch released → trainer done). The no-op trainer row (a loop that only
  iterates the batches) is the harness's own ceiling for this model: protocol, snapshot and the scorer's forward.
  The protocol row is bench/stream.py's socket path alone (batch → rows → device → NEXT), no scorer.
- Peak memory is device-wide (torch.cuda.mem_get_info: total − free, sampled every 10 ms, minus the idle level
  before the run): it sees every process of a run, CUDA contexts and what their caching allocators reserved.
  torch.cuda.max_memory_allocated would see this process only.
- bpb twice: the own-forward and the with_logits bundle each scored in two rounds; relative difference vs. the
  audit tolerance (bit-identical expected on CPU, 1e-4 on CUDA).

    python bench/gpu.py                          # CUDA: planned for about 2 minutes on one H100/H200
    python bench/gpu.py --world-size 4           # also the with_logits bundle as 4 ranks on 4 GPUs (DDP-style
                                                 # all-reduce): tokens/s per GPU against world size 1, and its bpb
    python bench/gpu.py --handoff both           # the evals with PRISM_GPU_HANDOFF=host and =stream, interleaved:
                                                 # each one's own forward ÷ (bare + forward), and stream's bpb
                                                 # against host's (docs/architecture.md, "The GPU hand-off")
    python bench/gpu.py --device cpu --quick     # smoke test (tests/test_bench_gpu.py)

A run that fails shows as "failed" with its reason in the table, the other rows still print. Where bubblewrap cannot
run (some GPU containers), PRISM_SANDBOX_MODE=off runs the harness unsandboxed; the header says which ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from prism_ray.config import EMBEDDED_DATA_DIR, Settings
from prism_ray.data.dataset import open_dataset
from prism_ray.data.token_cache import load_token_stream
from prism_ray.evaluation.pipeline import evaluate
from prism_ray.harness.context import force_seed, rows
from prism_ray.harness.protocol import Channel, Kind, parse_batch
from prism_ray.harness.scorer import target_log_probs
from prism_ray.harness.stream import StreamPlan


@dataclass(frozen=True)
class Config:
    dim: int
    heads: int
    layers: int
    batch_size: int
    seq_len: int
    byte_budget: int  # 0 = the whole train split
    rounds: int  # of the eval runs; two at least, for the bpb of the same bundle twice
    bare_rounds: int


FULL = Config(dim=192, heads=6, layers=4, batch_size=32, seq_len=256, byte_budget=0, rounds=2, bare_rounds=2)
QUICK = Config(dim=32, heads=2, layers=1, batch_size=4, seq_len=32, byte_budget=2_000, rounds=2, bare_rounds=1)
HELDOUT_BYTES = 1  # one batch per held-out pass: the passes run after the stream and are not timed

ARCHITECTURE = '''"""A nanoGPT-style causal transformer on GPT-2 tokens, weight-tied, bf16 (written by bench/gpu.py)."""

import torch
import torch.nn.functional as F
from torch import nn

DIM, HEADS, LAYERS = {dim}, {heads}, {layers}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.proj = nn.Linear(DIM, DIM, bias=False)
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(DIM, dim=2)
        q, k, v = (t.view(batch, length, HEADS, DIM // HEADS).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, DIM))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, max_len):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, DIM)
        self.position = nn.Embedding(max_len, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_model(ctx):
    return GPT(ctx.vocab_size, ctx.max_seq_len).to(device=ctx.device, dtype=torch.bfloat16)
'''

TRAINING = '''"""AdamW with warmup on bf16 parameters; {how}; at several ranks an all-reduce averages the
gradients (written by bench/gpu.py)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F


def train(ctx):
    model = ctx.build_model()
    if ctx.world_size > 1:
        dist.init_process_group("nccl" if ctx.device.startswith("cuda") else "gloo")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    batches = ctx.iter_train_batches(model, batch_size={batch_size}, seq_len={seq_len}, with_logits={with_logits})
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 20)
{loss}
        loss.backward()
        if ctx.world_size > 1:
            for parameter in model.parameters():
                dist.all_reduce(parameter.grad)
                parameter.grad /= ctx.world_size
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if ctx.world_size > 1:
        dist.destroy_process_group()
'''
OWN_LOSS = '''        logits = model(batch.tokens)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch.tokens[:, 1:].reshape(-1))'''
HARNESS_LOSS = "        loss = batch.loss"

NO_OP = '''"""Iterates the stream and trains nothing: the harness's own ceiling (written by bench/gpu.py)."""


def train(ctx):
    model = ctx.build_model()
    for _ in ctx.iter_train_batches(model, batch_size={batch_size}, seq_len={seq_len}):
        pass
'''


def write_bundles(root: Path, config: Config) -> dict[str, Path]:
    """The three bundles, same architecture: own forward, with_logits, no-op."""
    geometry = {"batch_size": config.batch_size, "seq_len": config.seq_len}
    trainings = {
        "own": TRAINING.format(how="the loss written here", with_logits=False, loss=OWN_LOSS, **geometry),
        "logits": TRAINING.format(how="backprop through the harness's forward", with_logits=True,
                                  loss=HARNESS_LOSS, **geometry),
        "noop": NO_OP.format(**geometry),
    }
    bundles = {}
    for name, training in trainings.items():
        directory = root / f"gpt-{name}"
        directory.mkdir(parents=True)
        (directory / "architecture.py").write_text(ARCHITECTURE.format(dim=config.dim, heads=config.heads,
                                                                      layers=config.layers))
        (directory / "training.py").write_text(training)
        (directory / "prism.yaml").write_text(f"name: gpu-bench-{name}\narchitecture: architecture.py::build_model\n"
                                              "training: training.py::train\ntokenizer: gpt2\n")
        bundles[name] = directory
    return bundles


# --- the bare loop, in its own process --------------------------------------------------------------------------


class BareContext:
    """A plain `ctx` for the bundle's training.py: batches from the same StreamPlan, nothing else."""

    def __init__(self, job: dict, architecture, batches: list[tuple[torch.Tensor, int]], vocab_size: int):
        self.vocab_size, self.max_seq_len, self.device = vocab_size, job["max_seq_len"], job["device"]
        self.seed, self.extra_forward = job["seed"], job["extra_forward"]
        self.rank, self.local_rank, self.world_size = 0, 0, 1  # the bare loop is one process
        self.architecture, self.batches = architecture, batches
        self.started: float | None = None
        self.targets = 0
        self.recorded = 0.0

    def build_model(self):
        force_seed(self.seed)
        return self.architecture.build_model(self)

    def iter_train_batches(self, model, batch_size=8, seq_len=None, tokenizer=None, with_logits=False):
        synchronize(self.device)
        self.started = time.perf_counter()
        for index, (host, targets) in enumerate(self.batches):
            tokens = host.to(self.device, non_blocking=True)
            if self.extra_forward:  # the scorer's per-batch work, its host sync included
                with torch.no_grad():
                    logits = model(tokens)
                self.recorded += -float(target_log_probs(logits, tokens[:, 1:]).double().sum())
            batch = SimpleNamespace(tokens=tokens, index=index, logits=None, loss=None)
            if with_logits:  # what the trainer harness computes for with_logits=True
                batch.logits = model(tokens)
                predicted = batch.logits[:, :-1].reshape(-1, batch.logits.shape[-1]).float()
                batch.loss = F.cross_entropy(predicted, tokens[:, 1:].reshape(-1))
            self.targets += targets
            yield batch


def bare_child(job: dict) -> None:
    """`--child JOB`: run the bundle's training.py with a BareContext; print tokens/s as JSON."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    stream = load_token_stream(open_dataset(EMBEDDED_DATA_DIR), "train", "gpt2", Path(job["cache_dir"]))
    plan = StreamPlan(np.asarray(stream.tokens), stream.byte_lengths, job["batch_size"], job["seq_len"],
                      job["byte_budget"])
    batches = [(rows(piece.chunk, job["seq_len"]), piece.targets) for piece in plan.batches()]
    bundle = Path(job["bundle"])
    architecture, training = (import_file(bundle / name) for name in ("architecture.py", "training.py"))
    ctx = BareContext(job, architecture, batches, stream.vocab_size)
    training.train(ctx)
    synchronize(job["device"])
    elapsed = time.perf_counter() - ctx.started
    print(json.dumps({"tokens_per_second": ctx.targets / elapsed, "targets": ctx.targets}))


def import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


# --- measurements from the parent ------------------------------------------------------------------------------


class PeakMemory:
    """Device-wide GPU memory in use over the level before the run (every process counts), sampled every 10 ms."""

    def __init__(self, device: str):
        self.device = torch.device(device) if device.startswith("cuda") else None
        self.peak_bytes: int | None = None

    def used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def __enter__(self) -> PeakMemory:
        if self.device is not None:
            self.baseline = self.used()
            self.highest = self.baseline
            self.stopping = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stopping.wait(0.01):
            self.highest = max(self.highest, self.used())

    def __exit__(self, *exc) -> None:
        if self.device is not None:
            self.stopping.set()
            self.thread.join()
            self.highest = max(self.highest, self.used())
            self.peak_bytes = self.highest - self.baseline


@dataclass
class Measured:
    tokens_per_second: float
    peak_bytes: int | None = None
    bpb: float | None = None
    isolation: str | None = None
    model_params: int | None = None
    batches: int | None = None


def run_bare(job: dict, extra_forward: bool) -> Measured:
    with PeakMemory(job["device"]) as memory:
        child = json.dumps({**job, "extra_forward": extra_forward})
        done = subprocess.run([sys.executable, __file__, "--child", child], capture_output=True, text=True)
    if done.returncode != 0:
        raise RunFailed(f"bare loop: exit {done.returncode}: {done.stderr[-3000:]}")
    return Measured(json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_second"], memory.peak_bytes)


def run_eval(bundle: Path, settings: Settings) -> Measured:
    with PeakMemory(settings.device) as memory:
        report = evaluate(bundle, settings)
    if not report.ok:
        reasons = "; ".join(f"{r.rule}: {r.message[:300]}" for r in report.reasons)
        raise RunFailed(f"eval of {bundle.name} ended {report.status} at {report.stage}: {reasons}")
    return Measured(report.tokens_per_second, memory.peak_bytes, report.bpb, report.isolation, report.model_params,
                    report.batches)


def protocol_ceiling(job: dict) -> float:
    """bench/stream.py's socket path with the trainer's side of a batch: parse → rows → device → NEXT."""
    stream = load_token_stream(open_dataset(EMBEDDED_DATA_DIR), "train", "gpt2", Path(job["cache_dir"]))
    plan = StreamPlan(np.asarray(stream.tokens), stream.byte_lengths, job["batch_size"], job["seq_len"],
                      job["byte_budget"])
    parent_sock, trainer_sock = socket.socketpair()
    parent, trainer = Channel(parent_sock), Channel(trainer_sock)
    device = job["device"]

    def receive() -> None:
        while True:
            kind, payload = trainer.recv()
            if kind == Kind.END:
                return
            _, _, seq_len, chunk, _ = parse_batch(payload)
            rows(chunk, seq_len).to(device, non_blocking=True)
            trainer.send(Kind.NEXT)

    thread = threading.Thread(target=receive)
    thread.start()
    synchronize(device)
    started = time.perf_counter()
    targets = 0
    for piece in plan.batches():
        parent.send_batch(piece.index, plan.batch_size, plan.seq_len, piece.chunk)
        parent.recv()
        targets += piece.targets
    parent.send(Kind.END)
    thread.join()
    synchronize(device)
    elapsed = time.perf_counter() - started
    parent.close()
    trainer.close()
    return targets / elapsed


# --- the run and its table --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N, cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny model and budget: a smoke test")
    parser.add_argument("--world-size", type=int, default=1, help="also score the with_logits bundle as N ranks "
                        "(N GPUs on CUDA, gloo ranks on CPU)")
    parser.add_argument("--handoff", choices=("host", "stream", "both"), default="host",
                        help="PRISM_GPU_HANDOFF of the eval runs; both: each eval in both modes (CUDA only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        bare_child(json.loads(args.child))
        return
    if args.handoff != "host" and not args.device.startswith("cuda"):
        parser.error("the GPU hand-off is for CUDA runs: a CPU run keeps its rows in the frames")
    if args.device.startswith("cuda"):
        index = torch.device(args.device).index or 0
        args.device = f"cuda:{index}"  # with an index: the runner's torch.cuda.set_device refuses a bare "cuda"
        torch.cuda.set_device(index)
        torch.cuda.init()
    config = QUICK if args.quick else FULL
    started = time.monotonic()
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="prism-gpu-bench-") as scratch_name:
        scratch = Path(scratch_name)
        settings = Settings(byte_budget=config.byte_budget, cache_dir=scratch / "cache", device=args.device)
        settings.gate.mode = "off"
        settings.scoring.heldout_byte_budget = HELDOUT_BYTES
        stream = load_token_stream(open_dataset(EMBEDDED_DATA_DIR), "train", "gpt2", settings.cache_dir)
        bundles = write_bundles(scratch, config)
        job = {"cache_dir": str(settings.cache_dir), "bundle": str(bundles["own"]), "device": args.device,
               "batch_size": config.batch_size, "seq_len": config.seq_len, "byte_budget": config.byte_budget,
               "max_seq_len": settings.max_seq_len, "seed": settings.seed}
        runs = Runs()
        # the first mode's evals under the plain names, a second mode's under "<name> stream"
        modes = {"": "stream" if args.handoff == "stream" else "host"}
        if args.handoff == "both":
            modes[" stream"] = "stream"
        evals = {suffix: settings.model_copy(update={"gpu_handoff": mode}) for suffix, mode in modes.items()}
        for round_ in range(config.rounds):  # interleaved, so drift hits every variant alike
            if round_ < config.bare_rounds:
                runs.attempt("bare", lambda: run_bare(job, extra_forward=False))
                runs.attempt("bare_fwd", lambda: run_bare(job, extra_forward=True))
            for suffix, chosen in evals.items():
                runs.attempt("own" + suffix, lambda chosen=chosen: run_eval(bundles["own"], chosen))
                runs.attempt("logits" + suffix, lambda chosen=chosen: run_eval(bundles["logits"], chosen))
            loads.append(os.getloadavg()[0])
        if args.world_size > 1:
            ranked = evals[""].model_copy(update={"gpus_per_run": args.world_size})
            for _ in range(config.rounds):
                runs.attempt("ranks", lambda: run_eval(bundles["logits"], ranked))
        for suffix, chosen in evals.items():
            runs.attempt("noop" + suffix, lambda chosen=chosen: run_eval(bundles["noop"], chosen))
        runs.attempt("protocol", lambda: Measured(protocol_ceiling(job)))
    print_table(args, config, stream.vocab_size, runs, loads, time.monotonic() - started)


class RunFailed(Exception):
    """A bare loop or an eval that did not complete: a result of this check, shown in the table."""


class Runs:
    def __init__(self):
        self.measured: dict[str, list[Measured]] = {}
        self.failed: dict[str, str] = {}

    def attempt(self, name: str, call) -> None:
        started = time.monotonic()
        try:
            measured = call()
        except RunFailed as error:
            self.failed.setdefault(name, str(error))
            print(f"{name}: failed after {time.monotonic() - started:.0f} s: {error}", file=sys.stderr, flush=True)
            return
        self.measured.setdefault(name, []).append(measured)
        print(f"{name}: {measured.tokens_per_second:.0f} tokens/s, bpb {measured.bpb}, "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)  # progress while the table waits

    def speed(self, name: str) -> float | None:
        values = [m.tokens_per_second for m in self.measured.get(name, [])]
        return statistics.median(values) if values else None

    def memory(self, name: str) -> int | None:
        values = [m.peak_bytes for m in self.measured.get(name, []) if m.peak_bytes is not None]
        return max(values) if values else None

    def first(self, key: str) -> object:
        """A fact of the model from whichever eval completed (parameters, batches, isolation)."""
        for name in ("own", "logits", "noop"):
            for measured in self.measured.get(name, []):
                return getattr(measured, key)
        return None


def print_table(args: argparse.Namespace, config: Config, vocab_size: int, runs: Runs, loads: list[float],
                elapsed: float) -> None:
    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name(torch.device(args.device))}, CUDA {torch.version.cuda}"
    else:
        machine = f"CPU, {len(os.sched_getaffinity(0))} cores, load average " + " → ".join(f"{v:.2f}" for v in loads)
    params = runs.first("model_params")
    handoff = {"both": "host (plain rows) and stream (rows marked stream)"}.get(args.handoff, args.handoff)
    print(f"GPU check on {machine}; torch {torch.__version__}; sandbox: {runs.first('isolation')}; GPU hand-off: "
          f"{handoff}")
    print(f"bf16 GPT, {params or 0:,} parameters (dim {config.dim}, {config.layers} layers, {config.heads} heads, "
          f"vocab {vocab_size:,}), B={config.batch_size} L={config.seq_len}, {runs.first('batches')} batches per "
          f"run ({'the whole train split' if not config.byte_budget else f'{config.byte_budget:,} bytes'}); medians "
          f"of {config.rounds} interleaved rounds (bare loops: {config.bare_rounds}); {elapsed:.0f} s in all")
    print()
    print("| measure | value | ratio | target / note |")
    print("|---|---:|---:|---|")

    def row(label: str, value: str, ratio: str = "", note: str = "") -> None:
        print(f"| {label} | {value} | {ratio} | {note} |")

    def ratio(top: float | None, bottom: float | None) -> str:
        return f"{top / bottom:.3f}" if top is not None and bottom else "—"

    speeds = [
        ("bare", "bare loop, tokens/s", None, "fwd + bwd + step, the bundle's training.py"),
        ("bare_fwd", "bare + scorer forward, tokens/s", "bare", "÷ bare; the own-forward floor"),
        ("own", "eval own forward, tokens/s", "bare_fwd", "÷ bare + scorer forward; target ≥ 0.97"),
        ("logits", "eval with_logits, tokens/s", "bare", "÷ bare; target ≥ 0.97, but the scorer's forward is paid "
         "here too"),
        ("noop", "eval no-op trainer, tokens/s", "bare", "÷ bare; the harness's ceiling: protocol + snapshot + "
         "scorer forward"),
        ("protocol", "stream protocol only, tokens/s", "bare", "÷ bare; socket → rows → device → NEXT, no scorer"),
    ]
    if args.world_size > 1:
        speeds.insert(4, ("ranks", f"eval with_logits at world size {args.world_size}, tokens/s", "logits",
                          "÷ eval with_logits at world size 1"))
    if args.handoff == "both":  # each below its host row
        for added in (("own stream", "eval own forward, stream hand-off, tokens/s", "bare_fwd",
                       "÷ bare + scorer forward; against the host row above: flip the default if higher"),
                      ("logits stream", "eval with_logits, stream hand-off, tokens/s", "bare", "÷ bare"),
                      ("noop stream", "eval no-op trainer, stream hand-off, tokens/s", "bare", "÷ bare")):
            host = added[0].removesuffix(" stream")
            speeds.insert(1 + next(i for i, (name, *_) in enumerate(speeds) if name == host), added)
    for name, label, base, note in speeds:
        speed = runs.speed(name)
        if speed is None:
            row(label, "failed", "—", runs.failed.get(name, "not run")[:300].replace("|", "/").replace("\n", " "))
            continue
        row(label, f"{speed:.0f}", ratio(speed, runs.speed(base or "bare")), note)
    if args.world_size > 1:
        ranked, single = runs.speed("ranks"), runs.speed("logits")
        per_gpu = ranked / args.world_size if ranked is not None else None
        row(f"tokens/s per GPU at world size {args.world_size}", f"{per_gpu:.0f}" if per_gpu else "failed",
            ratio(per_gpu, single), "÷ tokens/s at world size 1 (one GPU); 1.0 = linear scaling")
        ranked_bpb = [m.bpb for m in runs.measured.get("ranks", [])]
        single_bpb = [m.bpb for m in runs.measured.get("logits", [])]
        if ranked_bpb and single_bpb:
            difference = abs(ranked_bpb[0] - single_bpb[0]) / single_bpb[0]
            row(f"bpb at world size {args.world_size} vs 1", f"{ranked_bpb[0]:.6f} / {single_bpb[0]:.6f}",
                f"{difference:.2e}", "relative difference: the same run sharded across ranks, float rounding only")
    if args.device.startswith("cuda"):
        for name, label in (("bare", "bare loop"), ("own", "eval own forward"), ("logits", "eval with_logits")):
            memory = runs.memory(name)
            row(f"peak GPU memory, {label}, MiB", f"{memory / 2**20:.0f}" if memory is not None else "failed",
                ratio(memory, runs.memory("bare")), "÷ bare; device-wide (mem_get_info), every process")
    else:
        row("peak GPU memory", "n/a", "", "measured on CUDA only")
    tolerance = 0.0 if args.device == "cpu" else 1e-4
    twice = [("own", "own forward"), ("logits", "with_logits")]
    if args.handoff == "both":
        twice += [("own stream", "own forward, stream hand-off"), ("logits stream", "with_logits, stream hand-off")]
        host, stream = runs.measured.get("own", []), runs.measured.get("own stream", [])
        if host and stream:
            difference = abs(host[0].bpb - stream[0].bpb) / host[0].bpb
            verdict = "ok" if difference <= tolerance else "OVER the audit tolerance"
            row("bpb own forward, host vs stream hand-off", f"{host[0].bpb:.6f} / {stream[0].bpb:.6f}",
                f"{difference:.2e}", f"relative difference; audit tolerance {tolerance:g}: {verdict}")
    for name, label in twice:
        scored = [m.bpb for m in runs.measured.get(name, [])]
        if len(scored) < 2:
            row(f"bpb twice, {label}", "failed", "—", f"{len(scored)} of 2 runs completed")
            continue
        difference = abs(scored[0] - scored[1]) / scored[0]
        verdict = "ok" if difference <= tolerance else "OVER the audit tolerance"
        row(f"bpb twice, {label}", f"{scored[0]:.6f} / {scored[1]:.6f}", f"{difference:.2e}",
            f"relative difference; audit tolerance {tolerance:g}: {verdict}")
    for name, message in runs.failed.items():
        print(f"\n{name} failed: {message}", file=sys.stderr)


if __name__ == "__main__":
    main()
