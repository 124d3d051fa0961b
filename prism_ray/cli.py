"""The `prism-ray` command line (typer)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from prism_ray.client_cli import register as register_client_commands
from prism_ray.config import Settings, load_settings
from prism_ray.data.cli import data_app
from prism_ray.harness.session import Progress as RunProgress
from prism_ray.pipeline import evaluate
from prism_ray.report import RunReport

app = typer.Typer(help="prism-ray: evaluate PRISM bundles as prequential bits-per-byte on locked text.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(data_app, name="data", help="Prepare, inspect and tokenise locked datasets.")
register_client_commands(app)
stderr = Console(stderr=True)


@app.command("eval")
def eval_command(
    bundle: Annotated[Path, typer.Argument(help="bundle directory or .zip")],
    data: Annotated[Path | None, typer.Option(help="locked dataset dir (default: the embedded Python docs)")] = None,
    byte_budget: Annotated[int | None, typer.Option(min=0, help="target bytes to score; 0 = whole train split")] = None,
    time_limit: Annotated[float | None, typer.Option(min=1, help="wall-clock cap in seconds (over it: failed)")] = None,
    seed: Annotated[int | None, typer.Option(help="forced seed")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    use_gate: Annotated[bool | None, typer.Option("--gate/--no-gate", help="force the LLM gate on (no key: held) "
                                                  "or off; default: on when an API key is configured")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print exactly one JSON object, the report")] = False,
) -> None:
    """Dry-run a bundle exactly as the cluster scores it."""
    if not bundle.exists():
        stderr.print(f"[red]error:[/red] bundle {bundle} does not exist")
        raise typer.Exit(2)
    settings = load_settings(data_dir=data, byte_budget=byte_budget, time_limit=time_limit, seed=seed, device=device)
    if use_gate is not None:
        settings.gate.mode = "required" if use_gate else "off"
    report = _run_with_progress(bundle, settings)
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
    colour = {"completed": "green", "rejected": "yellow", "failed": "red"}[report.status]
    console.print(f"[bold {colour}]{report.status}[/bold {colour}] at stage [bold]{report.stage}[/bold]"
                  + (f" — {report.name}" if report.name else ""))
    for reason in report.reasons:
        where = f" ({reason.file}:{reason.line})" if reason.file and reason.line else \
            f" ({reason.file})" if reason.file else ""
        console.print(f"  [red]{reason.rule}[/red]{where}: {reason.message}", markup=True, highlight=False)
    table = Table(show_header=False, box=None, pad_edge=False)
    flags = ", ".join(report.score.get("flags", [])) if report.score else ""
    rows = [
        ("bpb", f"{report.bpb:.6f}" if report.bpb is not None else "—"),
        ("final score", (f"{report.final_score:.6f}" if report.final_score is not None else "—")
         + (f"  [yellow]{flags}[/yellow]" if flags else "")),
        ("bytes scored", f"{report.bytes_scored:,} of budget {report.byte_budget or 'whole split':,}"
         if isinstance(report.byte_budget, int) and report.byte_budget else f"{report.bytes_scored:,}"),
        ("tokens scored", f"{report.tokens_scored:,} in {report.batches} batches of "
                          f"{report.batch_size}×{report.seq_len}"),
        ("stopped", report.stopped_reason or "—"),
        ("tokenizer", f"{report.tokenizer} (vocab {report.vocab_size})"),
        ("model", f"{report.model_params:,} parameters" if report.model_params else "—"),
        ("step-0 loss", f"{report.step0_loss:.4f} nats" if report.step0_loss is not None else "—"),
        ("speed", f"{report.tokens_per_second:,.0f} tokens/s on {report.device}" if report.tokens_per_second else "—"),
        ("data", f"{report.data.path} ({report.data.fingerprint[:24]}"
                 f"{'' if report.data.pinned else ', unpinned'})" if report.data else "—"),
        ("held-out", report.heldout.get("message", report.heldout.get("status")) if report.heldout else "—"),
        ("gate", report.gate.get("message", report.gate.get("status")) if report.gate else "—"),
        ("isolation", report.isolation or "—"),
        ("wall", f"{report.wall_seconds:.1f} s"),
        ("run dir", report.run_dir or "—"),
    ]
    for key, value in rows:
        table.add_row(f"[dim]{key}[/dim]", value)
    console.print(table)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()


