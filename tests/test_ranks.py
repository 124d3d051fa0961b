"""Several trainer ranks in one sandbox (gloo on CPU): sharded batches, one score, ranks that must agree, and typed
endings for a rank that hangs, leaves or writes artifacts (docs/architecture.md, "Several ranks")."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from conftest import BYTE_LENGTHS, byte_stream, train_on_stream
from miners import bigram_architecture
from prism_ray.cluster.tasks import placement_notice, run_slots
from prism_ray.config import Settings
from prism_ray.errors import Reason
from prism_ray.evaluation.pipeline import evaluate
from prism_ray.harness.contract import ContractCheck, ContractRun, check_contract, random_stream, rejection
from prism_ray.harness.isolation import SandboxPolicy
from prism_ray.harness.records import RunSpec

TEXT = "Every rank sees its own rows of the batch; the scorer sees them all. " * 12  # six 4×32 batches

pytestmark = pytest.mark.sandbox

ARCH = bigram_architecture()

# An honest loop for any world size: DDP averages the gradients of each rank's rows. It also checks, from inside,
# the environment torchrun would have set and the size of its shard.
DDP_LOOP = """
import os
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

def train(ctx):
    env = {name: os.environ[name] for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    assert env == {"RANK": str(ctx.rank), "LOCAL_RANK": str(ctx.local_rank), "WORLD_SIZE": str(ctx.world_size),
                   "LOCAL_WORLD_SIZE": str(ctx.world_size)}, env
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["MASTER_PORT"]
    dist.init_process_group("gloo")
    model = ctx.build_model()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for batch in ctx.iter_train_batches(ddp, batch_size=4, seq_len=32, with_logits=True):
        assert batch.tokens.shape == (4 // ctx.world_size, 32), batch.tokens.shape
        batch.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    dist.destroy_process_group()
"""

# An explicit all-reduce of the gradients; MISBEHAVE runs after each step.
ALL_REDUCE_LOOP = """
import os
import time
import torch
import torch.distributed as dist

def train(ctx):
    dist.init_process_group("gloo")
    model = ctx.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for batch in ctx.iter_train_batches(model, batch_size=4, seq_len=32, with_logits=True):
        batch.loss.backward()
        for parameter in model.parameters():
            if ALL_REDUCE:
                dist.all_reduce(parameter.grad)
                parameter.grad /= ctx.world_size
        optimizer.step()
        optimizer.zero_grad()
        MISBEHAVE
"""


def all_reduce_loop(misbehave: str = "pass", all_reduce: bool = True) -> str:
    return ALL_REDUCE_LOOP.replace("MISBEHAVE", misbehave).replace("ALL_REDUCE", str(all_reduce))


def run(bundle_factory, tmp_path, training: str, world_size: int = 2, **kwargs):
    return train_on_stream(bundle_factory(ARCH, training), byte_stream(TEXT), tmp_path / f"run{world_size}",
                           world_size=world_size, **kwargs)


def bpb(outcome) -> float:
    return sum(outcome.batch_nats) / math.log(2) / sum(outcome.batch_bytes)


def rules(outcome) -> list[str]:
    return [reason.rule for reason in outcome.reasons]


def test_ddp_at_world_size_two_scores_as_one_process(bundle_factory, tmp_path):
    one = run(bundle_factory, tmp_path, DDP_LOOP, world_size=1)
    two = run(bundle_factory, tmp_path, DDP_LOOP, world_size=2)
    assert one.status == "completed", one.reasons or one.log_tail
    assert two.status == "completed", two.reasons or two.log_tail
    assert two.world_size == 2 and two.batches == one.batches == 6
    assert abs(bpb(two) - bpb(one)) <= 1e-5 * bpb(one), (bpb(one), bpb(two))
    assert bpb(two) < 8.0  # it learned: the first batch alone is ln(257)/ln(2) ≈ 8.006 bits per byte


def test_ranks_that_skip_the_all_reduce_diverge(bundle_factory, tmp_path):
    outcome = run(bundle_factory, tmp_path, all_reduce_loop(all_reduce=False))
    assert rules(outcome) == ["run:ranks_diverged"], outcome.reasons or outcome.log_tail
    message = outcome.reasons[0].message
    assert "rank 1's `table.weight`" in message and "at batch 1" in message and "last agreed at batch 0" in message
    assert outcome.batches == 1  # batch 1 was not scored: its snapshot failed the check


def test_a_rank_that_hangs_is_named_in_bounded_time(bundle_factory, tmp_path):
    outcome = run(bundle_factory, tmp_path, all_reduce_loop("if ctx.rank == 1 and batch.index == 1: time.sleep(600)"),
                  rank_timeout=4.0)
    assert rules(outcome) == ["run:rank_hung"], outcome.reasons or outcome.log_tail
    # bounded: run:rank_hung 4 s after rank 0 asked, not run:timeout at the run's wall clock
    assert "rank 1 did not reach its request for batch 2 within 4 s of rank 0" in outcome.reasons[0].message


def test_a_rank_that_never_reaches_the_stream_is_named(bundle_factory, tmp_path):
    never = all_reduce_loop().replace("    optimizer =", "    if ctx.rank == 1:\n        time.sleep(600)\n"
                                      "    optimizer =", 1)
    outcome = run(bundle_factory, tmp_path, never, rank_timeout=4.0)
    assert rules(outcome) == ["run:rank_hung"], outcome.reasons or outcome.log_tail
    assert "rank 1 did not reach ctx.iter_train_batches" in outcome.reasons[0].message


@pytest.mark.parametrize("leave, rule, says", [
    ("return", "run:stopped_early", "rank 1: train(ctx) returned before the scored stream ended"),
    ("os._exit(0)", "run:crash", "rank 1: connection closed"),
])
def test_a_rank_that_leaves_early_gets_a_typed_reason(bundle_factory, tmp_path, leave, rule, says):
    outcome = run(bundle_factory, tmp_path, all_reduce_loop(f"if ctx.rank == 1 and batch.index == 1: {leave}"))
    assert rules(outcome) == [rule], outcome.reasons or outcome.log_tail
    assert says in outcome.reasons[0].message  # at once: not run:timeout at the run's wall clock


@pytest.mark.parametrize("rank_one, says", [
    ("batch_size = 2", "rank 1 asked for batch_size 2, rank 0 for 4"),
    ("model.double()", "rank 1's model has other parameters or buffers than rank 0's (names, shapes or dtypes)"),
])
def test_ranks_that_ask_for_different_streams_are_refused_before_any_batch(bundle_factory, tmp_path, rank_one, says):
    loop = all_reduce_loop().replace("    optimizer =", f"    batch_size = 4\n    if ctx.rank == 1:\n        {rank_one}\n"
                                     "    optimizer =", 1).replace("batch_size=4", "batch_size=batch_size", 1)
    outcome = run(bundle_factory, tmp_path, loop)
    assert rules(outcome) == ["run:ranks_disagree"], outcome.reasons or outcome.log_tail
    assert says in outcome.reasons[0].message and outcome.batches == 0


SAVE = "torch.save(model.state_dict(), os.path.join(ctx.artifacts_dir, f'r{ctx.rank}.pt'))"


@pytest.mark.parametrize("write", [
    SAVE,  # torch.save opens the file in C++: Landlock refuses it
    "open(os.path.join(ctx.artifacts_dir, 'notes.txt'), 'w').write('x')",  # a Python open: the audit hook does
])
def test_only_rank_zero_writes_artifacts(bundle_factory, tmp_path, write):
    outcome = run(bundle_factory, tmp_path, all_reduce_loop(f"if batch.index == 0: {write}"))
    assert rules(outcome) == ["run:artifacts_rank"], outcome.reasons or outcome.log_tail
    assert outcome.reasons[0].message.startswith("rank 1: ")


def test_rank_zero_writes_artifacts(bundle_factory, tmp_path):
    outcome = run(bundle_factory, tmp_path, all_reduce_loop(f"if batch.index == 0 and ctx.rank == 0: {SAVE}"))
    assert outcome.status == "completed", outcome.reasons or outcome.log_tail


def test_a_run_of_n_gpus_needs_one_node_with_n():
    nodes = [{"Alive": True, "Resources": {"GPU": 4.0}}, {"Alive": True, "Resources": {"GPU": 2.0}},
             {"Alive": False, "Resources": {"GPU": 8.0}}, {"Alive": True, "Resources": {"CPU": 8.0}}]
    assert [run_slots(nodes, n) for n in (1, 2, 4, 8)] == [6, 3, 1, 0]
    assert placement_notice(nodes, 4) is None and placement_notice(nodes, 1) is None
    assert placement_notice(nodes, 8) == ("no node has 8 GPUs (PRISM_GPUS_PER_RUN; the largest has 4): scored runs "
                                          "wait until such a node joins")


def contract_check(bundle, where) -> ContractCheck:
    """The check at world size 2, three batches, called as the train stage calls it."""
    base = RunSpec(bundle_dir=bundle.write_to(where / "bundle"),
                   exporter_bundle_dir=bundle.write_to(where / "exp", without_training=True),
                   architecture=("architecture.py", "build_model"), training=("training.py", "train"),
                   tokenizer="bytes", vocab_size=257, max_seq_len=1024, max_params=10**8, seed=1337,
                   device="cpu", byte_budget=0, artifacts_dir=where / "artifacts", data_dir="", threads=2)
    [check] = check_contract(base, [2], 3, BYTE_LENGTHS, where, 120.0, SandboxPolicy())
    return check


def test_the_contract_check_runs_the_bundles_own_loop_at_world_size_two(bundle_factory, tmp_path):
    """Unscored, three batches of random tokens, gloo on CPU: an honest loop passes; a loop that ignores the ranks
    fails, and under the reject policy that is contract:multi_gpu."""
    checks = {}
    for name, training in (("honest", DDP_LOOP), ("ignores", all_reduce_loop(all_reduce=False))):
        checks[name] = contract_check(bundle_factory(ARCH, training), tmp_path / name)
    assert checks["honest"].passed and checks["honest"].batches == 3, checks["honest"]
    assert not checks["ignores"].passed and checks["ignores"].reasons[0].rule == "run:ranks_diverged"
    assert rejection([checks["honest"]]) is None
    reason = rejection([checks["honest"], checks["ignores"]])
    assert reason is not None and reason.rule == "contract:multi_gpu" and "world size 2: failed" in reason.message


# Trains as any module does, but torch.export refuses its forward (it branches on a tensor's value).
UNEXPORTABLE_ARCH = """
import torch

class Branchy(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, tokens):
        if tokens.sum() > 0:
            return self.table(tokens)
        return 2 * self.table(tokens)

def build_model(ctx, stand_in=False):
    return torch.nn.Linear(1, 1) if stand_in else Branchy(ctx.vocab_size)
"""

# Trains its model without averaging the gradients, and shows the check a stand-in that never changes.
SHOWS_A_STAND_IN = """
import torch
import torch.nn.functional as F

def train(ctx):
    model = ctx.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    shown = ctx.build_model(stand_in=True) if ctx.world_size > 1 else model
    for batch in ctx.iter_train_batches(shown, batch_size=4, seq_len=32):
        logits = model(batch.tokens)
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.tokens[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
"""


def test_the_contract_check_exports_nothing_but_holds_the_ranks_to_the_architecture(bundle_factory, tmp_path):
    """The check scores nothing, so its exporter only builds the architecture: one torch.export refuses passes the
    check (and fails the scored run), while the exporter's fresh build is still what the ranks' model must match: a
    loop that shows the check a stand-in is refused."""
    checks = {}
    for name, training in (("unexportable", DDP_LOOP), ("stand-in", SHOWS_A_STAND_IN)):
        checks[name] = contract_check(bundle_factory(UNEXPORTABLE_ARCH, training), tmp_path / name)
    assert checks["unexportable"].passed and checks["unexportable"].batches == 3, checks["unexportable"]
    assert [reason.rule for reason in checks["stand-in"].reasons] == ["run:model_mismatch"], checks["stand-in"]
    scored = train_on_stream(bundle_factory(UNEXPORTABLE_ARCH, DDP_LOOP), byte_stream(TEXT), tmp_path / "scored")
    assert rules(scored) == ["contract:not_exportable"], scored.reasons


IGNORES_RANKS = """
import torch
import torch.distributed as dist

def train(ctx):
    if ctx.world_size > 1:
        dist.init_process_group("gloo")
    model = ctx.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for batch in ctx.iter_train_batches(model, batch_size=4, seq_len=32, with_logits=True):
        batch.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""


def test_the_reject_policy_rejects_a_loop_that_fails_the_contract(bundle_factory, tmp_path):
    """The whole pipeline (static policy, contract check, no scored run), on the embedded data."""
    bundle = bundle_factory(ARCH, IGNORES_RANKS)
    settings = Settings(cache_dir=tmp_path / "cache", byte_budget=2_000, runner_threads=2, contract_world_sizes="2",
                        contract_policy="reject")
    settings.gate.mode = "off"
    report = evaluate(bundle, settings)
    assert (report.status, [r.rule for r in report.reasons]) == ("rejected", ["contract:multi_gpu"]), report.reasons
    assert "world size 2: failed run:ranks_diverged" in report.reasons[0].message
    assert [(check.world_size, check.passed) for check in report.contract] == [(2, False)]
    assert report.batches == 0  # the scored run beside the check is stopped, and nothing of it is reported


MARKED_LOOP = """
import torch

print("training.py imported", flush=True)  # miner code ran: the runner's log shows it

def train(ctx):
    model = ctx.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in ctx.iter_train_batches(model, batch_size=2, seq_len=16, with_logits=True):
        batch.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""


@pytest.mark.parametrize("ends", [False, True])
def test_no_miner_code_runs_in_the_scored_session_before_the_check_beside_it_has_ended(bundle_factory, tmp_path,
                                                                                        ends):
    """The session's runners start beside the contract check (harness/contract.py, ContractRun), but the exporter
    and the trainer get their config only once `hold` returns; its reasons end the run before any of them runs."""
    run_dir = tmp_path / f"run-{ends}"
    rejected = Reason(rule="contract:multi_gpu", message="the training loop is not correct at several ranks")
    seen: list[bool] = []

    def imported() -> bool:
        log = run_dir / "trainer.log"
        return log.exists() and "training.py imported" in log.read_text()

    def hold() -> list[Reason] | None:
        seen.append(imported())
        return [rejected] if ends else None

    outcome = train_on_stream(bundle_factory(ARCH, MARKED_LOOP), byte_stream(TEXT), run_dir, hold=hold)
    assert seen == [False]
    if ends:
        assert (outcome.status, outcome.reasons, outcome.batches) == ("failed", [rejected], 0)
        assert not imported()
    else:
        assert outcome.status == "completed", outcome.reasons
        assert imported() and outcome.batches == outcome.planned_batches > 0


def test_the_scored_trainer_waits_for_the_check_even_under_flag(bundle_factory, tmp_path, monkeypatch):
    """No scored miner code runs beside the check, even under flag, where the check decides nothing: a red team ran
    the two side by side and the check learnt how the scored run went (per-uid kernel counters), then threw it away as
    a system failure for a free re-run, or relayed its text into the report (docs/rules.md)."""
    import prism_ray.evaluation.run as run_module

    seen: list[bool] = []

    def check_while_watching_the_scored_trainer(spec, sizes, batches, byte_lengths, run_dir, time_limit, policy):
        log, until = run_dir / "trainer.log", time.monotonic() + 4
        while time.monotonic() < until and not (log.exists() and "training.py imported" in log.read_text()):
            time.sleep(0.05)
        seen.append(log.exists() and "training.py imported" in log.read_text())
        return check_result()

    monkeypatch.setattr(run_module, "check_contract", check_while_watching_the_scored_trainer)
    settings = Settings(cache_dir=tmp_path / "cache", byte_budget=2_000, runner_threads=2, contract_world_sizes="2",
                        contract_policy="flag")
    settings.gate.mode = "off"
    report = evaluate(bundle_factory(ARCH, MARKED_LOOP), settings)
    assert report.status == "completed", report.reasons
    assert seen == [False] and [check.passed for check in report.contract] == [True]


def check_result(*reasons: Reason) -> list[ContractCheck]:
    return [ContractCheck(world_size=2, passed=not reasons, batches=3, reasons=list(reasons))]


def test_what_the_checks_beside_the_scored_run_decide():
    diverged = Reason(rule="run:ranks_diverged", message="rank 1 diverged")
    killed = Reason(rule="infra:runner_killed", message="killed from outside")
    ends = {}
    for name, checks, reject in (("passed", check_result(), True), ("flagged", check_result(diverged), False),
                                 ("rejected", check_result(diverged), True), ("killed", check_result(killed), False)):
        contract = ContractRun(lambda checks=checks: checks, reject=reject)
        assert contract.join() == checks
        ending = contract.wait()
        ends[name] = [reason.rule for reason in ending] if ending else None
    assert ends == {"passed": None, "flagged": None, "rejected": ["contract:multi_gpu"],
                    "killed": ["infra:runner_killed"]}


def test_a_check_that_raises_raises_in_the_callers_thread():
    def broken() -> list[ContractCheck]:
        raise OSError("no space left for the run dir")

    contract = ContractRun(broken, reject=False)
    with pytest.raises(OSError, match="no space left"):
        contract.join()


def test_the_contract_check_trains_on_random_tokens_never_the_stream():
    """Kernel state outlives a sandbox (the page cache: a red team passed a batch from the check to the scored run),
    so the check never holds locked text."""
    tokens = random_stream(257, seed=1337)
    assert len(tokens) >= 3 * 64 * 1024 and tokens.max() <= 256
    assert (random_stream(257, seed=1337) == tokens).all() and not (random_stream(257, seed=7) == tokens).all()
    assert abs(float(np.bincount(tokens, minlength=257).std()) / (len(tokens) / 257)) < 0.05  # uniform, not text
