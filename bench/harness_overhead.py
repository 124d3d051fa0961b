"""Harness overhead on CPU: bare PyTorch loops vs. `prism-ray eval` on tiny-gpt (GPT-2 tokens; or an overhead-bound
byte bigram, `--workload count`), the embedded data, with the harness of this checkout (the exported graph in a
trusted scorer) and an earlier one (by default commit ce813fd: a scorer and a forked prober that ran
architecture.py; `--old-commit` names another), in one run.

Rows (same model, optimizer, geometry and batches everywhere; every eval with the LLM gate off):
- bare loop: forward + backward + step, nothing else;
- bare + scorer forward: the bare loop plus the scorer's per-batch work (`target_log_probs`, no grad, its record
  included) — the floor of a miner that writes its own loss, whose step is scored forward + forward + backward;
- reference: the bare loop plus a scoring forward written the way an in-process runner (the original PRISM
  runner) writes it: `F.cross_entropy(..., reduction="sum")` under no_grad, before the step. The scorer's
  `target_log_probs` gives the same numbers bit for bit, a few rows at a time (faster on CPU);
- eval, own forward: examples/tiny-gpt with the loss written in training.py (the way most miners write a loop);
- eval, with_logits: examples/tiny-gpt as shipped. The trainer runs its forward with graph and the scorer scores
  its own snapshot anyway, so this path pays a forward too: it is compared with both bare rows;
- the two eval rows with causality probes off (`causality_probe_every=0`), so the probes' own cost shows;
- the previous path: both loops through commit ce813fd's eval (exported with `git archive`, its own cache dir; its
  scorer imported architecture.py and a forked prober ran one probe row per batch). "trusted scorer cost" = new ÷ old.

Every variant runs in a fresh process (bare loops: in the runners' environment, `runner_env`; evals: through
bench/eval_driver.py, with this checkout's or the old tree first on PYTHONPATH), interleaved, the order rotated
every round, so drift hits each alike; the table shows medians of rounds and the load average around them.
Two figures per variant:
- tokens/s: targets ÷ seconds of the stream — for eval the report's (first batch released → trainer done), for the
  bare loops the loop alone;
- CPU ms per 1k tokens: user + system time of every process of the run (/proc), over whole batches (from the first
  loss record to the last; bare: steps 2..n). On a shared machine with more runnable threads than cores, wall time
  measures the share the scheduler gave, CPU time the work done; read the ratios of the second when the load
  average is above the core count. CPU ratios are written speed-like: base cost ÷ variant cost.

Targets: own forward ÷ reference ≥ 1.0 on both workloads (issue "Faster than the untrusted reference");
with_logits ÷ bare ≥ 0.97; new ÷ old ≥ 1.0 (with `--old-commit`: this checkout against an earlier harness).

    python bench/harness_overhead.py [--workload tiny-gpt|count] [--byte-budget 24000] [--rounds 3] [--quick]
        [--no-old] [--old-commit SHA] [--only bare_fwd,own,old_own]

`--workload count` swaps tiny-gpt for an overhead-bound bundle: a byte bigram table (257×257 logits looked up per
token, Adam), whose step costs about as much as the harness's per-batch hand-offs, so per-batch overhead shows
("bare loop + the scorer's forward" is the reference-style loop: scoring forward and step in one process, which is
what the original PRISM runner does). Both workloads' training step is one piece of source, run by the bare loops
and by the eval's training.py alike.

`--loop-threads N` has the training loop set its own torch threads (bare loops and the eval's training.py alike, the
first line of train(ctx)), as a miner may: on a CPU eval the loop shares the cores with the scorer's forward, and a
model whose ops are small trains faster on fewer threads than the cores (docs/miner.md, "Dry runs on CPU").

`--old-commit` compares with another commit's harness instead (e.g. the one before a change: before/after in one
run); `--only` runs a subset of the variants (names as in `variants` below).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-gpt"
DRIVER = REPO / "bench" / "eval_driver.py"
OLD_COMMIT = "ce813fd"  # the last harness whose scorer and prober ran architecture.py
HELDOUT_BYTES = 1  # one batch per held-out pass: it runs after the stream and is not timed, so keep it short
TINY_GPT_STEP = '''
import torch
import torch.nn.functional as F

BATCH, LENGTH = 8, 128



def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)


def step(model, optimizer, tokens, index):
    for group in optimizer.param_groups:
        group["lr"] = 3e-3 * min(1.0, (index + 1) / 20)
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
'''
COUNT_ARCHITECTURE = '''
"""A byte bigram table: the logits of the next byte are a row looked up by the current one."""

import torch
from torch import nn


class Bigram(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)
        nn.init.zeros_(self.table.weight)

    def forward(self, tokens):
        return self.table(tokens)


def build_model(ctx):
    return Bigram(ctx.vocab_size)
'''
COUNT_STEP = '''
import torch
import torch.nn.functional as F

BATCH, LENGTH = 4, 64


def make_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=0.05)


def step(model, optimizer, tokens, index):
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
'''
TRAIN_LOOP = '''

def train(ctx):{threads}
    model = ctx.build_model().to(ctx.device)
    optimizer = make_optimizer(model)
    model.train()
    for index, batch in enumerate(ctx.iter_train_batches(model, batch_size=BATCH, seq_len=LENGTH)):
        step(model, optimizer, batch.tokens, index)
'''


@dataclass(frozen=True)
class Workload:
    """A bundle and its training step: `step_source` is the eval's training.py (with TRAIN_LOOP) and the bare
    loops' step."""
    name: str
    tokenizer: str
    architecture: str  # source of architecture.py
    step_source: str
    with_logits_example: Path | None  # a shipped example that trains through with_logits=True, if the workload has one

    def write_bundle(self, where: Path, loop_threads: int | None = None) -> Path:
        """`loop_threads`: the loop sets its own torch threads first, as a miner's train(ctx) may."""
        where.mkdir(parents=True)
        (where / "prism.yaml").write_text(f"name: {self.name}-own-loss\ntokenizer: {self.tokenizer}\n")
        (where / "architecture.py").write_text(self.architecture)
        threads = f"\n    torch.set_num_threads({loop_threads})" if loop_threads else ""
        (where / "training.py").write_text(self.step_source + TRAIN_LOOP.format(threads=threads))
        return where


WORKLOADS = {
    "tiny-gpt": Workload("tiny-gpt", "gpt2", (EXAMPLE / "architecture.py").read_text(), TINY_GPT_STEP, EXAMPLE),
    "count": Workload("count", "bytes", COUNT_ARCHITECTURE, COUNT_STEP, None),
}


@dataclass
class Measured:
    tokens_per_second: float
    cpu_ms_per_k: float  # CPU milliseconds per 1,000 targets, every process of the run


def bare_child(job: dict) -> None:
    """`--bare JOB`: the workload's work with no harness, in this fresh process; one JSON line."""
    import types

    import numpy as np
    import torch
    import torch.nn.functional as F

    from prism_ray.config import EMBEDDED_DATA_DIR
    from prism_ray.data.dataset import open_dataset
    from prism_ray.data.token_cache import load_token_stream
    from prism_ray.harness.context import force_seed, rows
    from prism_ray.harness.scorer import target_log_probs
    from prism_ray.harness.stream import StreamPlan

    torch.set_num_threads(job["loop_threads"] or job["threads"])
    workload = WORKLOADS[job["workload"]]
    architecture, training = types.ModuleType("architecture"), types.ModuleType("training")
    exec(compile(workload.architecture, "architecture.py", "exec"), architecture.__dict__)
    exec(compile(workload.step_source, "training.py", "exec"), training.__dict__)
    batch, length = training.BATCH, training.LENGTH
    stream = load_token_stream(open_dataset(EMBEDDED_DATA_DIR), "train", workload.tokenizer, Path(job["cache_dir"]))
    plan = StreamPlan(np.asarray(stream.tokens), stream.byte_lengths, batch, length, job["byte_budget"])
    batches = [(rows(piece.chunk, length), piece.targets) for piece in plan.batches()]
    force_seed(job["seed"])
    ctx = types.SimpleNamespace(vocab_size=stream.vocab_size, max_seq_len=job["max_seq_len"],
                                sequence_length=job["max_seq_len"], device="cpu")
    model = architecture.build_model(ctx)
    optimizer = training.make_optimizer(model)
    model.train()
    recorded, targets, cpu_after_first = 0.0, 0, 0.0
    started = time.perf_counter()
    for index, (tokens, count) in enumerate(batches):
        if job["extra_forward"] == "scorer":  # exactly the scorer's per-batch computation, its record included
            with torch.no_grad():
                logits = model(tokens)
            recorded += -float(target_log_probs(logits, tokens[:, 1:]).double().sum())
        elif job["extra_forward"] == "reference":  # a scoring forward the way an in-process runner writes it
            with torch.no_grad():
                logits = model(tokens)
                recorded += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  tokens[:, 1:].reshape(-1), reduction="sum"))
        training.step(model, optimizer, tokens, index)
        targets += count
        if index == 0:
            cpu_after_first = time.process_time()
    elapsed = time.perf_counter() - started
    window = targets - batches[0][1]
    print(json.dumps({"tokens_per_second": targets / elapsed,
                      "cpu_ms_per_k": (time.process_time() - cpu_after_first) * 1e6 / window if window else 0.0}))


def run_bare(job: dict, extra_forward: str | None) -> Measured:
    from prism_ray.harness.supervise import runner_env

    env = {**runner_env(job["threads"], "trainer"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, __file__, "--bare", json.dumps({**job, "extra_forward": extra_forward})],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bare loop failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Measured(result["tokens_per_second"], result["cpu_ms_per_k"])


def run_eval(tree: Path, bundle: Path, env: dict[str, str]) -> Measured:
    done = subprocess.run([sys.executable, str(DRIVER), str(bundle)], env={**env, "PYTHONPATH": str(tree)},
                          cwd=tree, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if done.returncode == 0 and lines else {}
    if result.get("status") != "completed":
        raise RuntimeError(f"eval of {bundle.name} with {tree} failed ({done.returncode}): "
                           f"{result.get('reasons') or done.stderr[-3000:]}")
    window = result["window_batches"] * result["targets_per_batch"]
    return Measured(result["tokens_per_second"], result["window_cpu_seconds"] * 1e6 / window if window else 0.0)


def export_old(scratch: Path, commit: str) -> tuple[Path | None, str]:
    """The old tree in a temp dir, or None and why not."""
    root = scratch / f"prism-ray-{commit}"
    if shutil.which("git") is None:
        return None, "old path skipped: git is not installed"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True)
    if archive.returncode != 0:
        return None, f"old path skipped: {REPO} is not a git checkout holding commit {commit} " \
                     f"({archive.stderr.decode().strip()[:200]})"
    root.mkdir()
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root, f"old path: commit {commit}, exported to a temp dir"


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny-gpt",
                        help="tiny-gpt (compute-bound) or count (overhead-bound)")
    parser.add_argument("--byte-budget", type=int, default=24_000, help="bytes scored per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    parser.add_argument("--quick", action="store_true", help="a tiny run: 8,000 bytes, one round")
    parser.add_argument("--no-old", action="store_true", help="skip the old-path rows")
    parser.add_argument("--old-commit", default=OLD_COMMIT, help="the commit of the old path")
    parser.add_argument("--only", help="comma-separated variants to run (default: all)")
    parser.add_argument("--loop-threads", type=int, help="the training loop sets its own torch threads (bare loops "
                        "and the eval's training.py alike), as a miner may; the eval's scorer keeps its share")
    parser.add_argument("--bare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_child(json.loads(args.bare))
        return
    if args.quick:
        args.byte_budget, args.rounds = 8_000, 1
    from prism_ray.config import EMBEDDED_DATA_DIR, Settings
    from prism_ray.data.dataset import open_dataset
    from prism_ray.data.token_cache import load_token_stream

    with tempfile.TemporaryDirectory(prefix="prism-bench-") as scratch_name:
        scratch = Path(scratch_name)
        os.chmod(scratch, 0o711)  # the sandboxes run as another uid and must pass through to their run dirs
        settings = Settings()
        cache = scratch / "cache"
        workload = WORKLOADS[args.workload]
        load_token_stream(open_dataset(EMBEDDED_DATA_DIR), "train", workload.tokenizer, cache)  # before timing
        own_loss = workload.write_bundle(scratch / f"{workload.name}-own-loss", args.loop_threads)
        # the cache (run dirs included) sits outside the trees: the old sandbox hides a cache inside a bound dir
        env = {**os.environ, "PRISM_GATE_MODE": "off", "PRISM_CACHE_DIR": str(cache),
               "PRISM_BYTE_BUDGET": str(args.byte_budget), "PRISM_SCORING_HELDOUT_BYTE_BUDGET": str(HELDOUT_BYTES)}
        no_probes = {**env, "PRISM_CAUSALITY_PROBE_EVERY": "0", "PRISM_CAUSALITY_PROBE_ROWS": "0"}  # new, old
        threads = settings.runner_threads or len(os.sched_getaffinity(0))
        job = {"cache_dir": str(cache), "byte_budget": args.byte_budget, "seed": settings.seed,
               "max_seq_len": settings.max_seq_len, "threads": threads, "workload": workload.name,
               "loop_threads": args.loop_threads}
        variants: dict[str, Callable[[], Measured]] = {
            "bare": lambda: run_bare(job, extra_forward=None),
            "bare_fwd": lambda: run_bare(job, extra_forward="scorer"),
            "reference": lambda: run_bare(job, extra_forward="reference"),
            "own": lambda: run_eval(REPO, own_loss, env),
            "own_p0": lambda: run_eval(REPO, own_loss, no_probes),
        }
        # the shipped example's loop keeps its threads: not comparable with --loop-threads
        logits_bundle = None if args.loop_threads else workload.with_logits_example
        if logits_bundle is not None:
            variants["logits"] = lambda: run_eval(REPO, logits_bundle, env)
            variants["logits_p0"] = lambda: run_eval(REPO, logits_bundle, no_probes)
        old, old_note = (None, "old path skipped (--no-old)") if args.no_old else export_old(scratch, args.old_commit)
        if old is not None:
            variants["old_own"] = lambda: run_eval(old, own_loss, env)
            if logits_bundle is not None:
                variants["old_logits"] = lambda: run_eval(old, logits_bundle, env)
        names = [name for name in variants if not args.only or name in args.only.split(",")]
        results: dict[str, list[Measured]] = {name: [] for name in names}
        loads = [load()]
        started = time.monotonic()
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                results[name].append(variants[name]())
            loads.append(load())
        elapsed = time.monotonic() - started
    print_table(args, threads, results, loads, elapsed, old_note)


def geometry(workload: Workload) -> tuple[int, int]:
    names: dict = {}
    exec(compile(workload.step_source, "training.py", "exec"), names)
    return names["BATCH"], names["LENGTH"]


def print_table(args: argparse.Namespace, threads: int, results: dict[str, list[Measured]], loads: list[str],
                elapsed: float, old_note: str) -> None:
    speed = {name: statistics.median(m.tokens_per_second for m in runs) for name, runs in results.items()}
    cost = {name: statistics.median(m.cpu_ms_per_k for m in runs) for name, runs in results.items()}

    def by_speed(name: str, base: str) -> str:
        return f"{speed[name] / speed[base]:.3f}" if name in speed and base in speed else "—"

    def by_cost(name: str, base: str) -> str:
        return f"{cost[base] / cost[name]:.3f}" if name in cost and base in cost else "—"

    workload = WORKLOADS[args.workload]
    batch, length = geometry(workload)
    print(f"harness overhead: {workload.name} on CPU, {workload.tokenizer} tokens, embedded data, B={batch} "
          f"L={length}, {args.byte_budget:,} bytes per run, {threads} torch threads per process"
          + (f" ({args.loop_threads} in the training loops: --loop-threads)" if args.loop_threads else ""))
    print(f"machine: {len(os.sched_getaffinity(0))} cores; median of {args.rounds} interleaved round(s), "
          f"{elapsed:.0f} s; load average (1/5/15 min) at start and after each round: " + " | ".join(loads))
    print(old_note)
    rows = [
        ("bare", "bare loop: fwd + bwd + step", "", ""),
        ("bare_fwd", "bare loop + the scorer's forward", "", ""),
        ("reference", "reference: bare loop + F.cross_entropy fwd", "", ""),
        ("own", "eval, own forward", "≥1.0 ÷ref", "old_own"),
        ("logits", "eval, with_logits=True", "≥0.97 ÷bare", "old_logits"),
        ("own_p0", "eval, own forward, probes off", "", "old_own"),
        ("logits_p0", "eval, with_logits=True, probes off", "", "old_logits"),
        ("old_own", f"old path ({args.old_commit}), own forward", "", ""),
        ("old_logits", f"old path ({args.old_commit}), with_logits=True", "", ""),
    ]
    print(f"  {'':<44} {'------------- wall clock -------------':^45} | "
          f"{'---------------- CPU time ----------------':^48}")
    print(f"  {'variant':<44} {'tok/s':>8} {'÷bare':>6} {'÷b+fwd':>6} {'÷ref':>6} {'÷old':>6}  {'rounds':<9}| "
          f"{'ms/1k tok':>9} {'÷bare':>6} {'÷b+fwd':>6} {'÷ref':>6} {'÷old':>6}  {'rounds':<9}| target")
    for name, label, target, old in rows:
        if name not in speed:
            continue
        walls = ",".join(f"{m.tokens_per_second:.0f}" for m in results[name])
        cpus = ",".join(f"{m.cpu_ms_per_k:.0f}" for m in results[name])
        print(f"  {label:<44} {speed[name]:8,.0f} {by_speed(name, 'bare'):>6} {by_speed(name, 'bare_fwd'):>6} "
              f"{by_speed(name, 'reference'):>6} {by_speed(name, old) if old else '':>6}  {walls:<9}| "
              f"{cost[name]:9,.1f} {by_cost(name, 'bare'):>6} {by_cost(name, 'bare_fwd'):>6} "
              f"{by_cost(name, 'reference'):>6} {by_cost(name, old) if old else '':>6}  {cpus:<9}| {target}")
    if "logits" in speed:
        print("with_logits pays a forward under the trusted design: the trainer's forward (with graph) cannot be the "
              "scored one, since the trainer runs training.py; the scorer scores its own private snapshot. So "
              f"with_logits ÷ bare can reach at most about bare+fwd ÷ bare ({by_speed('bare_fwd', 'bare')} wall, "
              f"{by_cost('bare_fwd', 'bare')} CPU here), not 0.97.")
    if "old_own" in speed:
        print(f"scorer process cost vs. the old path (new ÷ old, issue #14 target ≥ 0.95), wall / CPU: own forward "
              f"{by_speed('own', 'old_own')} / {by_cost('own', 'old_own')}, with_logits "
              f"{by_speed('logits', 'old_logits')} / {by_cost('logits', 'old_logits')}")
    print(f"causality probes' own cost (probes on ÷ off), wall / CPU: own forward {by_speed('own', 'own_p0')} / "
          f"{by_cost('own', 'own_p0')}, with_logits {by_speed('logits', 'logits_p0')} / "
          f"{by_cost('logits', 'logits_p0')}")


if __name__ == "__main__":
    main()
