"""The docs stay true: every `prism-ray` command in a shell block of README.md or docs/*.md runs here for real, as the
docs write it (through bash, in a workspace holding the files it names), and its result is checked.

The docs' placeholders become real things (SUBSTITUTIONS): a bundle, a zip, Parquet inputs, a dataset locked by the
documented `data prepare` itself, a bittensor wallet and a key file under a temporary HOME, the URL of a live server,
the id of a real submission. A newly documented command runs as soon as it is written, and fails here until its
subcommand has a check and its files exist."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import httpx
import pytest
import torch
from bittensor_wallet import Keypair, Wallet

from conftest import REPO, write_bundle
from miners import bigram_architecture, learner_loop
from prism_ray.cli.client import bundle_bytes
from prism_ray.config import EMBEDDED_DATA_DIR
from prism_ray.data.dataset import open_dataset
from prism_ray.store import Store
from serve_app import openapi_doc

pytestmark = pytest.mark.docs

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CLI = [sys.executable, "-m", "prism_ray.cli.command"]
SHELL_BLOCK = re.compile(r"```(?:bash|sh|shell|console)$")

# What the docs' placeholders are here, applied in this order. Paths are relative to the workspace; {url} and
# {submission} exist once the cluster's server runs and the first submission is made.
SUBSTITUTIONS = [
    ("path/to/bundle", "bundle"),
    ("project/", "bundle"),
    ("my-bundle", "bundle"),  # and `./my-bundle`
    ("my-dataset", "locked"),
    ("/data/fineweb-locked", "locked"),  # made by the documented `data prepare`
    ("http://127.0.0.1:8000", "{url}"),
    ("https://prism.example.org", "{url}"),
    ("SUBMISSION_ID", "{submission}"),
    ("sub_0f3c…", "{submission}"),
]
# Options added after the documented line: a free port (8000 may be taken); the demo on a small budget, in the
# workspace (its default is a temp dir that outlives the test).
EXTRA_OPTIONS = {"serve": "--port {port}", "demo": "--byte-budget 2000 --port {port} --state-dir demo-state"}
SMALL_RUNS = {"PRISM_BYTE_BUDGET": "4000", "PRISM_SCORING_HELDOUT_BYTE_BUDGET": "2000", "PRISM_RUNNER_THREADS": "1",
              "PRISM_CONTRACT_WORLD_SIZES": "",
              # re-runs of the cluster's scores: trainings no check here reads (tests/test_cluster.py has theirs)
              "PRISM_REPLICA_MODE": "off", "PRISM_AUDIT_MODE": "off",
              "PRISM_CLUSTER_DASHBOARD": "false",  # a few CPU-seconds per cluster start; test_service checks it
              "PRISM_GATE_MODE": "off"}  # README's cluster block exports it: a trial without an LLM key
CLUSTER_ORDER = ["submit", "status", "leaderboard", "export"]  # the first submission's id is {submission}
SUBMISSION_ID = re.compile(r"sub_[0-9a-f]{32}")
AS_TERMINAL = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}  # rich draws as on a terminal, live
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        in_shell = False
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                in_shell = not in_shell and bool(SHELL_BLOCK.fullmatch(line))
                continue
            command = line.split("#")[0].strip()
            match = re.search(r"(?:^|&& )(prism-ray \S.*)$", command)
            if in_shell and match:
                found.append((doc.name, match.group(1)))
    return found


def documented_recipes() -> list[str]:
    """Python blocks that post to the docs' example server: docs/api.md's signing recipe."""
    blocks = [block.split("```")[0] for doc in DOCS for block in doc.read_text().split("```python\n")[1:]]
    return [block for block in blocks if "https://prism.example.org" in block]


def subcommand(command: str) -> str:
    words = command.split()
    return " ".join(words[1:3] if words[1] == "data" else words[1:2])


def on_cluster(command: str) -> bool:
    return subcommand(command) in CLUSTER_ORDER or (subcommand(command) == "serve" and "--address" in command)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(repr=False)
class Done:
    line: str
    returncode: int
    stdout: str
    stderr: str
    served: dict[str, dict] = field(default_factory=dict)  # what the live API said about it (path -> JSON)

    def __repr__(self) -> str:
        return f"$ {self.line}\n[exit {self.returncode}]\n{self.stdout[-4000:]}\n{self.stderr[-4000:]}"


class Workspace:
    """The directory the commands run in, holding every file they name, a HOME with the miner's keys, and the
    results: each distinct command (after substitution) runs once, wherever in the docs it appears."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        # PYTHONPATH passes through: a worktree run with it on the path tests its own code, not the installed one
        self.env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(self.home),
                    "COLUMNS": "200", **SMALL_RUNS,
                    **{name: os.environ[name] for name in ("PYTHONPATH",) if name in os.environ}}
        self.values: dict[str, str] = {}  # {url}, {submission}
        self.results: dict[str, Done] = {}
        self.streams: dict[str, Future] = {}
        self._logs = itertools.count()

    def substitute(self, text: str) -> str:
        """The docs' placeholders replaced; {url} and {submission} stay until `fill`."""
        for placeholder, value in SUBSTITUTIONS:
            text = text.replace(placeholder, value)
        if not torch.cuda.is_available():  # a CPU-only machine runs the documented CUDA dry run on its CPU
            text = text.replace("--device cuda", "--device cpu")
        return text

    def fill(self, text: str) -> str:
        for name, value in self.values.items():
            text = text.replace(f"{{{name}}}", value)
        assert not re.search(r"\{(url|submission)\}", text), f"no value yet for a placeholder in {text!r}"
        return text

    def key(self, command: str) -> str:
        return " ".join(self.substitute(command).split())

    def result(self, command: str, env: dict[str, str] | None = None) -> Done:
        if self.key(command) not in self.results:
            if subcommand(command) == "serve":
                with self.serving(command, env):
                    pass
            else:
                self.results[self.key(command)] = self.run(self._line(command), env)
        return self.results[self.key(command)]

    def run(self, line: str, env: dict[str, str] | None = None) -> Done:
        process, log = self._start(line, env)
        with owned(process):
            process.wait(timeout=300)
        return self._finish(process, line, log)

    @contextlib.contextmanager
    def serving(self, command: str, env: dict[str, str] | None = None) -> Iterator[str]:
        """Start a documented `serve`, wait until it serves, yield its URL; then record what it answers, stop it
        with SIGINT (Ctrl-C) and record how it exited."""
        line = self._line(command)
        url = f"http://127.0.0.1:{line.split('--port ')[1].split()[0]}"
        process, log = self._start(line, env)
        with owned(process):
            wait_until_serving(url, process, log.with_suffix(".err"))
            yield url
            served = {path: httpx.get(url + path, timeout=30).json() for path in ("/health", "/v1/leaderboard")}
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        self.results[self.key(command)] = self._finish(process, line, log, served)

    def _line(self, command: str) -> str:
        extra = EXTRA_OPTIONS.get(subcommand(command), "").format(port=free_port())
        return f"{self.fill(self.key(command))} {extra}".strip()

    def _start(self, line: str, env: dict[str, str] | None) -> tuple[subprocess.Popen, Path]:
        """`exec`, so signals reach prism-ray itself; a session of its own, so what it leaves behind is found."""
        log = self.root / "logs" / f"{next(self._logs)}"
        log.parent.mkdir(exist_ok=True)
        with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
            return subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=self.root, env={**self.env, **(env or {})},
                                    stdout=out, stderr=err, start_new_session=True), log

    def _finish(self, process: subprocess.Popen, line: str, log: Path, served: dict | None = None) -> Done:
        return Done(line, process.returncode, log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text(),
                    served or {})


def wait_until_serving(url: str, process: subprocess.Popen, stderr: Path, timeout: float = 180.0) -> None:
    """Up once /health answers and the CLI has said so (Ray Serve can answer before `serve.run` returns)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if "serving at" in stderr.read_text() and httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"{url} never came up (exit {process.poll()}):\n{stderr.read_text()[-4000:]}")


def session_pids(sid: int) -> list[int]:
    rows = (row.split() for row in subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True,
                                                  text=True).stdout.splitlines())
    return [int(pid) for pid, owner in rows if int(owner) == sid]


@contextlib.contextmanager
def owned(process: subprocess.Popen, grace: float = 20.0) -> Iterator[None]:
    """Whatever happens inside, the process and everything it started (Ray's GCS, raylet, workers: all in its
    session) end on leaving; a process that ends by itself and leaves something behind fails the test."""
    try:
        yield
    finally:
        process.kill()  # a no-op once it has exited
        deadline = time.monotonic() + grace
        while (left := session_pids(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"processes {left} outlived `{' '.join(process.args)}`"


@contextlib.contextmanager
def ray_head(workspace: Workspace) -> Iterator[dict[str, str]]:
    """`ray start --head` with one logical GPU and a Ray temp dir of its own; yields the environment in which
    `--address auto` finds this cluster (and no other) through that dir, as it does on a head node. Stopped by SIGINT
    to `ray start --block`, which ends every process of this cluster (never `ray stop`: it ends every Ray here)."""
    port = free_port()
    env = {"RAY_TMPDIR": f"/tmp/ray-docs-{port}"}  # short: Ray's socket paths are length-capped
    log = workspace.root / "ray-head.log"
    with open(log, "w") as out:
        head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--num-gpus=1",
                                 "--include-dashboard=false", "--disable-usage-stats"],
                                env={**workspace.env, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    with owned(head):
        try:
            deadline = time.monotonic() + 120
            while "block forever" not in log.read_text():
                assert head.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            yield env
        finally:
            head.send_signal(signal.SIGINT)
            head.wait(timeout=60)
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def write_parquet_inputs(directory: Path, documents: int = 400) -> None:
    """FineWeb-Edu-like input: two Parquet files of `id` and `text`, real paragraphs of the embedded Python docs."""
    lines = (line.strip() for text in open_dataset(EMBEDDED_DATA_DIR).iter_documents("train")
             for line in text.splitlines())
    texts = [line for line in lines if 60 <= len(line.encode()) <= 200][:documents]
    directory.mkdir()
    with duckdb.connect() as con:
        con.execute("CREATE TABLE docs (id VARCHAR, text VARCHAR)")
        con.executemany("INSERT INTO docs VALUES (?, ?)", [(f"doc-{n}", text) for n, text in enumerate(texts)])
        for part in (0, 1):
            con.execute(f"COPY (SELECT * FROM docs WHERE hash(id) % 2 = {part}) "
                        f"TO '{directory}/part-{part:05d}.parquet' (FORMAT parquet)")


def run_all(workspace: Workspace, commands: list[str], env: dict[str, str] | None = None) -> None:
    for command in commands:
        workspace.result(command, env)


def cluster_session(workspace: Workspace, commands: list[str]) -> None:
    """A Ray cluster made by `ray start --head`, then on it, in the order an operator and a miner go: the first
    documented `serve --address` answers every documented client command, recipe and export; the other documented
    `serve --address` lines then restart the API over the same detached store."""
    first, *restarts = [command for command in commands if subcommand(command) == "serve"]
    clients = sorted((command for command in commands if subcommand(command) != "serve"),
                     key=lambda command: CLUSTER_ORDER.index(subcommand(command)))
    # The miners the docs sign as are the registered ones (docs/operator.md, "Registered hotkeys").
    allowlist = workspace.root / "allowed-hotkeys.txt"
    allowlist.write_text("".join(f"{signer(option, workspace)}\n" for option in ("--wallet", "--key-file")))
    with ray_head(workspace) as ray_env:
        env = {**ray_env, "PRISM_CACHE_DIR": str(workspace.root / "cluster-state"), "PRISM_REGISTRY_MODE": "allowlist",
               "PRISM_REGISTRY_FILE": str(allowlist)}
        with workspace.serving(first, env) as url:
            workspace.values["url"] = url
            for command in clients:
                done = workspace.result(command, env)
                done.served.update({path: httpx.get(url + path, timeout=30).json() for path in
                                    {f"/v1/submissions/{found}" for found in SUBMISSION_ID.findall(done.stdout)}})
                if subcommand(command) == "submit":
                    workspace.values.setdefault("submission", SUBMISSION_ID.search(done.stdout).group())
            for n, recipe in enumerate(documented_recipes()):
                (workspace.root / f"recipe-{n}.py").write_text(workspace.fill(workspace.substitute(recipe)))
                workspace.results[f"recipe-{n}"] = workspace.run(f"python recipe-{n}.py", env)
        for command in restarts:
            workspace.result(command, env)


def stream(command: str) -> str:
    """Which of the module's three side-by-side streams runs it (each distinct command once)."""
    return "cluster" if on_cluster(command) else "demo" if subcommand(command) == "demo" else "local"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Iterator[Workspace]:
    """The files the docs name, then every documented command, in three streams side by side: `ray start` and what
    runs on it, the demo, and the rest. Much of each is waiting (Ray starting, a server polled), so together they
    take about half as long as one after the other."""
    ws = Workspace(tmp_path_factory.mktemp("docs"))
    bundle = write_bundle(ws.root / "bundle", bigram_architecture(), learner_loop(any_world_size=True),
                          "name: docs-bigram\ntokenizer: bytes\n")
    # The same code zipped: submitted under another hotkey it is a duplicate, which costs the cluster no training
    (ws.root / "model.zip").write_bytes(bundle_bytes(bundle))
    write_parquet_inputs(ws.root / "fineweb-edu")
    Wallet(name="miner", hotkey="default", path=str(ws.home / ".bittensor" / "wallets")).create_new_hotkey(
        use_password=False, overwrite=True, suppress=True)
    (ws.home / ".prism").mkdir()
    (ws.home / ".prism" / "hotkey.txt").write_text(Keypair.generate_mnemonic() + "\n")
    # Ray turns token auth on for a cluster started while ~/.ray/auth_token exists, and a local `ray.init` writes
    # one: made up front, every cluster and driver here agrees, whichever starts first.
    subprocess.run(["ray", "get-auth-token", "--generate"], env=ws.env, capture_output=True, check=True)
    commands = list(dict.fromkeys(command for _, command in documented_commands()))
    prepares = [command for command in commands if subcommand(command) == "data prepare"]
    assert len(prepares) == 1, f"one documented `data prepare` makes the locked dataset; found {prepares}"
    with ThreadPoolExecutor(3) as pool:
        ws.streams = {"cluster": pool.submit(cluster_session, ws, [c for c in commands if stream(c) == "cluster"]),
                      # the demo as in a terminal, where its bars are live
                      "demo": pool.submit(run_all, ws, [c for c in commands if stream(c) == "demo"], AS_TERMINAL),
                      # first the documented `data prepare`, which locks the dataset the others read (its own
                      # test checks how it went); its own local Ray last, once the dry runs are done; `--byte-budget
                      # 0` scores the whole train split of the default dataset: the small locked one keeps that short
                      "local": pool.submit(run_all, ws, sorted((c for c in commands if stream(c) == "local"),
                                                               key=lambda c: (c not in prepares, subcommand(c) == "serve")),
                                           {"PRISM_DATA_DIR": str(ws.root / "locked")})}
        yield ws


# --------------------------------------------------------------------------------------------- the checks


def parse_report(done: Done) -> dict:
    """The eval report: the --json object, or the fields the text report shows."""
    if "--json" in done.line.split():
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 1, done  # exactly one JSON object
        report = json.loads(lines[0])
        return {**report, "data": report["data"]["path"]}
    status = re.match(r"(\w+) at stage (\w+)", done.stdout)
    rows = dict(re.findall(r"^(bpb|stopped|data) +(\S+)", done.stdout, re.MULTILINE))
    assert status and rows.keys() == {"bpb", "stopped", "data"}, done
    return {"status": status[1], "stage": status[2], "bpb": float(rows["bpb"]), "stopped_reason": rows["stopped"],
            "data": rows["data"]}


def check_eval(done: Done, ws: Workspace) -> None:
    assert done.returncode == 0, done
    report = parse_report(done)
    assert (report["status"], report["stage"]) == ("completed", "score"), done
    assert 0 < report["bpb"] < 20, done
    whole_split = "--byte-budget 0" in done.line
    assert report["stopped_reason"] == ("stream_exhausted" if whole_split else "byte_budget"), done
    assert (ws.root / report["data"]).resolve() == (ws.root / "locked").resolve(), done


def check_prepare(done: Done, ws: Workspace) -> None:
    assert done.returncode == 0, done
    dataset = open_dataset(ws.root / "locked")
    assert dataset.pinned and f"fingerprint: {dataset.fingerprint}" in done.stdout, done
    documents = dataset.manifest["splits"]
    assert all(documents[split]["documents"] > 0 for split in ("train", "val", "test")), documents


def check_info(done: Done, ws: Workspace) -> None:
    assert done.returncode == 0, done
    assert "(pinned)" in done.stdout and f"fingerprint: {open_dataset(ws.root / 'locked').fingerprint}" in done.stdout


def signer(line: str, ws: Workspace) -> str:
    """The ss58 address the documented command signs with."""
    if "--key-file" in line:
        return Keypair.create_from_mnemonic((ws.home / ".prism" / "hotkey.txt").read_text().strip()).ss58_address
    return Wallet(name="miner", hotkey="default", path=str(ws.home / ".bittensor" / "wallets")).hotkey.ss58_address


def check_submit(done: Done, ws: Workspace) -> None:
    assert done.returncode == 0, done
    [state] = done.served.values()
    assert state["hotkey"] == signer(done.line, ws), state
    if "--wait" in done.line:  # followed to its final report
        assert state["status"] == "completed" and state["scores"]["bpb"] > 0, state
        assert re.search(rf"{state['id']} +completed at stage score", done.stdout), done
    else:  # accepted without waiting: the id alone on stdout
        assert done.stdout.strip() == state["id"] and state["state"] in ("pending", "duplicate"), done


def check_status(done: Done, ws: Workspace) -> None:
    assert done.returncode == 0, done
    assert re.search(rf"{ws.values['submission']} +completed at stage score", done.stdout), done
    assert re.search(r"^bpb +\d+\.\d+", done.stdout, re.MULTILINE), done


def check_leaderboard(done: Done, ws: Workspace) -> None:
    assert done.returncode == 0, done
    row = next(line for line in done.stdout.splitlines() if ws.values["submission"] in line)
    assert re.search(rf"│ 1 │ {signer('--wallet', ws)} │ docs-bigram │", row), done


def check_export(done: Done, ws: Workspace) -> None:
    assert done.returncode == 0, done
    out = ws.root / "prism-export"
    assert {"submissions.parquet", "runs.parquet", "scores.parquet", "curves.parquet"} <= {
        path.name for path in out.glob("*.parquet")}, done
    with duckdb.connect() as con:
        status = con.execute(f"SELECT status FROM '{out}/submissions.parquet' WHERE id = ?",
                             [ws.values["submission"]]).fetchall()
    assert status == [("completed",)], done


def check_serve(done: Done, ws: Workspace) -> None:
    assert done.returncode == 0, done  # Ctrl-C is a clean stop
    host = done.line.split("--host ")[1].split()[0] if "--host" in done.line else "127.0.0.1"
    assert f"serving at http://{host}:" in done.stderr, done
    assert done.served["/health"]["status"] == "ok" and done.served["/health"]["auth_mode"] == "signed"
    ranked = [entry["submission_id"] for entry in done.served["/v1/leaderboard"]["entries"]]
    if "--address" in done.line:  # joined `ray start`: the detached store keeps every submission across restarts
        assert "joined the Ray cluster" in done.stderr and ws.values["submission"] in ranked, done
        assert "stopping the API; the joined cluster keeps running" in done.stderr, done
    else:  # its own fresh local cluster, drained by Ctrl-C (tests/test_restart.py drains one mid-training)
        assert ("no GPU found: training runs on the CPU under one simulated GPU slot" if not torch.cuda.is_available()
                else "local Ray cluster") in done.stderr
        assert ranked == [] and "stopped; 0 running submission(s) handed back to the queue" in done.stderr, done


def check_demo(done: Done, ws: Workspace) -> None:
    assert done.returncode == 0, done
    out, err = ANSI.sub("", done.stdout), ANSI.sub("", done.stderr).replace("\r", "\n")
    ranked = re.findall(r"^(\d) +(\S+) +(\d+\.\d{4}) +\S+ +\S+ +\S+ +(sub_[0-9a-f]{32})$", out, re.MULTILINE)
    assert sorted(name for _, name, _, _ in ranked) == ["byte-lm", "seed-tiny", "tiny-gpt"], done
    assert [rank for rank, *_ in ranked] == ["1", "2", "3"], done
    with Store(ws.root / "demo-state" / "prism.duckdb") as store:  # the full ids, as `prism-ray status` takes them
        assert [store.get_submission(submission_id).status for *_, submission_id in ranked] == ["completed"] * 3
    assert "\x1b[1A" in done.stderr, done  # the bars are redrawn in place: live
    for _, name, bpb, _ in ranked:  # a bar per submission: its stage, then its bytes and bpb
        assert re.search(rf"^{name} +running train ", err, re.MULTILINE), done
        assert re.search(rf"^{name} +completed .*/2,000 B  bpb {bpb} ", err, re.MULTILINE), done
    assert not re.search(r"\b(GET|POST) /", done.stdout + done.stderr), done  # no access log
    assert "`prism-ray eval` scores 200,000 by default" in " ".join(err.split()), done
    if not torch.cuda.is_available():
        assert "no GPU found: training runs on the CPU under one simulated GPU slot" in " ".join(err.split()), done
    assert out.strip().splitlines()[-1].startswith("the server has stopped; `prism-ray demo --keep-serving` keeps "
                                                   "it up"), done


def check_registry(done: Done, ws: Workspace) -> None:
    """`registry sync` reads the chain through the bittensor SDK; where the SDK is not installed (it is not a
    dependency, and CI has neither it nor the chain) it fails with its typed error and writes nothing."""
    snapshot = ws.home / ".cache" / "prism-ray" / "registry" / "metagraph-100.json"
    if importlib.util.find_spec("bittensor") is None:
        assert done.returncode == 1 and "[registry:sdk_missing]" in done.stderr and not snapshot.exists(), done
    else:
        assert done.returncode == 0 and json.loads(done.stdout)["hotkeys"] > 0 and snapshot.exists(), done


CHECKS = {"eval": check_eval, "data prepare": check_prepare, "data info": check_info, "submit": check_submit,
          "status": check_status, "leaderboard": check_leaderboard, "export": check_export, "serve": check_serve,
          "demo": check_demo, "registry": check_registry}


@pytest.mark.cluster
@pytest.mark.sandbox
@pytest.mark.parametrize("doc,command", documented_commands())
def test_documented_command_runs(doc, command, workspace):
    check = CHECKS.get(subcommand(command))
    assert check, f"{doc}: nothing here runs `{command}`: give its placeholders files and its subcommand a check"
    workspace.streams[stream(command)].result()  # raises what went wrong in the stream that ran it
    check(workspace.results[workspace.key(command)], workspace)


@pytest.mark.cluster
@pytest.mark.sandbox
def test_the_documented_signing_recipe_posts_a_submission(workspace):
    recipes = documented_recipes()
    assert recipes
    workspace.streams["cluster"].result()
    for n in range(len(recipes)):
        done = workspace.results[f"recipe-{n}"]
        assert done.returncode == 0, done
        answer = ast.literal_eval(done.stdout.strip())  # the recipe prints the API's JSON answer as a dict
        assert SUBMISSION_ID.fullmatch(answer["id"]) and answer["hotkey"] == signer("--wallet", workspace), done


def test_there_are_documented_commands():
    assert len(documented_commands()) >= 20


def test_data_info_runs_on_the_embedded_dataset():
    done = subprocess.run([*CLI, "data", "info", str(EMBEDDED_DATA_DIR)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "783bb3cd6292871c" in done.stdout


def test_the_api_reference_is_the_openapi_schema():
    spec = openapi_doc.schema()
    reference = openapi_doc.render(spec)
    current = openapi_doc.API_DOC.read_text()
    assert openapi_doc.update(current, reference) == current, \
        "docs/api.md's reference is out of date with the app: run `python -m serve_app.openapi_doc`"
    routes = [f"#### `{method.upper()} {path}`" for path, operations in spec["paths"].items() for method in operations]
    models = [f"#### {name}\n" for name in spec["components"]["schemas"]]
    assert len(routes) >= 8 and all(heading in reference for heading in routes + models)
