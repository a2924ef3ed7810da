"""The ordered stages of the front end, with `stop_after` for `--emit` and golden tests."""

from __future__ import annotations

import enum
from pathlib import Path

from . import __version__, irgen, shapes
from .diagnostics import CnncInputError, CnncSemanticError, Source
from .ir import Graph
from .module import ModuleFile, code_hash, params_to_bytes
from .parse import parse
from .syntax import Program


class Stage(enum.Enum):
    AST = "ast"
    IR = "ir"


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


def front_end(source: Source, dtype: str | None = None) -> Graph:
    """Parse, build the graph and infer every shape; all errors of the file in one CnncError."""
    if dtype not in (None, "f32", "f64"):
        raise CnncInputError.single(f"dtype must be f32 or f64, got {dtype!r}")
    program = parse(source)
    return typed_graph(program, source, dtype)


def typed_graph(program: Program, source: Source, dtype: str | None = None) -> Graph:
    result = irgen.generate(program, dtype)
    typed, shape_errors = shapes.infer_collect(result.graph, result.broken_layers)
    diagnostics = sorted([*result.diagnostics, *shape_errors], key=_position)
    if diagnostics:
        raise CnncSemanticError(diagnostics, source)
    return typed


def _position(diagnostic) -> tuple[int, int]:
    span = diagnostic.span
    return (0, 0) if span is None else (span.line, span.col)


def compile_module(graph: Graph, opt_level: int = 3) -> ModuleFile:
    """The back end: kernels, loops, native code and initial parameters in a module file."""
    from .backends.llvm import ENTRY, compile_functions
    from .fuse import fuse
    from .initialise import initial_parameters
    from .loops import format_functions, lower

    program = fuse(graph)
    functions = lower(program)
    code = compile_functions(functions, [t.name for t in program.storage], opt_level)
    storage = [{"name": t.name, "role": t.role.value, "dtype": t.dtype.value,
                "shape": list(t.shape)} for t in program.storage]
    io_shape = {name: list(graph.tensor(name).shape[1:]) for name in (graph.input, graph.output)}
    manifest = {
        "cnnc_version": __version__,
        "network": graph.name,
        "dtype": graph.dtype.value,
        "input": {"name": graph.input, "shape": io_shape[graph.input]},
        "output": {"name": program.output, "shape": io_shape[graph.output]},
        "storage": storage,
        "entry_points": {"forward": ENTRY},
        "kernels": [f.name for f in functions],
        "target": {"kind": "cpu", "triple": code.target.triple, "cpu": code.target.cpu,
                   "features": [f[1:] for f in code.target.features.split(",")
                                if f.startswith("+")]},
        "opt_level": opt_level,
    }
    manifest["code_sha256"] = code_hash(code.object_code, manifest)
    sections = {"object": code.object_code, "llvm_ir": code.llvm_ir.encode(),
                "loops": format_functions(functions).encode(),
                "params": params_to_bytes(initial_parameters(graph))}
    return ModuleFile(manifest, sections)
