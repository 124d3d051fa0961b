"""How the pages are written: the Jinja environment with its filters, and the HTML response with its security
headers. Names, reasons and messages come from miners and are hostile: they reach the HTML only through Jinja's
autoescape, and every page carries a Content-Security-Policy that runs no script but our own static file."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

TEMPLATES = Path(__file__).parent / "templates"
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def format_number(value: Any, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:,.{digits}f}"


def format_bytes(value: Any) -> str:
    if value is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def format_time(value: Any) -> str:
    return "—" if value is None else datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_span(start: float, end: float) -> str:
    """A UTC time range, the date written once when both ends share it: "2026-05-12 06:00 – 12:00 UTC"."""
    first, last = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)
    tail = last.strftime("%H:%M" if first.date() == last.date() else "%Y-%m-%d %H:%M")
    return f"{first:%Y-%m-%d %H:%M} – {tail} UTC"


def format_duration(seconds: float | None) -> str:
    """An estimate as a person says it: "any moment", "~40 s", "~12 min", "~3.5 h"."""
    if seconds is None:
        return "—"
    if seconds < 5:
        return "any moment"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def short_hotkey(hotkey: str) -> str:
    return hotkey if len(hotkey) <= 16 else f"{hotkey[:6]}…{hotkey[-5:]}"


def event_detail(detail: dict[str, Any]) -> str:
    """One line of an event's detail; reasons are shown in full elsewhere, so only their rules here."""
    parts = []
    for key, value in detail.items():
        if value in (None, "", [], {}):
            continue
        if key == "reasons" and isinstance(value, list):
            value = ", ".join(str(reason.get("rule")) for reason in value if isinstance(reason, dict))
        elif key.endswith("_at") and isinstance(value, int | float):
            value = format_time(value)
        elif isinstance(value, float):
            value = format_number(value)
        elif not isinstance(value, str | int):
            value = json.dumps(value)
        parts.append(f"{key}: {value}")
    return " · ".join(parts)[:300]


_ENV = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True)
_ENV.filters.update(number=format_number, bytes=format_bytes, utc=format_time, short_hotkey=short_hotkey,
                    event_detail=event_detail, duration=format_duration)


def render_html(template: str, **context: Any) -> str:
    return _ENV.get_template(template).render(**context)


def page(html: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)
