"""The `prism-ray` command line (typer)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperCommand

from prism_ray.access.registry import registry_app
from prism_ray.cli.client_commands import register as register_client_commands
from prism_ray.config import Settings, load_settings
from prism_ray.data.cli import data_app
from prism_ray.errors import Reason
from prism_ray.evaluation.pipeline import evaluate
from prism_ray.evaluation.report import RunReport
from prism_ray.harness.records import Progress as RunProgress

if TYPE_CHECKING:
    from serve_app.service import Service

app = typer.Typer(help="prism-ray: evaluate PRISM bundles as prequential bits-per-byte on locked text.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(data_app, name="data", help="Prepare, inspect and tokenise locked datasets.")
app.add_typer(registry_app, name="registry")
register_client_commands(app)
stderr = Console(stderr=True)


def _default(name: str, unit: str = "") -> str:
    """What eval uses when an option is not given, as its --help shows it: the setting's default and its variable."""
    value = Settings.model_fields[name].default
    shown = f"{value:g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) and value > 9999 \
        else str(value)
    return f"{shown}{unit}, or PRISM_{name.upper()}"


class UsageError(BaseModel):
    """What `eval --json` prints when the command line itself is wrong (exit 2): never a report, still one object."""

    status: Literal["usage_error"] = "usage_error"
    reasons: list[Reason]


class _EvalCommand(TyperCommand):
    """With --json, a usage error the parser finds is one JSON object on stdout as well, like every other outcome."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta["as_json"] = "--json" in args
        try:
            return super().parse_args(ctx, args)
        except Exception as error:
            _json_usage_error(ctx, error)
            raise

    def invoke(self, ctx: typer.Context) -> object:
        try:  # values are converted and range-checked here, after parsing
            return super().invoke(ctx)
        except Exception as error:
            _json_usage_error(ctx, error)
            raise


def _json_usage_error(ctx: typer.Context, error: Exception) -> None:
    # Click's UsageError (exit code 2), whether typer vendors click or not.
    if ctx.meta.get("as_json") and getattr(error, "exit_code", None) == 2 and hasattr(error, "format_message"):
        _usage_error("usage:bad_arguments", error.format_message(), as_json=True)


def _usage_error(rule: str, message: str, as_json: bool) -> NoReturn:
    stderr.print(f"[red]error:[/red] {message}", highlight=False)
    if as_json:
        sys.stdout.write(UsageError(reasons=[Reason(rule=rule, message=message)]).model_dump_json() + "\n")
    raise typer.Exit(2)


def _device_problem(device: str | None) -> str | None:
    """Why a requested device cannot run here (None when it can): a usage error, not a run that crashes later."""
    if device in (None, "auto", "cpu"):
        return None
    if not re.fullmatch(r"cuda(:\d+)?", device):
        return f"--device must be auto, cpu, cuda or cuda:N, not {device!r}"
    import torch  # only when a GPU is asked for

    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        return f"--device {device}: this machine has {count} CUDA device(s) visible to torch; use --device cpu or auto"
    return None


@app.command("eval", cls=_EvalCommand)
def eval_command(
    bundle: Annotated[Path, typer.Argument(help="bundle directory or .zip")],
    data: Annotated[Path | None, typer.Option(help="locked dataset dir", show_default="the embedded Python docs, "
                                              "or PRISM_DATA_DIR")] = None,
    byte_budget: Annotated[int | None, typer.Option(min=0, help="target bytes to score; 0 = whole train split",
                                                    show_default=_default("byte_budget", " bytes"))] = None,
    time_limit: Annotated[float | None, typer.Option(min=1, help="wall-clock cap in seconds (over it: failed)",
                                                     show_default=_default("time_limit", " s"))] = None,
    seed: Annotated[int | None, typer.Option(help="forced seed", show_default=_default("seed"))] = None,
    device: Annotated[str | None, typer.Option(help="auto (the GPU when there is one), cpu, cuda, cuda:N",
                                               show_default=_default("device"))] = None,
    use_gate: Annotated[bool | None, typer.Option("--gate/--no-gate", help="force the LLM gate on (no key: held) "
                                                  "or off", show_default="on when an API key is configured")] = None,
    world_size: Annotated[int | None, typer.Option(min=1, max=8, help="trainer ranks of the scored run (one GPU "
                                                   "each; gloo ranks on CPU)", show_default=_default("gpus_per_run"))
                          ] = None,
    contract: Annotated[bool, typer.Option("--contract", help="also run the multi-GPU contract check: an unscored "
                                           "short run at each world size of PRISM_CONTRACT_WORLD_SIZES (or 2), as "
                                           "the cluster does with every scored run")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print exactly one JSON object, the report")] = False,
) -> None:
    """Dry-run a bundle exactly as the cluster scores it."""
    if not bundle.exists():
        _usage_error("usage:no_bundle", f"bundle {bundle} does not exist", as_json)
    if problem := _device_problem(device):
        _usage_error("usage:device", problem, as_json)
    try:
        settings = load_settings(data_dir=data, byte_budget=byte_budget, time_limit=time_limit, seed=seed,
                                 device=device, gpus_per_run=world_size)
    except ValidationError as error:  # a PRISM_* variable with a value it cannot take
        _usage_error("usage:settings", "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                 for e in error.errors()), as_json)
    if use_gate is not None:
        settings.gate.mode = "required" if use_gate else "off"
    # eval checks the contract only when asked: it costs one more short run per world size
    settings.contract_world_sizes = (settings.contract_world_sizes or "2") if contract else ""
    try:
        report = _run_with_progress(bundle, settings)
    except Exception as error:  # a fault of prism-ray or this machine: still one typed object, never a bare traceback
        stderr.print_exception()
        report = RunReport(status="failed", stage="eval", reasons=[Reason(
            rule="infra:eval_error", message=f"prism-ray failed on this machine: {type(error).__name__}: {error}")])
    if as_json:
        sys.stdout.write(report.model_dump_json() + "\n")
    else:
        print_report(report, Console())
    raise typer.Exit(0 if report.ok else 1)


def _run_with_progress(bundle: Path, settings: Settings) -> RunReport:
    columns = (TextColumn("[bold]scoring[/bold]"), BarColumn(), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        total = settings.byte_budget or None
        task = bar.add_task("run", total=total, detail="starting runner…")

        def update(progress: RunProgress) -> None:
            detail = (f"{progress.bytes_scored:,} B  bpb {progress.running_bpb:.4f}  "
                      f"{progress.tokens_per_second:,.0f} tok/s")
            bar.update(task, completed=progress.bytes_scored, detail=detail)

        return evaluate(bundle, settings, progress=update)


def print_report(report: RunReport, console: Console) -> None:
    colour = {"completed": "green", "rejected": "yellow", "held": "yellow", "failed": "red"}[report.status]
    console.print(f"[bold {colour}]{report.status}[/bold {colour}] at stage [bold]{report.stage}[/bold]"
                  + (f" — {report.name}" if report.name else ""))
    for reason in report.reasons:
        where = f" ({reason.file}:{reason.line})" if reason.file and reason.line else \
            f" ({reason.file})" if reason.file else ""
        console.print(f"  [red]{reason.rule}[/red]{where}: {reason.message}", markup=True, highlight=False)
    table = Table(show_header=False, box=None, pad_edge=False)
    flags = ", ".join(report.score.flags) if report.score else ""
    ran = report.batches > 0  # a bundle stopped before its first scored batch has no run numbers to show
    rows = [
        ("bpb", f"{report.bpb:.6f}" if report.bpb is not None else None),
        ("final score", (f"{report.final_score:.6f}" if report.final_score is not None else "")
         + (f"  [yellow]{flags}[/yellow]" if flags else "") or None),
        ("bytes scored", (f"{report.bytes_scored:,} of budget {report.byte_budget:,}"
                          if isinstance(report.byte_budget, int) and report.byte_budget
                          else f"{report.bytes_scored:,}") if ran else None),
        ("tokens scored", f"{report.tokens_scored:,} in {report.batches} batches of "
                          f"{report.batch_size}×{report.seq_len}" if ran else None),
        ("stopped", report.stopped_reason),
        ("tokenizer", f"{report.tokenizer}" + (f" (vocab {report.vocab_size})" if report.vocab_size else "")
         if report.tokenizer else None),
        ("model", f"{report.model_params:,} parameters" if report.model_params else None),
        ("step-0 loss", f"{report.step0_loss:.4f} nats" if report.step0_loss is not None else None),
        ("speed", f"{report.tokens_per_second:,.0f} tokens/s on {report.device}" if report.tokens_per_second
         else None),
        ("data", f"{report.data.path} ({report.data.fingerprint[:24]}"
                 f"{'' if report.data.pinned else ', unpinned'})" if report.data else None),
        ("held-out", report.heldout.message or report.heldout.status if report.heldout else None),
        ("probes", f"{report.probes.rows} causality probe rows, largest drift {report.probes.max_drift:.2g} nats"
         if report.probes and report.probes.rows else None),
        ("gate", report.gate.message or report.gate.status if report.gate else None),
        ("isolation", report.isolation),
        ("ranks", f"{report.world_size} trainer ranks" if report.world_size > 1 else None),
        ("contract", "; ".join(check.summary() for check in report.contract) or None),
        ("wall", f"{report.wall_seconds:.1f} s" + (" (" + ", ".join(f"{name} {seconds:.1f} s" for name, seconds
                                                                  in report.timings.items()) + ")"
                                                   if report.timings else "") if report.wall_seconds else None),
        ("run dir", report.run_dir),
    ]
    for key, value in rows:
        if value:  # only what is known: a rejection at intake shows its reasons and nothing else
            table.add_row(f"[dim]{key}[/dim]", value)
    console.print(table)


def _service_settings(data: Path | None, state_dir: Path | None, byte_budget: int | None) -> Settings:
    # Ray workers and the sandbox do not run in this process's working directory: hand them absolute paths.
    settings = load_settings(data_dir=data.resolve() if data else None, byte_budget=byte_budget)
    if state_dir is not None:
        settings.cache_dir = state_dir.resolve()
    return settings


@app.command("serve")
def serve_command(
    address: Annotated[str | None, typer.Option(help="join this Ray cluster (e.g. auto); default: a local one")] = None,
    host: Annotated[str, typer.Option(help="HTTP host")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    auth: Annotated[str, typer.Option(help="signed (sr25519 hotkeys) or dev (unsigned X-Hotkey, local)")] = "signed",
    data: Annotated[Path | None, typer.Option(help="locked dataset dir (default: the embedded data)")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="DuckDB store, token caches and run dirs")] = None,
    byte_budget: Annotated[int | None, typer.Option(min=0, help="target bytes per run")] = None,
) -> None:
    """Run the evaluation cluster and its HTTP API until Ctrl-C or SIGTERM, which drain it: nothing is lost and
    no submission is charged an attempt."""
    from prism_ray.config import ApiSettings
    from serve_app.service import start_service  # Ray Serve is heavy; eval never pays for it

    if auth not in ("signed", "dev"):
        stderr.print("[red]error:[/red] --auth must be signed or dev")
        raise typer.Exit(2)
    settings = _service_settings(data, state_dir, byte_budget)
    if address is None:  # a joined cluster's store is already someone else's to check
        _preflight(settings)
    service = start_service(address, settings, ApiSettings(auth_mode=auth), host, port)
    _stop_on_signals()
    stderr.print(f"[bold]prism-ray[/bold] serving at {service.url} ({service.cluster.notice})")
    if auth == "dev":
        stderr.print("[bold red]WARNING: dev auth — unsigned X-Hotkey accepted. Never expose this server.[/bold red]")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(service)


@app.command("demo")
def demo_command(
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    byte_budget: Annotated[int, typer.Option(min=1, help="target bytes per example run")] = 100_000,
    state_dir: Annotated[Path | None, typer.Option(help="where the demo keeps its store (default: a temp dir)")] = None,
    keep_serving: Annotated[bool, typer.Option("--keep-serving", help="stay up after the demo")] = False,
) -> None:
    """Start a local cluster and the API, submit the examples over HTTP, follow them, print the leaderboard."""
    from prism_ray.cli.client import PrismClient
    from prism_ray.cli.client_commands import print_submission
    from prism_ray.cli.demo import EXAMPLES_DIR, follow_with_bars, print_ranking, submit_examples
    from prism_ray.config import ApiSettings
    from serve_app.service import start_service

    state = state_dir or Path(tempfile.mkdtemp(prefix="prism-demo-"))
    settings = _service_settings(None, state, byte_budget)
    settings.gate.mode = "off" if not os.environ.get("OPENROUTER_API_KEY") else settings.gate.mode
    settings.audit.mode = "off"  # one machine: a re-run on "another node" would only double the wait
    settings.replicas.mode = "off"  # 3 examples would bring 6 replica runs: triple the wait; the prior σ_seed decides
    _preflight(settings)
    service = start_service(None, settings, ApiSettings(auth_mode="dev", internal_token="demo-token"),
                            "127.0.0.1", port)
    _stop_on_signals()
    out = Console()
    kept = "" if state_dir else " (a temporary directory, removed at exit; --state-dir keeps it)"
    stderr.print(f"[bold]prism-ray demo[/bold] at {service.url} ({service.cluster.notice}); store in {state}{kept}")
    stderr.print(f"each example trains on {byte_budget:,} bytes of text; `prism-ray eval` scores "
                 f"{Settings.model_fields['byte_budget'].default:,} by default, so its scores for the same bundle "
                 "differ (give it the same --byte-budget to compare); re-execution audits and seed replicas are off in "
                 "the demo (docs/scoring.md)", highlight=False)
    code = 130  # interrupted
    try:
        submitted = submit_examples(service.url, sorted(p for p in EXAMPLES_DIR.iterdir() if p.is_dir()))
        finals = follow_with_bars(service.url, submitted, byte_budget, stderr)
        with PrismClient(service.url) as client:
            print_ranking(client.leaderboard(), out)
        failed = [final for final in finals if final["status"] != "completed"]
        for final in failed:
            print_submission(final, stderr)
        code = 1 if failed else 0
        browse = f"the leaderboard at {service.url}/, `prism-ray status SUBMISSION_ID --url {service.url}`"
        if keep_serving:
            out.print(f"serving until Ctrl-C: {browse}", highlight=False)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(service)
        if state_dir is None:  # nothing outlives the demo's own temporary store
            shutil.rmtree(state, ignore_errors=True)
    if not keep_serving and code != 130:
        out.print(f"the server has stopped; `prism-ray demo --keep-serving` keeps it up ({browse})", highlight=False)
    raise typer.Exit(code)


def _preflight(settings: Settings) -> None:
    """One line and exit 1 when the state dir cannot run a server (before Ray starts, so within seconds)."""
    from prism_ray.backend.preflight import StartupError, check_state

    try:
        check_state(settings)
    except StartupError as error:
        stderr.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@app.command("check-store")
def check_store_command(
    path: Annotated[Path | None, typer.Argument(help="a DuckDB store file (default: the state dir's)")] = None,
) -> None:
    """Read back every block of a store file (a stopped server's, or a copy): exit 0 when sound, 1 with what to do."""
    from prism_ray.backend.preflight import StartupError, check_store, store_file

    path = path or store_file(Settings())
    if not path.is_file():
        stderr.print(f"[red]error:[/red] {path} does not exist", highlight=False)
        raise typer.Exit(2)
    try:
        check_store(path)
    except StartupError as error:
        stderr.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    Console().print(f"ok: every table of {path} reads back", highlight=False, soft_wrap=True)  # a path is never cut


def _stop_on_signals() -> None:
    """SIGTERM (systemd, docker stop, kill) stops like Ctrl-C: both raise KeyboardInterrupt in the main thread,
    whose `finally` drains the cluster. Set once Ray runs: ray.init installs a SIGTERM handler that aborts."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def _stop(service: Service) -> None:
    """Drain and stop, once: a second Ctrl-C or SIGTERM meanwhile is ignored (the drain is bounded)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    owned = service.cluster.owns_ray
    stderr.print("stopping: draining (no new claims; running submissions go back to the queue without costing an "
                 "attempt)" if owned else "stopping the API; the joined cluster keeps running", highlight=False)
    handed_back = service.close()
    if owned:
        stderr.print(f"stopped; {len(handed_back)} running submission(s) handed back to the queue"
                     + (f": {', '.join(handed_back)}" if handed_back else ""), highlight=False)


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(help="directory for one Parquet file per table")],
    address: Annotated[str, typer.Option(help="the running cluster")] = "auto",
) -> None:
    """Write every store table to Parquet (the live DuckDB file is locked by the store actor)."""
    from prism_ray.cluster.client import export
    from prism_ray.cluster.runtime import start_cluster

    handle = start_cluster(address, Settings())
    try:
        for path in export(handle, out.resolve()):
            Console().print(str(path))
    finally:
        handle.close()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()


