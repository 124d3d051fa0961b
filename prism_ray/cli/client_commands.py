"""`prism-ray submit / status / leaderboard`: the HTTP client on the command line. `register(app)` mounts them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from prism_ray.access.auth import KeyLoadError, load_keypair
from prism_ray.cli.client import ClientError, PrismClient
from prism_ray.ranking.leaderboard import ORDER_NOTE

DEFAULT_URL = "http://127.0.0.1:8000"
Url = Annotated[str, typer.Option(envvar="PRISM_URL", help="the prism-ray API")]
AsJson = Annotated[bool, typer.Option("--json", help="print the API's JSON answer")]
stderr = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command("submit")(submit_command)
    app.command("status")(status_command)
    app.command("leaderboard")(leaderboard_command)


def submit_command(
    bundle: Annotated[Path, typer.Argument(help="bundle directory (zipped deterministically) or .zip")],
    url: Url = DEFAULT_URL,
    wallet: Annotated[str | None, typer.Option(help="bittensor wallet name")] = None,
    hotkey: Annotated[str | None, typer.Option(help="hotkey name in that wallet")] = None,
    wallet_path: Annotated[str | None, typer.Option(help="wallets dir (default ~/.bittensor/wallets)")] = None,
    key_file: Annotated[Path | None, typer.Option(help="file with a mnemonic or a hex seed")] = None,
    dev_hotkey: Annotated[str | None, typer.Option(help="unsigned hotkey name, for a dev-mode server only")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the submission to its final report")] = False,
    timeout: Annotated[float | None, typer.Option(min=1, help="give up waiting after this many seconds")] = None,
    poll: Annotated[float, typer.Option(min=0.1, help="seconds between status polls")] = 1.0,
    as_json: AsJson = False,
) -> None:
    """Sign and submit a bundle; print its id (exit 0), or with --wait its final report (0 = completed)."""
    with _client(url, wallet, hotkey, wallet_path, key_file, dev_hotkey) as client:
        accepted = _call(client.submit, bundle)
        if not wait:
            sys.stdout.write((json.dumps(accepted) if as_json else accepted["id"]) + "\n")
            raise typer.Exit(0)
        stderr.print(f"submitted [bold]{accepted['id']}[/bold]" + (" (reused)" if accepted.get("reused") else ""))
        final = _follow(client, accepted["id"], poll, timeout)
    if as_json:
        sys.stdout.write(json.dumps(final) + "\n")
    else:
        print_submission(final, Console())
    raise typer.Exit(0 if final["status"] == "completed" else 1)


def status_command(submission_id: Annotated[str, typer.Argument(help="the submission id")], url: Url = DEFAULT_URL,
                   as_json: AsJson = False) -> None:
    """Show a submission: status, reasons, scores, progress and its last five events."""
    with PrismClient(url) as client:
        status = _call(client.status, submission_id)
    if as_json:
        sys.stdout.write(json.dumps(status) + "\n")
    else:
        print_submission(status, Console())


def leaderboard_command(url: Url = DEFAULT_URL,
                        epoch: Annotated[int | None, typer.Option(min=0, help="only this epoch")] = None,
                        as_json: AsJson = False) -> None:
    """The leaderboard: best completed submission per hotkey."""
    with PrismClient(url) as client:
        board = _call(client.leaderboard, epoch)
    if as_json:
        sys.stdout.write(json.dumps(board) + "\n")
        return
    print_leaderboard(board, Console(), epoch)


def print_leaderboard(board: dict[str, Any], console: Console, epoch: int | None = None) -> None:
    """The board with every column whole (full hotkeys and submission ids, to paste into `status`) and the flags
    next to bpb, then each entry's seeds, decided group and cost (a second table keeps both narrow)."""
    entries = board["entries"]
    table = Table(title="leaderboard" + (f" — epoch {epoch}" if epoch is not None else ""), caption=ORDER_NOTE)
    for column in ("#", "hotkey", "name", "bpb", "flags", "final score", "held-out Δ", "submission"):
        table.add_column(column, justify="right" if column in ("#", "bpb", "final score", "held-out Δ") else "left",
                         no_wrap=True)
    for entry in entries:
        table.add_row(str(entry["rank"]), entry["hotkey"], entry["name"] or "—", _number(entry["bpb"]),
                      ", ".join(entry.get("flags") or []) or "—", _number(entry["final_score"]),
                      _number(entry["heldout_delta"]), entry["submission_id"])
    print_whole(table, console)
    sigma = board.get("sigma_seed")
    if sigma is None or not entries:
        return
    measured = board.get("sigma_seed_measured") is not None
    noise = f"σ_seed {sigma:.4f} bpb, " + (f"measured ({board['sigma_seed_dof']} dof)" if measured else "the prior")
    details = Table(title=f"seeds, decided groups and cost — {noise}")
    for column in ("#", "decided", "mean ± spread", "seeds", "GPU s", "tokens/s", "est. FLOPs"):
        details.add_column(column, justify="left" if column == "decided" else "right", no_wrap=True)
    for entry in entries:
        spread, flops = entry.get("spread_bpb"), entry.get("est_flops")
        details.add_row(str(entry["rank"]), f"tied with #{entry['tied_with']}" if entry.get("tied_with") else "",
                        _number(entry.get("mean_bpb")) + (f" ± {spread:.4f}" if spread is not None else ""),
                        str(entry.get("seeds", 1)) + (" (replicas pending)" if entry.get("replicas") == "pending"
                                                      else ""),
                        _number(entry.get("gpu_seconds")), _number(entry.get("tokens_per_second")),
                        f"{flops:.2e}" if flops else "—")
    print_whole(details, console)


def print_whole(table: Table, console: Console) -> None:
    """Never shorten a cell: wider than the terminal, the terminal wraps the line instead of rich cutting a cell."""
    width, needed = console.width, console.measure(table, options=console.options.update_width(10_000)).maximum
    console.width = max(width, needed)
    try:
        console.print(table, crop=False)
    finally:
        console.width = width


def print_submission(status: dict[str, Any], console: Console) -> None:
    state = status.get("state", status["status"])  # prism-ray's own status: PRISM's six, or duplicate
    colour = {"completed": "green", "pending": "cyan", "running": "cyan"}.get(state, "yellow")
    console.print(f"[bold]{status['id']}[/bold]  [bold {colour}]{state}[/bold {colour}] at stage "
                  f"[bold]{status['stage']}[/bold]" + (f" — {status['name']}" if status.get("name") else ""))
    _print_reasons(status.get("reasons") or [], console)
    table = Table(show_header=False, box=None, pad_edge=False)
    scores, progress = status.get("scores") or {}, status.get("progress") or {}
    rows = [("bpb", scores.get("bpb")), ("final score", scores.get("final_score")),
            ("held-out Δ", scores.get("heldout_delta")), ("gap", scores.get("gap")),
            ("penalty", scores.get("penalty")), ("bytes scored", progress.get("bytes_scored")),
            ("tokens/s", progress.get("tokens_per_second"))]
    for label, value in rows:
        if value is not None:
            table.add_row(label, _number(value))
    if scores.get("flags"):
        table.add_row("flags", ", ".join(scores["flags"]))
    table.add_row("attempt", f"{status['attempt']}/{status['max_attempts']}")
    console.print(table)
    for event in status.get("events", [])[-5:]:
        console.print(f"  [dim]{time.strftime('%H:%M:%S', time.localtime(event['at']))} {event['kind']} "
                      f"({event['stage']})[/dim]", highlight=False)


def _client(url: str, wallet: str | None, hotkey: str | None, wallet_path: str | None, key_file: Path | None,
            dev_hotkey: str | None) -> PrismClient:
    if dev_hotkey and (wallet or hotkey or key_file):
        _fail("give --dev-hotkey alone, or a key (--wallet/--hotkey or --key-file)", code=2)
    if dev_hotkey:
        return PrismClient(url, dev_hotkey=dev_hotkey)
    try:
        return PrismClient(url, keypair=load_keypair(wallet, hotkey, wallet_path, key_file))
    except KeyLoadError as error:
        _fail(str(error), code=2)


def _follow(client: PrismClient, submission_id: str, poll: float, timeout: float | None) -> dict[str, Any]:
    """Poll to the end, showing status, stage, bytes scored against the budget and the running bpb."""
    columns = (TextColumn("[bold]{task.fields[state]}[/bold]"), BarColumn(), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task("submission", total=None, state="queued", detail="")

        def update(status: dict[str, Any]) -> None:
            progress = status.get("progress") or {}
            done, budget, bpb = progress.get("bytes_scored"), progress.get("byte_budget"), progress.get("running_bpb")
            detail = f"{done or 0:,} B" + (f"  bpb {bpb:.4f}" if bpb is not None else "")
            bar.update(task, total=budget, completed=done or 0, state=f"{status['status']}/{status['stage']}",
                       detail=detail)

        return _call(client.wait, submission_id, poll, timeout, update)


def _print_reasons(reasons: list[dict[str, Any]], console: Console) -> None:
    for reason in reasons:
        where = f" ({reason['file']}:{reason['line']})" if reason.get("line") else \
            f" ({reason['file']})" if reason.get("file") else ""
        console.print(f"  [red]{reason['rule']}[/red]{where}: {reason['message']}", highlight=False)


def _call(method: Any, *args: Any) -> Any:
    try:
        return method(*args)
    except ClientError as error:
        stored = f" (stored as {error.body['id']})" if error.body.get("id") else ""
        stderr.print(f"[red]error:[/red] {error}{stored}", highlight=False)
        _print_reasons(error.body.get("reasons") or [], stderr)
        raise typer.Exit(1) from None


def _fail(message: str, code: int) -> NoReturn:
    stderr.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _number(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:,}" if isinstance(value, int) else f"{value:.6g}" if isinstance(value, float) else str(value)
