"""Real attacks through the real launcher (bubblewrap): each must not take effect, end typed, and leave the
next evaluation working. Attack bundles bypass the static sandbox on purpose (they use the runner directly)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from conftest import byte_stream, train_on_stream
from miners import bigram_architecture
from prism_ray.config import EMBEDDED_DATA_DIR
from prism_ray.harness import isolation, seccomp
from prism_ray.harness.isolation import SandboxPolicy, sandbox_available
from prism_ray.harness.supervise import Runner

pytestmark = [pytest.mark.sandbox, pytest.mark.skipif(not sandbox_available(), reason="bubblewrap is required (apt-get install bubblewrap)")]

TEXT = "Sandboxes are for code you do not trust, which is all code. " * 80
ARCH = bigram_architecture()
HONEST_LOOP = """
    model = ctx.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for batch in ctx.iter_train_batches(model, batch_size=2, seq_len=64, with_logits=True):
        batch.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""


def attack(prelude: str) -> str:
    return "import os\nimport socket\nimport torch\n\ndef train(ctx):\n" + prelude + HONEST_LOOP


def run(bundle_factory, tmp_path, training, **policy):
    policy = SandboxPolicy(mode="required", **policy)
    return train_on_stream(bundle_factory(ARCH, training), byte_stream(TEXT), tmp_path / "run", time_limit=60,
                           policy=policy)


def assert_next_evaluation_runs(bundle_factory, tmp_path):
    outcome = run(bundle_factory, tmp_path / "next", attack(""))
    assert outcome.status == "completed", outcome.reasons


def test_writes_outside_artifacts_do_not_land(bundle_factory, tmp_path):
    targets = [tmp_path / "escape.txt", EMBEDDED_DATA_DIR.parent / "escape.txt", "/etc/escape.txt"]
    prelude = "".join(f"    try:\n        open({str(t)!r}, 'w').write('x')\n    except OSError:\n        pass\n"
                      for t in targets)
    prelude += "    open(os.path.join(ctx.artifacts_dir, 'ok.txt'), 'w').write('scratch is fine')\n"
    outcome = run(bundle_factory, tmp_path, attack(prelude))
    assert outcome.status == "completed", outcome.reasons
    assert not any(os.path.exists(t) for t in targets)


def test_loopback_connection_is_impossible(bundle_factory, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    prelude = (f"    try:\n        socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
               f"        raise SystemExit('connected to the host')\n    except OSError:\n        pass\n")
    outcome = run(bundle_factory, tmp_path, attack(prelude))
    listener.settimeout(0.5)
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()
    assert outcome.status == "completed", outcome.reasons


def test_val_split_is_invisible(bundle_factory, tmp_path):
    data = tmp_path / "locked"
    shutil.copytree(EMBEDDED_DATA_DIR, data)
    val = sorted((data / "val").glob("*"))[0]
    prelude = (f"    try:\n        open({str(val)!r}, 'rb').read()\n        raise SystemExit('read the val split')\n"
               f"    except OSError:\n        pass\n")
    outcome = run(bundle_factory, tmp_path, attack(prelude), hidden=(data,))
    assert outcome.status == "completed", outcome.reasons


def test_fork_bomb_is_contained(bundle_factory, tmp_path):
    outcome = run(bundle_factory, tmp_path, attack("    while True:\n        os.fork()\n"), max_processes=64)
    assert outcome.status == "failed"
    assert outcome.reasons[0].rule in ("run:process_limit", "run:crash", "run:timeout")
    deadline = time.monotonic() + 15  # the pid namespace is torn down asynchronously once its init exits
    while (leftover := subprocess.run(["pgrep", "-u", "65534"], capture_output=True, text=True).stdout.split()) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftover == []
    assert_next_evaluation_runs(bundle_factory, tmp_path)


FORK_UNTIL_REFUSED = """
import os, sys, time
children = 0
while True:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children += 1
print(f"refused after {children} children", flush=True)
time.sleep(60)
"""
FORK_A_FEW = """
import os
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print("forked 8 children", flush=True)
"""


def test_process_limit_is_per_run_not_per_uid(tmp_path):
    """One run's fork bomb exhausts its own cgroup's pids.max; a run beside it, under the same uid, still forks."""
    assert isolation._cgroup_home() is not None, "this node has no writable pids cgroup (docs/operator.md)"
    policy = SandboxPolicy(mode="required", max_processes=24)
    env = {"PATH": "/usr/bin:/bin"}
    bomb = isolation.launch([sys.executable, "-c", FORK_UNTIL_REFUSED], env, tmp_path / "bomb.log", tmp_path, policy)
    try:
        deadline = time.monotonic() + 30
        while "refused" not in (tail := bomb.log_tail()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "refused after" in tail, tail
        cgroup = bomb.cgroup.path
        assert int((cgroup / "pids.current").read_text()) >= 20  # the bomb holds its whole allowance
        neighbour = isolation.launch([sys.executable, "-c", FORK_A_FEW], env, tmp_path / "n.log", tmp_path, policy)
        assert neighbour.wait(30) == 0, neighbour.log_tail()
        assert "forked 8 children" in neighbour.log_tail()
    finally:
        bomb.kill()
    assert not cgroup.exists()  # removed with the run


def test_memory_balloon_is_typed(bundle_factory, tmp_path):
    prelude = "    balloon = torch.empty(16 << 30, dtype=torch.uint8)\n    balloon.fill_(1)\n"
    outcome = run(bundle_factory, tmp_path, attack(prelude), address_space_bytes=6 << 30)
    assert outcome.status == "failed"
    assert outcome.reasons[0].rule == "run:out_of_memory"
    assert (outcome.reasons[0].file, outcome.reasons[0].line) == ("training.py", 6)


def test_artifacts_quota_is_typed(bundle_factory, tmp_path):
    prelude = ("    with open(os.path.join(ctx.artifacts_dir, 'big.bin'), 'wb') as f:\n"
               "        for _ in range(64):\n            f.write(b'0' * (1 << 20))\n")
    outcome = run(bundle_factory, tmp_path, attack(prelude), artifacts_quota_bytes=8 << 20)
    assert outcome.status == "failed"
    assert outcome.reasons[0].rule == "run:artifacts_quota"


def test_infinite_loop_is_cut_by_the_wall_clock(bundle_factory, tmp_path):
    training = attack("    while True:\n        pass\n")
    outcome = train_on_stream(bundle_factory(ARCH, training), byte_stream(TEXT), tmp_path / "run", time_limit=6,
                              policy=SandboxPolicy(mode="required"))
    assert outcome.reasons[0].rule == "run:timeout"
    assert_next_evaluation_runs(bundle_factory, tmp_path)


def test_loss_monkeypatch_changes_nothing(bundle_factory, tmp_path):
    honest = run(bundle_factory, tmp_path / "a", attack(""))
    patched = run(bundle_factory, tmp_path / "b", attack(
        "    import torch.nn.functional as F\n    F.cross_entropy = lambda *a, **k: torch.zeros((), requires_grad=True)\n"
        "    torch.Tensor.item = lambda self: 0.0\n"))
    assert honest.status == patched.status == "completed", patched.reasons
    # the loss that counts is computed in the scorer, which never runs training.py: the patch changes nothing
    assert patched.batch_nats == honest.batch_nats


def test_an_install_under_tmp_is_bound_over_the_sandbox_tmp(tmp_path, monkeypatch):
    """A venv in a temp dir (as a CI checkout under /tmp has) stays visible: it is bound after the sandbox's own
    fresh /tmp, which would otherwise hide it and make every run `run:crash`."""
    site = tmp_path / "venv-site"
    site.mkdir()
    (site / "installed.txt").write_text("from the venv under /tmp\n")
    assert Path("/tmp") in site.resolve().parents
    python_dirs = isolation._python_dirs
    monkeypatch.setattr(isolation, "_python_dirs", lambda: [*python_dirs(), site.resolve()])
    process = isolation.launch(["cat", str(site / "installed.txt")], {"PATH": "/usr/bin:/bin"}, tmp_path / "cat.log",
                               tmp_path, SandboxPolicy(mode="required"))
    assert process.wait(30) == 0, process.log_tail()
    assert process.log_tail().strip() == "from the venv under /tmp"


def test_status_137_from_inside_is_a_crash_not_a_free_retry(bundle_factory, tmp_path):
    """exit(137) looks like SIGKILL through bwrap; only the sandbox killed whole is an outside kill (a red team
    turned its own failure into `infra:runner_killed`, retried and never charged)."""
    outcome = run(bundle_factory, tmp_path, attack("    os._exit(137)\n"))
    assert outcome.status == "failed" and [r.rule for r in outcome.reasons] == ["run:crash"], outcome.reasons


def test_a_runner_the_parent_had_to_stop_is_a_crash_not_an_outside_kill(tmp_path):
    """The parent kills a runner that outlives its time (an exporter that does not exit after its graph, a graph
    landed at the deadline): that SIGKILL is ours, not an operator's, so it must not read as `infra:runner_killed` (a
    red team's way to turn a failure under a replica's secret seed into a system failure that leaves the score)."""
    runner = Runner("exporter", tmp_path, 1, SandboxPolicy(mode="required"), (), None)
    try:
        assert runner.wait(0.5) is None  # it waits for a parent that never speaks
        reason = runner.end_reason("it did not exit")
    finally:
        runner.close()
    assert reason.rule == "run:crash" and "was stopped" in reason.message, reason


def test_a_runners_socket_dir_is_gone_once_it_has_connected(tmp_path):
    """A parent killed mid-run (a Ray worker at shutdown, a SIGKILLed CLI) cleans nothing up: its runners' socket
    dirs in /tmp must already be gone by then (hundreds had piled up on a test machine)."""
    runner = Runner("exporter", tmp_path, 1, SandboxPolicy(mode="required"), (), None)
    try:
        assert runner.ipc_dir.is_dir()
        runner.accept(time.monotonic() + 60)
        assert not runner.ipc_dir.exists() and runner.process.poll() is None
    finally:
        runner.close()


def test_the_checkout_around_an_editable_install_is_not_in_the_sandbox(tmp_path):
    """Only the package dir is bound: the checkout it sits in has .git and tests, which hold the locked text's
    shards and copies of it (found by a red team: code that gets past the policy read val text out of .git)."""
    root = Path(isolation.__file__).resolve().parents[2]
    outside = {entry.name for entry in root.iterdir()}
    assert {"prism_ray", "tests", ".git"} <= outside  # this checkout is an editable install: the case that matters
    process = isolation.launch(["ls", "-a", str(root)], {"PATH": "/usr/bin:/bin"}, tmp_path / "ls.log", tmp_path,
                               SandboxPolicy(mode="required"))
    assert process.wait(30) == 0, process.log_tail()
    inside = set(process.log_tail().split())
    assert "prism_ray" in inside and not inside & {".git", "tests", "pyproject.toml"}, inside  # .venv may be there


def test_the_installs_documentation_text_is_not_in_the_sandbox(tmp_path):
    """Text no import needs is hidden: a red team's loop read the Python docs of pydoc_data (past the policy, through
    a file reader it did not know) and pretrained on them, 1.1 bpb below its honest twin on the embedded data."""
    topics = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    assert topics.is_file()
    script = (f"test -r {topics} || echo topics hidden; "
              "test -z \"$(ls -A /usr/share/doc /usr/share/man 2>/dev/null)\" && echo docs hidden; "
              "test -r /usr/lib/os-release -o -r /etc/os-release && echo system readable")
    process = isolation.launch(["sh", "-c", script], {"PATH": "/usr/bin:/bin"}, tmp_path / "sh.log", tmp_path,
                               SandboxPolicy(mode="required"))
    assert process.wait(30) == 0, process.log_tail()
    assert process.log_tail().split("\n") == ["topics hidden", "docs hidden", "system readable"], process.log_tail()


def test_sandboxed_code_holds_no_capability_and_runs_as_nobody(bundle_factory, tmp_path):
    """As root the launcher keeps CAP_SETUID, CAP_SETGID and CAP_SETPCAP only for setpriv, which must leave the
    miner's process with every capability set empty (a bounding set with anything left in it could be regained)."""
    prelude = ("    status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines()\n"
               "                  if line.startswith(('Cap', 'Uid')))\n"
               "    assert not any(int(status[n], 16) for n in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb')) "
               "and status['Uid'].split()[0] != '0', status\n")
    outcome = run(bundle_factory, tmp_path, attack(prelude))
    assert outcome.status == "completed", outcome.reasons


KEYRING = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
ADD_KEY, KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
added = libc.syscall(ADD_KEY, b"user", b"prism-test", b"stream text", 11, -4)  # into the uid's user keyring
print("add_key", added, ctypes.get_errno())
found = libc.syscall(KEYCTL, 10, -4, b"user", b"prism-test", 0)  # KEYCTL_SEARCH: a key an earlier run left
print("search", found, ctypes.get_errno())
"""


def test_the_kernel_key_store_is_refused_so_no_run_leaves_anything_for_another(tmp_path):
    """Every as-root sandbox runs as one uid, whose kernel keyring outlives the sandbox: a red team passed the
    contract check's batches to the scored run through it. The seccomp filter answers EPERM (harness/seccomp.py)."""
    for attempt in ("first", "second"):
        process = isolation.launch([sys.executable, "-c", KEYRING], {"PATH": "/usr/bin:/bin"},
                                   tmp_path / f"{attempt}.log", tmp_path, SandboxPolicy(mode="required"))
        assert process.wait(30) == 0, process.log_tail()
        assert process.log_tail().split() == ["add_key", "-1", "1", "search", "-1", "1"], process.log_tail()


def test_the_filter_refuses_exactly_the_key_calls_and_other_abis():
    """The BPF program, run by a small interpreter of its four instructions: native key calls and every call of
    another ABI are refused, everything else allowed."""
    def verdict(program: bytes, arch: int, number: int) -> int:
        data, pc = {0: number, 4: arch}, 0
        while True:
            code, jt, jf, k = struct.unpack_from("=HBBI", program, 8 * pc)
            if code == 0x20:
                accumulator = data[k]
            elif code in (0x15, 0x35):
                hit = accumulator == k if code == 0x15 else accumulator >= k
                pc += jt if hit else jf
            elif code == 0x06:
                return k
            pc += 1

    allow, refuse = 0x7FFF0000, 0x00050000 | 1
    for machine, arch, keys, other in (("x86_64", 0xC000003E, (248, 249, 250), (0, 1, 59, 247, 251, 435)),
                                       ("aarch64", 0xC00000B7, (217, 218, 219), (63, 64, 216, 220))):
        program = seccomp.program(machine)
        assert program is not None
        assert [verdict(program, arch, n) for n in keys] == [refuse] * 3
        assert [verdict(program, arch, n) for n in other] == [allow] * len(other)
        assert verdict(program, 0x40000003, 1) == refuse  # i386 through int 0x80
    assert verdict(seccomp.program("x86_64"), 0xC000003E, 0x40000000 | 248) == refuse  # x32
    assert seccomp.program("riscv64") is None
