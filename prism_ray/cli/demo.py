"""What `prism-ray demo` does over HTTP and shows: the examples submitted, a live bar per submission while they run,
then the ranking with every submission's full id (to paste into `prism-ray status`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from prism_ray.cli.client import SETTLED_STATUSES, PrismClient
from prism_ray.cli.client_commands import print_whole
from prism_ray.ranking.leaderboard import ORDER_NOTE

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


def submit_examples(url: str, examples: list[Path]) -> dict[str, str]:
    """Submit each example over HTTP as its own dev hotkey; example name → submission id."""
    submitted = {}
    for example in examples:
        with PrismClient(url, dev_hotkey=f"demo-{example.name}") as client:
            submitted[example.name] = client.submit(example)["id"]
    return submitted


def follow(url: str, ids: list[str], on_update: Callable[[dict[str, Any]], None], poll_s: float = 0.5,
           timeout: float = 3600.0) -> list[dict[str, Any]]:
    """Poll every submission until all have settled (or `timeout` passes), handing each answer to `on_update`;
    returns their last states, in order."""
    latest: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    with PrismClient(url) as client:
        while True:
            for submission_id in ids:
                if latest.get(submission_id, {}).get("status") not in SETTLED_STATUSES:
                    latest[submission_id] = client.status(submission_id)
                    on_update(latest[submission_id])
            if all(latest[i]["status"] in SETTLED_STATUSES for i in ids) or time.monotonic() > deadline:
                return [latest[submission_id] for submission_id in ids]
            time.sleep(poll_s)


def follow_with_bars(url: str, submitted: dict[str, str], byte_budget: int, console: Console) -> list[dict[str, Any]]:
    """A live bar per submission: its stage, bytes scored of the budget and running bpb. Where the console is no
    terminal (a log file), a line per change instead, and the bars once at the end."""
    names = {submission_id: name for name, submission_id in submitted.items()}
    width = max(map(len, submitted))
    columns = (TextColumn(f"{{task.description:<{width}}}"), TextColumn("{task.fields[state]:<16}"), BarColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, refresh_per_second=4) as bars:
        tasks = {submission_id: bars.add_task(name, total=byte_budget, state="pending", detail="")
                 for name, submission_id in submitted.items()}
        shown: dict[str, str] = {}

        def update(status: dict[str, Any]) -> None:
            state, detail, done, total = _describe(status, byte_budget)
            bars.update(tasks[status["id"]], state=state, detail=detail, completed=done, total=total)
            if not console.is_interactive and shown.get(status["id"]) != state:
                shown[status["id"]] = state
                console.print(f"{names[status['id']]:<{width}}  {state:<16} {detail}", highlight=False)

        return follow(url, list(names), update)


def _describe(status: dict[str, Any], byte_budget: int) -> tuple[str, str, int, int]:
    """(state, detail, bytes done, bytes in total) of a status answer, for its bar."""
    progress, scores = status.get("progress") or {}, status.get("scores") or {}
    total = progress.get("byte_budget") or byte_budget
    done = progress.get("bytes_scored") or 0
    state = f"running {status['stage']}" if status["status"] == "running" else status.get("state", status["status"])
    if status["status"] == "completed" and scores.get("bpb") is not None:
        return state, f"{done:,}/{total:,} B  bpb {scores['bpb']:.4f}", total, total
    if status.get("reasons") and status["status"] != "pending":
        return state, status["reasons"][0]["rule"], done, total
    if status["stage"] == "train" and not done:
        return state, "starting the sandboxed runner", done, total
    bpb = progress.get("running_bpb")
    return state, f"{done:,}/{total:,} B" + (f"  bpb {bpb:.4f}" if bpb is not None else ""), done, total


def print_ranking(board: dict[str, Any], console: Console) -> None:
    """The leaderboard's entries with full submission ids (never cut, whatever the terminal's width)."""
    entries = board["entries"]
    table = Table(title="leaderboard", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, caption=ORDER_NOTE)
    table.add_column("#", justify="right")
    table.add_column("name", no_wrap=True, min_width=max((len(entry["name"] or "") for entry in entries), default=4))
    table.add_column("bpb", justify="right")
    table.add_column("flags")
    for column in ("final score", "held-out Δ"):
        table.add_column(column, justify="right")
    table.add_column("submission", no_wrap=True,
                     min_width=max((len(entry["submission_id"]) for entry in entries), default=10))
    for entry in entries:
        table.add_row(str(entry["rank"]), entry["name"] or "—", _number(entry["bpb"]),
                      ", ".join(entry.get("flags") or []) or "—", _number(entry["final_score"]),
                      _number(entry["heldout_delta"]), entry["submission_id"])
    print_whole(table, console)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"
