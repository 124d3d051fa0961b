"""`prism-ray data ...`: prepare, inspect and tokenise locked datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from prism_ray.config import Settings
from prism_ray.data.dataset import SPLITS, open_dataset
from prism_ray.data.preparation import DEFAULT_MEMORY_MB, SplitRule, prepare
from prism_ray.data.token_cache import build_token_cache, is_cached, load_token_stream
from prism_ray.data.tokenizers import TOKENIZER_NAMES
from prism_ray.errors import DataError

data_app = typer.Typer(help="Prepare, inspect and tokenise locked datasets.", no_args_is_help=True,
                       pretty_exceptions_enable=False)
console = Console()
stderr = Console(stderr=True, soft_wrap=True)
SPLIT = "950,25,25"


def _fail(error: DataError) -> typer.Exit:
    reason = error.reasons[0]
    where = f" ({reason.file})" if reason.file else ""
    stderr.print(f"error [{reason.rule}]: {reason.message}{where}", markup=False, highlight=False)
    return typer.Exit(1)


def _split_rule(spec: str) -> str:
    try:
        SplitRule.parse(spec)
    except DataError as e:
        raise typer.BadParameter(e.reasons[0].message) from None
    return spec


def _tokenizer_name(name: str) -> str:
    if name not in TOKENIZER_NAMES:
        raise typer.BadParameter(f"{name!r} is not one of {', '.join(TOKENIZER_NAMES)}")
    return name


@data_app.command("prepare")
def prepare_command(
    sources: Annotated[list[Path], typer.Argument(help="*.jsonl, *.jsonl.gz, *.parquet files or dirs")],
    out: Annotated[Path, typer.Option("--out", help="output dataset directory")],
    split: Annotated[str, typer.Option(callback=_split_rule,
                                       help="per-mille TRAIN,VAL,TEST of sha256(id or text) % 1000")] = SPLIT,
    shard_mb: Annotated[int, typer.Option(min=1, help="uncompressed MiB of JSONL per shard")] = 128,
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset in --out")] = False,
    memory_mb: Annotated[int, typer.Option(min=16, help="MiB of documents held in memory at once; the rest "
                                           "waits in hash buckets under --out")] = DEFAULT_MEMORY_MB,
) -> None:
    """Lock raw text into deterministic, hashed train/val/test shards with a MANIFEST.json."""
    try:
        summary = prepare(sources, out, SplitRule.parse(split), shard_mb << 20, overwrite, memory_mb)
    except DataError as e:
        raise _fail(e) from None
    table = Table(title=f"prepared {summary.out}")
    for column in ("split", "documents", "text bytes", "shards"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for s in SPLITS:
        table.add_row(s, f"{summary.documents[s]:,}", f"{summary.text_bytes[s]:,}", str(summary.shards[s]))
    console.print(table)
    console.print(f"skipped lines: {summary.skipped_lines:,}   duplicates dropped: {summary.duplicates:,}")
    console.print(f"fingerprint: {summary.fingerprint}")


@data_app.command("info")
def info_command(path: Annotated[Path, typer.Argument(help="dataset directory")]) -> None:
    """Verify a dataset against its manifest and show what it holds."""
    try:
        ds = open_dataset(path)
        table = Table(title=f"{ds.root} ({'pinned' if ds.pinned else 'UNPINNED: no MANIFEST.json'})")
        for column in ("split", "shards", "documents", "text bytes"):
            table.add_column(column, justify="left" if column == "split" else "right")
        for s in SPLITS:
            shards = ds.shards(s)  # verifies every hash of a pinned dataset
            if ds.pinned:
                totals = ds.manifest["splits"].get(s, {})
                docs, nbytes = totals.get("documents", 0), totals.get("text_bytes", 0)
            else:  # nothing recorded: count by reading
                texts = list(ds.iter_documents(s)) if shards else []
                docs, nbytes = len(texts), sum(len(t.encode("utf-8")) for t in texts)
            table.add_row(s, str(len(shards)), f"{docs:,}", f"{nbytes:,}")
    except DataError as e:
        raise _fail(e) from None
    console.print(table)
    console.print(f"fingerprint: {ds.fingerprint}")


@data_app.command("tokenize")
def tokenize_command(
    path: Annotated[Path, typer.Argument(help="dataset directory")],
    tokenizer: Annotated[str, typer.Option(callback=_tokenizer_name, help="gpt2 or bytes")] = "gpt2",
    cache_dir: Annotated[Path | None, typer.Option(help="cache root (default: PRISM_CACHE_DIR)")] = None,
    threads: Annotated[int, typer.Option(min=0, help="encoding threads; 0 = all cores")] = 0,
    rebuild: Annotated[bool, typer.Option(help="encode again even if a valid cache exists")] = False,
) -> None:
    """Build (or load) the train split's token cache and report its size and build speed."""
    cache_dir = cache_dir or Settings().cache_dir
    try:
        ds = open_dataset(path)
        fresh = rebuild or not is_cached(ds, "train", tokenizer, cache_dir)
        built = build_token_cache(ds, "train", tokenizer, cache_dir, threads) if fresh else None
        stream = load_token_stream(ds, "train", tokenizer, cache_dir, threads)
    except DataError as e:
        raise _fail(e) from None
    tokens = len(stream.tokens)
    console.print(f"{tokenizer}: {stream.documents:,} documents, {tokens:,} tokens, "
                  f"{stream.text_bytes:,} bytes ({stream.text_bytes / max(tokens, 1):.2f} bytes/token)")
    if built:
        console.print(f"token-cache build: {built['seconds']:.2f} s, {built['mb_per_s']:.1f} MB/s")
    else:
        console.print("token cache was already built (use --rebuild to measure the build)")
