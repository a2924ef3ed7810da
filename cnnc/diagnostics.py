"""Source positions, cnnc's error types, and the caret-style rendering of diagnostics.

Every error a user can cause is a `CnncError`. It carries one or more `Diagnostic`s, each with
a `Span` into the source, so that all problems of a file are reported in one run and each one
shows the offending line with a caret under the fault, the way a good C compiler does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Span:
    """A region of one source line range: 1-based line and column, end column exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    @staticmethod
    def point(file: str, line: int, col: int) -> Span:
        return Span(file, line, col, line, col + 1)

    def where(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class Note:
    """Extra context under a diagnostic; with a span, the noted line is shown too."""

    message: str
    span: Span | None = None


@dataclass(frozen=True, slots=True)
class Diagnostic:
    message: str
    span: Span | None = None
    notes: tuple[Note, ...] = ()
    severity: str = "error"  # or "warning": said, but the build goes on


@dataclass(frozen=True, slots=True)
class Source:
    """Program text together with the name errors should call it by."""

    text: str
    name: str = "<string>"

    def line_text(self, line: int) -> str:
        lines = self.text.split("\n")  # as the parser counts lines: \f or U+2028 end none
        return lines[line - 1] if 0 < line <= len(lines) else ""


class CnncError(Exception):
    """Base of every error cnnc reports to a user: one or more diagnostics, no traceback."""

    def __init__(self, diagnostics: Sequence[Diagnostic], source: Source | None = None) -> None:
        self.diagnostics = tuple(diagnostics)
        self.source = source
        super().__init__(self.render())

    @classmethod
    def single(cls, message: str, span: Span | None = None,
               notes: Iterable[Note] = (), source: Source | None = None) -> CnncError:
        return cls([Diagnostic(message, span, tuple(notes))], source)

    def with_source(self, source: Source) -> CnncError:
        """The same error, rendered against `source` (stages raise before they know it)."""
        return type(self)(self.diagnostics, source)

    def render(self) -> str:
        return "\n".join(render_diagnostic(d, self.source) for d in self.diagnostics)

    def __str__(self) -> str:
        return self.render()


class CnncSyntaxError(CnncError):
    """The text is not a program of the .cnn language."""


class CnncSemanticError(CnncError):
    """The program parses but says something invalid: names, options, shapes, order of lines."""


class CnncInputError(CnncError):
    """A file cannot be read as a .cnn program (missing, a directory, binary, not UTF-8, empty)."""


class CnncInternalError(CnncError):
    """A stage of cnnc broke an invariant that the stages after it rely on: a bug in cnnc,
    not in the program. The message names the stage, so that a report says where to look."""

    @classmethod
    def in_stage(cls, stage: str, detail: str) -> CnncInternalError:
        return cls([Diagnostic(f"internal error in stage {stage}: {detail}; please report it")])


def render_diagnostic(diag: Diagnostic, source: Source | None) -> str:
    """`file:line:col: error: message`, the source line, a caret line, then the notes."""
    if diag.span is None:
        head = f"{diag.severity}: {diag.message}"
        if source is not None:
            head = f"{source.name}: {head}"
        lines = [head]
    else:
        lines = [f"{diag.span.where()}: {diag.severity}: {diag.message}",
                 *_quote(diag.span, source)]
    for note in diag.notes:
        if note.span is None:
            lines.append(f"note: {note.message}")
        else:
            lines.append(f"{note.span.where()}: note: {note.message}")
            lines.extend(_quote(note.span, source))
    return "\n".join(lines)


def _quote(span: Span, source: Source | None) -> list[str]:
    """The spanned line indented by four spaces and a `^~~~` marker under the span."""
    if source is None:
        return []
    text = source.line_text(span.line).rstrip("\r").expandtabs(1)
    if not text.strip():
        return []
    end = span.end_col if span.end_line == span.line else len(text) + 1
    width = max(1, min(end, len(text) + 1) - span.col)
    col = span.col
    if len(text) > MAX_QUOTED:  # a line too long to read: the part around the fault
        start = max(0, col - 1 - MAX_QUOTED // 4)
        tail = "..." if start + MAX_QUOTED < len(text) else ""
        text = ("..." if start else "") + text[start:start + MAX_QUOTED] + tail
        col = col - start + (3 if start else 0)
        width = min(width, MAX_QUOTED - (col - 1))
    return ["    " + text, "    " + " " * (col - 1) + "^" + "~" * (width - 1)]


MAX_QUOTED = 120  # characters of a source line shown under an error


class CnncWarning(UserWarning):
    """A program that builds but says something that is most likely a mistake (a layer whose
    output nothing reads); its text is the rendered diagnostic."""
