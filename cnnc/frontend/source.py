"""A program's text and the name errors call it by, read from a file or taken as given."""

from __future__ import annotations

from pathlib import Path

from cnnc.diagnostics import CnncInputError, Source

# A .cnn program is a few kilobytes; anything this large is not one (and /dev/zero never ends).
MAX_SOURCE_BYTES = 16 * 2**20


def read_source(path: str | Path) -> Source:
    """A .cnn file as text; a file that cannot be a program gets a one-line CnncInputError."""
    path = Path(path)
    name = str(path)

    def refuse(reason: str) -> CnncInputError:
        return CnncInputError.single(f"cannot read {name}: {reason}")

    try:
        if path.is_dir():
            raise refuse("it is a directory, not a .cnn file")
        if not path.exists():
            raise refuse("no such file")
        if not path.is_file():
            raise refuse("it is not a regular file")
        with path.open("rb") as handle:
            data = handle.read(MAX_SOURCE_BYTES + 1)
    except OSError as error:
        raise refuse((error.strerror or str(error)).lower()) from None
    if len(data) > MAX_SOURCE_BYTES:
        raise refuse(f"it is larger than {MAX_SOURCE_BYTES // 2**20} MiB, not a .cnn program")
    if b"\0" in data:
        raise refuse("it is a binary file, not a .cnn program")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise refuse(f"it is not valid UTF-8 (line {line}, byte offset {error.start})") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise refuse("the file is empty")
    return Source(text, name)


def to_source(program: str | Path | Source) -> Source:
    """Program text, or a path: a Path, or a one-line string naming a file or ending in .cnn."""
    if isinstance(program, Source):
        return program
    if not isinstance(program, (str, Path)):
        raise CnncInputError.single("a program is its text or a path to a .cnn file, not "
                                    f"{type(program).__name__}")
    if isinstance(program, Path):
        return read_source(program)
    if "\n" not in program and (program.endswith(".cnn") or _is_file(program)):
        return read_source(program)
    return Source(program.removeprefix("\ufeff"), "<string>")


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # not a usable path, e.g. too long or with a NUL byte
        return False


def is_onnx(program: object) -> bool:
    """Whether `program` names an ONNX file (by its suffix), as cnnc.compile and the
    commands that take a network tell an .onnx path from a .cnn one. Here, not in the
    importer, so that compiling a .cnn program never loads the importer."""
    return isinstance(program, (str, Path)) and "\n" not in str(program) \
        and str(program).lower().endswith(".onnx")
