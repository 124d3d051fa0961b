"""The store's connection: one DuckDB file, re-entrant transactions, rows as dicts, the append-only event timeline,
and the JSON spelling of values (reasons, reports, non-finite numbers)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from prism_ray.errors import Reason

JSON_COLUMNS = frozenset({"reasons", "notes", "metadata", "report", "detail", "verdict"})

# Event numbers continue per queue item from its last one, so a batch can span several items.
_INSERT_EVENTS = """
INSERT INTO events
SELECT b.submission_id,
       coalesce((SELECT max(e.seq) FROM events e WHERE e.submission_id = b.submission_id), 0)
           + row_number() OVER (PARTITION BY b.submission_id ORDER BY b.position),
       ?, b.kind, b.stage, b.detail::JSON
FROM (SELECT unnest(?::VARCHAR[]) AS submission_id, unnest(?::VARCHAR[]) AS kind, unnest(?::VARCHAR[]) AS stage,
             unnest(?::VARCHAR[]) AS detail, unnest(range(?)) AS position) AS b
"""


class StoreError(Exception):
    """The store cannot do what was asked (a newer schema, bad input)."""


class StoreUnavailable(StoreError):
    """The store cannot be used now (a failed probe, a damaged file, the disk below its floor): answered 503 with
    `error`, never charged to anyone (docs/api.md, "Errors")."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class StoreLocked(StoreError):
    """Another process holds the database file; only its owner (the store actor) may open it."""


class Db:
    """The connection and the clock every part of the store shares. Not thread-safe: the store's owner serialises
    calls. Transactions nest (only the outermost commits), so one public call is one transaction however many
    parts it goes through."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self.clock = clock
        self._depth = 0
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # a fresh --state-dir or store path is fine
        try:
            self.con = duckdb.connect(self.path)
        except duckdb.IOException as error:
            if "lock" in str(error).lower():
                raise StoreLocked(f"{self.path} is held by another process; DuckDB allows one writer per file, so go "
                                  f"through the process that owns it (the store actor). DuckDB said: {error}") from None
            raise

    def close(self) -> None:
        self.con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if self._depth:
            self._depth += 1
            try:
                yield self.con
            finally:
                self._depth -= 1
            return
        self.con.begin()
        self._depth = 1
        try:
            yield self.con
        except BaseException:
            self.con.rollback()
            raise
        finally:
            self._depth = 0
        self.con.commit()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> duckdb.DuckDBPyConnection:
        return self.con.execute(sql, params)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self.con.execute(sql, params)
        names = [column[0] for column in cursor.description]
        return [{name: json.loads(value) if name in JSON_COLUMNS and value is not None else value
                 for name, value in zip(names, row, strict=True)} for row in cursor.fetchall()]

    def append_events(self, events: list[tuple[str, str, str | None, dict[str, Any]]], now: float) -> None:
        """(queue item id, kind, stage, detail) rows of the timeline; a submission's or an audit's, by its id."""
        if events:
            self.con.execute(_INSERT_EVENTS, [now, [event[0] for event in events], [event[1] for event in events],
                                              [event[2] for event in events], [to_json(event[3]) for event in events],
                                              len(events)])


def dump(reasons: Sequence[Reason]) -> list[dict[str, Any]]:
    return [reason.model_dump() for reason in reasons]


def finite(value: Any) -> Any:
    """NaN/inf become NULL: JSON has no spelling for them and SQL aggregates should skip them."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def to_json(value: Any) -> str:
    def clean(item: Any) -> Any:
        if isinstance(item, dict):
            return {str(key): clean(inner) for key, inner in item.items()}
        if isinstance(item, list | tuple):
            return [clean(inner) for inner in item]
        return finite(item)

    return json.dumps(clean(value), allow_nan=False)
