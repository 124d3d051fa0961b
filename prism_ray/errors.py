"""Typed reasons: every rejection or failure a miner or operator can hit carries one."""

from __future__ import annotations

from pydantic import BaseModel, field_validator


def escape_name(name: str) -> str:
    """`name` with every non-ASCII character as a backslash escape (\\u0430), so look-alikes are visible."""
    return name.encode("ascii", "backslashreplace").decode("ascii")


class Reason(BaseModel):
    """One typed finding: a rule id (`family:name`), a message a person understands, file:line if known."""

    rule: str
    message: str
    file: str | None = None
    line: int | None = None

    @field_validator("file")
    @classmethod
    def _escaped(cls, file: str | None) -> str | None:
        # A Cyrillic "а" looks like a Latin "a": a file name is shown with its non-ASCII characters escaped.
        return file if file is None or file.isascii() else escape_name(file)

    @field_validator("message")
    @classmethod
    def _encodable(cls, message: str) -> str:
        # Text a sandbox sent (JSON may carry a lone surrogate, "\ud800") must not make the report unserialisable:
        # that failure would be the system's, and a replica's score would stand (a red team's finding).
        return message.encode("utf-8", "backslashreplace").decode("utf-8")

    def __str__(self) -> str:
        where = f" ({self.file}:{self.line})" if self.file and self.line else f" ({self.file})" if self.file else ""
        return f"[{self.rule}] {self.message}{where}"


class PrismError(Exception):
    """An error that ends a stage with one or more typed reasons."""

    def __init__(self, rule: str, message: str, file: str | None = None, line: int | None = None,
                 reasons: list[Reason] | None = None):
        self.reasons = reasons or [Reason(rule=rule, message=message, file=file, line=line)]
        super().__init__(str(self.reasons[0]))

    @property
    def rule(self) -> str:
        return self.reasons[0].rule

    @classmethod
    def from_reasons(cls, reasons: list[Reason]) -> PrismError:
        first = reasons[0]
        return cls(first.rule, first.message, first.file, first.line, reasons=list(reasons))


class DataError(PrismError):
    """The locked dataset is missing, malformed or does not match its manifest."""


class BundleError(PrismError):
    """A bundle broke an intake or contract rule."""
