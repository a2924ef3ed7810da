"""The `cnnc` command: check, summary, compile --emit.

Exit codes (api.md): 0 success; 1 an error in the user's program, data or files, reported
as a message without a traceback; 2 a usage error. 3 means cnnc itself failed (a bug).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .diagnostics import CnncError
from .ir import format_graph, format_shape
from .parse import parse
from .pipeline import read_source, typed_graph
from .summary import format_table, to_json
from .syntax import format_program

EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnc", description="A compiler for small CNNs.")
    parser.add_argument("--version", action="version", version=f"cnnc {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = commands.add_parser("check", help="parse and shape-check a .cnn program")
    check.add_argument("program", metavar="NET.cnn")

    summary = commands.add_parser("summary", help="per-layer shapes, parameters and FLOPs")
    summary.add_argument("program", metavar="NET.cnn")
    summary.add_argument("--json", action="store_true", help="print JSON for programs")
    summary.add_argument("--dtype", choices=["f32", "f64"], help="override the input dtype")

    compile_ = commands.add_parser("compile", help="compile a program; --emit shows a stage")
    compile_.add_argument("program", metavar="NET.cnn")
    compile_.add_argument("--emit", choices=["ast", "ir"],
                          help="print this stage instead of compiling")
    compile_.add_argument("-o", "--output", metavar="FILE", help="write the result here")
    compile_.add_argument("--dtype", choices=["f32", "f64"], help="override the input dtype")
    compile_.add_argument("--target", choices=["cpu"], default="cpu")
    compile_.add_argument("-O", dest="opt_level", choices=["0", "1", "2", "3"], default="3",
                          help="optimisation level (-O0 .. -O3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits with 2 on a usage error
    try:
        return _run(args)
    except CnncError as error:
        print(error.render(), file=sys.stderr)
        count = len(error.diagnostics)
        if count > 1:
            print(f"{count} errors", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as error:  # a bug in cnnc: say so in one line, not a traceback
        print(f"cnnc: internal error: {type(error).__name__}: {error} "
              "(this is a bug in cnnc; please report it with the program)", file=sys.stderr)
        return EXIT_INTERNAL


def _run(args: argparse.Namespace) -> int:
    source = read_source(args.program)
    if args.command == "compile" and args.emit == "ast":
        return _write(format_program(parse(source)), args.output)
    graph = typed_graph(parse(source), source, getattr(args, "dtype", None))
    if args.command == "check":
        print(f"{source.name}: ok: network {graph.name}, {len(graph.layers) - 1} layers, "
              f"{sum(p.size for p in graph.params):,} parameters, input "
              f"{format_shape(graph.tensor(graph.input).shape[1:], 'x')} {graph.dtype.value}")
        return EXIT_OK
    if args.command == "summary":
        return _write(to_json(graph) if args.json else format_table(graph), None)
    if args.emit == "ir":
        return _write(format_graph(graph), args.output)
    print("cnnc compile: this version checks programs and prints their stages "
          "(--emit ast or --emit ir); native code generation is not available yet",
          file=sys.stderr)
    return EXIT_USAGE


def _write(text: str, output: str | None) -> int:
    if output is None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as error:
            print(f"error: cannot write to standard output: {error.strerror or error}",
                  file=sys.stderr)
            return EXIT_USER_ERROR
        return EXIT_OK
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as error:
        print(f"error: cannot write {output}: {error.strerror or error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
