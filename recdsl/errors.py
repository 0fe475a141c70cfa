"""Source positions and the one error type of recdsl.

Every user mistake, from a stray character to a shape mismatch, is a `RecError` that
knows where it happened. `str(err)` is what the CLI prints:

    gla.rec:7:25: error: shapes [K] and [V] do not broadcast
        S' = exp(gk)[:, None] * S + outer(k, q) * v
                            ^^^^^^^^^^^^^^^^^^^^^^^^^
    hint: ...
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """A piece of .rec text and the name it is reported under (a path or '<string>')."""
    name: str
    text: str

    def line(self, n: int) -> str:
        """Line n (1-based), counted as the parser counts them: only '\n' ends a line (str.splitlines
        would also split at form feeds, '\x1c'..'\x1e', '\x85', U+2028, ...)."""
        lines = self.text.split("\n")
        return lines[n - 1].removesuffix("\r") if 1 <= n <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    """A region of a source: 1-based line and column, end column exclusive."""
    line: int
    col: int
    end_line: int
    end_col: int
    source: Source | None = field(default=None, compare=False, repr=False)

    @property
    def file(self) -> str:
        return self.source.name if self.source else "<unknown>"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def to(self, other: "Span | None") -> "Span":
        """The span from the start of self to the end of other."""
        if other is None:
            return self
        return Span(self.line, self.col, other.end_line, other.end_col, self.source)


class RecError(Exception):
    """A mistake in a .rec file (or in how a cell is used), with its location and a hint."""

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None,
                 notes: list[tuple[str, Span]] | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        self.notes = notes or []

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def col(self) -> int | None:
        return self.span.col if self.span else None

    def __str__(self) -> str:
        out = [f"{self.span}: error: {self.message}" if self.span else f"error: {self.message}"]
        if self.span is not None:
            out += _excerpt(self.span)
        for text, span in self.notes:
            out.append(f"{span}: note: {text}")
            out += _excerpt(span)
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)


def _excerpt(span: Span) -> list[str]:
    """The source line under a span and a caret line marking it (first line only)."""
    if span.source is None:
        return []
    text = span.source.line(span.line).rstrip("\n")
    if not text.strip():
        return []
    # Control characters (a stray \r, \x00, ...) would garble the terminal: show them as spaces.
    text = "".join(ch if ch == "\t" or ch.isprintable() else " " for ch in text)
    # Tabs are expanded the same way on both lines so that the caret stays aligned.
    prefix = "".join("\t" if ch == "\t" else " " for ch in text[: span.col - 1])
    end = span.end_col if span.end_line == span.line and span.end_col > span.col else span.col + 1
    if span.end_line != span.line:
        end = len(text) + 1
    width = max(1, min(end, len(text) + 1) - span.col)
    return ["    " + text, "    " + prefix + "^" * width]
