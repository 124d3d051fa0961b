"""The runner's rules: forced seed, typed failures with file:line, wall clock, model identity."""

from __future__ import annotations

import pytest

from conftest import byte_stream, train_on_stream
from miners import bigram_architecture

pytestmark = pytest.mark.sandbox

TEXT = "The runner owns nothing but the model; the parent owns the stream. " * 60

ARCH = bigram_architecture()

LOOP = """
import torch
import torch.nn.functional as F

def train(ctx):
    PRELUDE
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for batch in ctx.iter_train_batches(model, batch_size=2, seq_len=32, with_logits=True):
        batch.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""


def loop(prelude: str) -> str:
    return LOOP.replace("PRELUDE", prelude)


def run(bundle_factory, tmp_path, training: str, architecture: str = ARCH, **kwargs):
    return train_on_stream(bundle_factory(architecture, training), byte_stream(TEXT), tmp_path / "run", **kwargs)


def test_same_bundle_twice_gives_identical_bpb(bundle_factory, tmp_path):
    first = run(bundle_factory, tmp_path / "a", loop("model = ctx.build_model()"))
    second = run(bundle_factory, tmp_path / "b", loop("model = ctx.build_model()"))
    assert first.status == second.status == "completed"
    assert first.batch_nats == second.batch_nats


def test_miner_cannot_change_the_forced_init(bundle_factory, tmp_path):
    honest = run(bundle_factory, tmp_path / "a", loop("model = ctx.build_model()"))
    reseeded = run(bundle_factory, tmp_path / "b", loop("torch.manual_seed(999); model = ctx.build_model()"))
    direct = run(bundle_factory, tmp_path / "c", loop(
        "from architecture import build_model; torch.manual_seed(7); model = build_model(ctx)"))
    assert honest.status == reseeded.status == direct.status == "completed"
    assert honest.batch_nats[0] == reseeded.batch_nats[0] == direct.batch_nats[0]
    other_seed = run(bundle_factory, tmp_path / "d", loop("model = ctx.build_model()"), seed=4242)
    assert other_seed.batch_nats[0] != honest.batch_nats[0]


def test_ctx_is_read_only(bundle_factory, tmp_path):
    outcome = run(bundle_factory, tmp_path, loop("ctx.seed = 1\n    model = ctx.build_model()"))
    assert outcome.status == "failed"
    reason = outcome.reasons[0]
    assert reason.rule == "run:exception" and "FrozenInstanceError" in reason.message
    assert (reason.file, reason.line) == ("training.py", 6)


def test_miner_exception_carries_file_and_line(bundle_factory, tmp_path):
    training = loop("model = ctx.build_model()").replace("optimizer.step()", "raise ValueError('diverged')")
    outcome = run(bundle_factory, tmp_path, training)
    assert outcome.status == "failed"
    assert outcome.reasons[0].rule == "run:exception"
    assert "ValueError: diverged" in outcome.reasons[0].message
    assert (outcome.reasons[0].file, outcome.reasons[0].line) == ("training.py", 10)


def test_stopping_early_is_not_scored(bundle_factory, tmp_path):
    training = loop("model = ctx.build_model()").replace("optimizer.zero_grad()", "optimizer.zero_grad()\n        break")
    outcome = run(bundle_factory, tmp_path, training)
    assert outcome.status == "failed"
    assert outcome.reasons[0].rule == "run:stopped_early"


def test_wall_clock_cap_fails_the_run(bundle_factory, tmp_path):
    training = loop("model = ctx.build_model()").replace("optimizer.step()", "while True: pass")
    outcome = run(bundle_factory, tmp_path, training, time_limit=6)
    assert outcome.status == "failed"
    assert outcome.reasons[0].rule == "run:timeout"
    assert outcome.stopped_reason == "wall_clock_exceeded"


def test_model_must_come_from_build_model(bundle_factory, tmp_path):
    prelude = "from architecture import Bigram\n    model = Bigram(ctx.vocab_size)"
    outcome = run(bundle_factory, tmp_path, loop(prelude))
    assert [r.rule for r in outcome.reasons] == ["run:model_identity"]


def test_compiled_wrapper_is_accepted(bundle_factory, tmp_path):
    training = loop("model = ctx.build_model()").replace("ctx.iter_train_batches(model,",
                                                         "ctx.iter_train_batches(torch.compile(model, backend='eager'),")
    outcome = run(bundle_factory, tmp_path, training)
    assert outcome.status == "completed", outcome.reasons


def test_tensor_subclass_logits_are_refused(bundle_factory, tmp_path):
    architecture = ARCH.replace("return self.table(tokens)", "return self.table(tokens).as_subclass(Sneaky)") \
        .replace("class Bigram", "class Sneaky(torch.Tensor):\n    pass\n\nclass Bigram")
    outcome = run(bundle_factory, tmp_path, loop("model = ctx.build_model()"), architecture=architecture)
    assert outcome.status == "failed"
    assert outcome.reasons[0].rule == "contract:not_exportable"  # a subclass's own code cannot become a graph


def test_parameter_cap(bundle_factory, tmp_path):
    outcome = run(bundle_factory, tmp_path, loop("model = ctx.build_model()"), max_params=1000)
    assert outcome.reasons[0].rule == "contract:param_cap"


@pytest.mark.parametrize("geometry,rule", [("batch_size=0, seq_len=32", "run:bad_geometry"),
                                           ("batch_size=2, seq_len=1", "run:bad_geometry"),
                                           ("batch_size=2, seq_len=4096", "run:bad_geometry")])
def test_bad_geometry_is_refused(bundle_factory, tmp_path, geometry, rule):
    training = loop("model = ctx.build_model()").replace("batch_size=2, seq_len=32", geometry)
    outcome = run(bundle_factory, tmp_path, training)
    assert outcome.status == "failed"
    assert outcome.reasons[0].rule == rule


def test_deterministic_algorithms_are_forced_for_eager_and_compiled_code(bundle_factory, tmp_path):
    check = ("import os, torch._inductor.config as inductor\n"
             "    assert torch.are_deterministic_algorithms_enabled()\n"
             "    assert torch.is_deterministic_algorithms_warn_only_enabled()\n"
             "    assert inductor.deterministic and os.environ['TORCHINDUCTOR_DETERMINISTIC'] == '1'\n"
             "    model = ctx.build_model()")
    outcome = run(bundle_factory, tmp_path, loop(check))
    assert outcome.status == "completed", outcome.reasons


@pytest.mark.parametrize("where,line", [("build", 14), ("forward", 11)])
def test_an_architecture_that_raises_before_any_data_names_its_file_and_line(bundle_factory, tmp_path, where, line):
    """The instantiation probe runs in the scorer: its exceptions point into the bundle like any other."""
    architecture = ARCH.replace("return self.table(tokens)", "return self.table(tokens) @ self.projection") \
        if where == "forward" else ARCH.replace("return Bigram(ctx.vocab_size)", "return Bigram(ctx.vocab_sise)")
    outcome = run(bundle_factory, tmp_path, loop("model = ctx.build_model()"), architecture=architecture)
    assert outcome.status == "failed" and outcome.before_data and outcome.batches == 0
    reason = outcome.reasons[0]
    assert reason.rule == "run:exception"
    assert (reason.file, reason.line) == ("architecture.py", line), reason


def test_a_run_is_three_sandboxed_interpreters_and_the_scorer_holds_no_bundle(bundle_factory, tmp_path):
    """A run starts three sandboxed interpreters: the exporter (architecture.py only), the trusted scorer (no bundle
    file at all: its sandbox binds neither bundle copy) and the trainer; none holds another's process."""
    import os
    import subprocess
    import threading

    training = loop("model = ctx.build_model()").replace("optimizer.zero_grad()", "optimizer.zero_grad()\n"
                                                          "        import time; time.sleep(0.05)")
    result = {}
    thread = threading.Thread(target=lambda: result.update(outcome=run(bundle_factory, tmp_path, training)))
    thread.start()
    seen: dict[int, tuple[str, str]] = {}
    sandboxes: dict[int, str] = {}
    while thread.is_alive():
        listing = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
        table = {int(pid): (int(ppid), args) for pid, ppid, args in (line.split(None, 2) for line in listing.splitlines())}
        ours = {pid for pid, (ppid, args) in table.items() if args.split()[0].endswith("bwrap") and ppid == os.getpid()}
        sandboxes.update({pid: table[pid][1] for pid in ours})
        for pid, (ppid, args) in table.items():
            argv, ancestor = args.split(), ppid
            while ancestor in table and ancestor not in ours:  # only this run's sandboxes: the machine is shared
                ancestor = table[ancestor][0]
            if ancestor in ours and argv[0].rsplit("/", 1)[-1].startswith("python") and argv[1] == "-m" \
                    and argv[2].startswith("prism_ray.harness."):
                seen[pid] = (argv[2], argv[-1])
        threading.Event().wait(0.2)
    thread.join()
    assert result["outcome"].status == "completed", result["outcome"].reasons
    assert sorted(seen.values()) == [("prism_ray.harness.runner", "exporter"), ("prism_ray.harness.runner", "trainer"),
                                     ("prism_ray.harness.scorer", "scorer")], seen
    scorer = [args for args in sandboxes.values() if "prism_ray.harness.scorer" in args]
    assert len(scorer) == 1 and str(tmp_path / "run" / "bundle") not in scorer[0] \
        and "exporter-bundle" not in scorer[0], scorer


def test_an_entry_file_in_a_folder_is_imported_by_its_dotted_name(bundle_factory, tmp_path):
    """Imported under its bare stem, `sub/arch.py` would answer every later `import arch` in place of the top-level
    `arch.py` the policy resolved it to (a red team reached torch.load that way)."""
    training = loop("from arch import MARK\n    print(MARK, flush=True)\n    model = ctx.build_model()")
    bundle = bundle_factory(ARCH, training, prism_yaml="tokenizer: bytes\narchitecture: sub/arch.py::build_model\n",
                            extra={"sub/arch.py": ARCH, "arch.py": "MARK = 'the top-level arch.py'\n"})
    outcome = train_on_stream(bundle, byte_stream(TEXT), tmp_path / "run")
    assert outcome.status == "completed", outcome.reasons
    assert "the top-level arch.py" in (tmp_path / "run" / "trainer.log").read_text()


def test_a_bundle_module_the_runner_already_holds_is_refused(bundle_factory, tmp_path):
    """`from __main__ import os` would reach the runner's own module, not the bundle's `__main__.py` the policy
    read (the policy refuses that name too; the runner refuses any name it already holds, `cython_runtime` …)."""
    bundle = bundle_factory(ARCH, loop("model = ctx.build_model()"), extra={"__main__.py": "x = 1\n"})
    outcome = train_on_stream(bundle, byte_stream(TEXT), tmp_path / "run")
    assert [reason.rule for reason in outcome.reasons] == ["contract:module_name"], outcome.reasons
    assert "__main__" in outcome.reasons[0].message
