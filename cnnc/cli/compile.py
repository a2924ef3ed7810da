"""`cnnc compile`: a module file, one stage's text (--emit) or each kernel's schedule
(--explain-schedule), all from the one build of the pass list; and `cnnc inspect`, what a
module file holds."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cnnc.cli.output import write_text
from cnnc.diagnostics import CnncInputError, Source

if TYPE_CHECKING:
    from cnnc.artifact.format import ModuleFile
    from cnnc.driver.pipeline import Build, Options

EXIT_OK, EXIT_USAGE = 0, 2  # as in main.py (api.md)


def run_compile(args: argparse.Namespace) -> int:
    from cnnc.driver.pipeline import Build, Stage, advance

    if getattr(args, "strip", False) and (args.emit is not None or args.explain_schedule):
        shown = "--explain-schedule" if args.explain_schedule else f"--emit {args.emit}"
        print(f"error: --strip is for module files; {shown} writes no module file",
              file=sys.stderr)
        return EXIT_USAGE
    source, weights = program_source(args.program)
    if getattr(args, "weights", None):  # the module's stored parameters, from a weights file
        from cnnc.support.npzfile import read_npz

        weights = {**(weights or {}), **read_npz(args.weights, "weights", CnncInputError)}
    options = _build_options(args)
    if args.emit == "lib":
        return _compile_library(args, source, options, weights)
    if getattr(args, "embed_weights", False):
        print("error: --embed-weights is for --emit lib", file=sys.stderr)
        return EXIT_USAGE
    if args.emit == "ast":  # the syntax tree even of a program with semantic errors
        write_text(emit_stage(Build(source), "ast", options), args.output)
        return EXIT_OK
    front = advance(Build(source), options, Stage.SHAPES)
    if args.target == "cuda" and (args.explain_schedule or args.emit in ("llvm", "asm")):
        shown = "--explain-schedule" if args.explain_schedule else f"--emit {args.emit}"
        print(f"error: {shown} shows CPU code; for --target cuda, --emit cuda shows the "
              "kernels", file=sys.stderr)
        return EXIT_USAGE
    if args.explain_schedule:
        write_text(explain_schedules(front, options), args.output)
        return EXIT_OK
    if args.emit is not None:
        write_text(emit_stage(front, args.emit, options), args.output)
        return EXIT_OK
    return _compile_to_file(args, front, options, weights)


def program_source(path: str) -> tuple[Source, dict | None]:
    """A .cnn file's text; an .onnx model's imported program and its weights."""
    from cnnc.frontend.source import is_onnx, read_source

    if is_onnx(path):
        from cnnc.onnx.importer import imported_source

        return imported_source(path)
    return read_source(path), None


def _build_options(args: argparse.Namespace) -> Options:
    """The build the command line asks for, for this host's CPU (or for CUDA)."""
    from cnnc.driver.pipeline import Options

    if args.target == "cuda":
        if args.triple or args.cpu:
            raise CnncInputError.single("--triple and --cpu choose a CPU; --target cuda "
                                        "compiles for NVIDIA GPUs")
        return Options(backend="cuda", dtype=args.dtype)
    from cnnc.backends.target import named_target

    try:
        target = named_target(args.triple, args.cpu)
    except ValueError as error:
        raise CnncInputError.single(str(error)) from None
    return Options(target.with_winograd(not args.no_winograd), "llvm", args.dtype,
                   int(args.opt_level), not args.no_schedule)


def _compile_library(args: argparse.Namespace, source: Source, options: Options,
                     weights: dict | None) -> int:
    """--emit lib: the C library's files in the folder -o names."""
    from cnnc.library.build import build_library

    if options.backend == "cuda":
        raise CnncInputError.single("--emit lib writes a C library for a CPU; it has no "
                                    "--target cuda")
    out = Path(args.output or ".")
    if out.exists() and not out.is_dir():
        raise CnncInputError.single(f"--emit lib writes several files: -o {out} must be a "
                                    "folder, and is a file")
    started = time.perf_counter()
    library = build_library(source, out, options, weights, args.embed_weights)
    sizes = ", ".join(f"{f.name} ({f.stat().st_size:,} bytes)" for f in library.files)
    print(f"wrote {sizes} into {out}: network {library.layout.net}, for "
          f"{library.target.triple} {library.target.cpu} ({time.perf_counter() - started:.1f} s)")
    return EXIT_OK


def _compile_to_file(args: argparse.Namespace, front: Build, options: Options,
                     weights: dict | None = None) -> int:
    from cnnc.artifact.format import pack, stripped, with_params, write_atomically
    from cnnc.driver.cache import module_file as cached_module_file

    output = Path(args.output) if args.output else Path(Path(args.program).stem + ".cnnm")
    started = time.perf_counter()
    graph = front.graph
    params = f"{sum(p.size for p in graph.params):,} parameters, {graph.dtype.value}"
    module_file, cached = cached_module_file(front, options,
                                             not getattr(args, "no_cache", False))
    if weights:  # an imported model's own weights, in place of the initial ones
        module_file = with_params(module_file, weights)
    if getattr(args, "strip", False):  # after the cache, which keeps whole files
        module_file = stripped(module_file)
    data = pack(module_file)
    write_atomically(output, data)
    took = f"{time.perf_counter() - started:.1f} s" + (", from the compile cache" if cached
                                                       else "")
    wrote = f"wrote {output}" + (_stripped_note(module_file, len(data))
                                 if getattr(args, "strip", False) else "")
    if options.backend == "cuda":
        launches = len(module_file.manifest["entry_points"]["forward"])
        print(f"{wrote}: network {graph.name}, target cuda, {launches} kernel launches "
              f"forward, {params} ({took})")
        return EXIT_OK
    kernels = len(module_file.manifest["kernels"])
    forward = sum(1 for k in module_file.manifest["kernels"] if k.endswith("_fwd"))
    training = f" and {kernels - forward} for training" if kernels > forward else ""
    print(f"{wrote}: network {graph.name}, {forward} forward kernels{training}, "
          f"{params}, -O{args.opt_level} ({took})")
    return EXIT_OK


def _stripped_note(module_file: ModuleFile, size: int) -> str:
    """' (stripped: no LLVM IR, no loop IR; 382.2 KiB)' for the "wrote" line."""
    from cnnc.artifact.format import SECTION_CONTENTS, missing_sections
    from cnnc.artifact.summary import human_bytes

    left_out = ", ".join(f"no {SECTION_CONTENTS[name]}" for name in missing_sections(module_file))
    return f" (stripped: {left_out}; {human_bytes(size)})"


def explain_schedules(build: Build, options: Options) -> str:
    """Every kernel the module would have (the backward ones too, with a loss line)."""
    from cnnc.driver.lowering import ENTRY_NAMES
    from cnnc.driver.pipeline import Stage, advance
    from cnnc.schedule.cost import explain

    lowered = advance(build, options, Stage.LOWER).lowered
    plain = "no kernel is scheduled (--no-schedule)\n" if not lowered.schedules else ""
    pack = lowered.entries.get(ENTRY_NAMES["pack"], [])
    once = (f"run once per change of the parameters, not on every call (the pack entry "
            f"point): {', '.join(pack)}\n") if pack else ""
    return explain(list(lowered.schedules), options.target.machine) + plain + once


# The stage each --emit prints the result of, and the backend it implies: LLVM IR and
# assembly are CPU code, and --emit cuda shows a CUDA module's source whatever the target.
EMITTED_AFTER = {"ast": "parse", "ir": "shapes", "grad": "autodiff", "kernels": "fuse",
                 "loops": "lower", "llvm": "codegen", "asm": "codegen", "cuda": "codegen",
                 "dot": "shapes"}
EMIT_BACKEND = {"llvm": "llvm", "asm": "llvm", "cuda": "cuda"}


def emit_stage(build: Build, stage: str, options: Options) -> str:
    """The text of one --emit stage of `build`, taken on as far as that stage: the module's
    own loop functions and LLVM IR, its update functions included."""
    from cnnc.driver.pipeline import Stage, advance

    if stage in EMIT_BACKEND:
        options = dataclasses.replace(options, backend=EMIT_BACKEND[stage])
    done = advance(build, options, Stage(EMITTED_AFTER[stage]))
    return _stage_text(done, stage, options)


def _stage_text(build: Build, stage: str, options: Options) -> str:
    from cnnc.graph.ir import format_graph

    if stage == "ast":
        from cnnc.frontend.syntax import format_program

        return format_program(build.syntax)
    if stage == "ir":
        return format_graph(build.graph)
    if stage == "dot":  # the layer graph, for Graphviz
        from cnnc.passes.dot import format_dot

        return format_dot(build.graph)
    if stage == "grad":
        if build.differentiated is None:  # autodiff's own error: there is no loss line
            from cnnc.passes.autodiff import differentiate

            differentiate(build.graph)
        return format_graph(build.differentiated)
    if stage == "kernels":
        from cnnc.graph.kernels import format_kernels

        return format_kernels(build.kernels)
    if stage == "loops":
        from cnnc.loops.printer import format_functions

        return format_functions(build.lowered.functions)
    if stage == "cuda":
        return build.code.source
    if stage == "llvm":
        return build.code.llvm_ir
    from cnnc.backends.llvm.codegen import assembly

    return assembly(build.code.llvm_ir, options.opt_level, target=options.target)


def run_inspect(args: argparse.Namespace) -> int:
    write_text(inspect_text(args), None)
    return EXIT_OK


CODE_NOTE = ("note: loading a .cnnm runs its code (native object code, or Python source for "
             "Numba). cnnc checks that its manifest matches its stored program, but trusts "
             "the code itself; for a file you did not build, use --rebuild (Python: "
             "cnnc.load(path, trust=\"rebuild\")), which compiles the stored program again "
             "and ignores the stored code.\n")


def inspect_text(args: argparse.Namespace) -> str:
    from cnnc.artifact import format as artifact
    from cnnc.driver.trust import trusted_file

    module_file = trusted_file(artifact.read(args.module), args.module)  # runs nothing
    kind = artifact.target_kind(module_file.manifest)
    if args.json:
        return json.dumps(module_file.manifest, indent=2, sort_keys=True) + "\n"
    section = "llvm_ir" if args.llvm else "cuda" if args.cuda else "loops" if args.loops \
        else "program" if args.program else None
    if section in artifact.missing_sections(module_file):
        raise CnncInputError.single(
            f"{args.module} holds no {artifact.SECTION_CONTENTS[section]}: it was compiled "
            "with --strip (compile the program again without --strip to keep it)")
    if section is not None and section not in module_file.sections:
        raise CnncInputError.single(f"{args.module} is a {kind} module and holds no "
                                    f"{'LLVM IR' if args.llvm else 'CUDA source'}")
    if section is not None:
        return module_file.sections[section].decode("utf-8")
    return artifact.format_manifest(module_file) + CODE_NOTE
