"""The `cnnc` command: check, summary, compile (or --emit a stage), inspect.

Exit codes (api.md): 0 success; 1 an error in the user's program, data or files, reported
as a message without a traceback; 2 a usage error. 3 means cnnc itself failed (a bug).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .backends.llvm import assembly, compile_functions
from .diagnostics import CnncError, CnncInputError
from .fuse import format_kernels
from .ir import Graph, format_graph, format_shape
from .loader import validated_manifest
from .loops import format_functions
from .module import format_manifest, target_kind
from .module import read as read_module
from .module import write as write_module
from .parse import parse
from .pipeline import (
    compile_cuda_module,
    compile_module,
    entry_points,
    lower_program,
    module_kernels,
    read_source,
    typed_graph,
)
from .summary import format_table, to_json
from .syntax import format_program

EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnc", description="A compiler for small CNNs.")
    parser.add_argument("--version", action="version", version=f"cnnc {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = commands.add_parser("check", help="parse and shape-check a .cnn program")
    check.add_argument("program", metavar="NET.cnn")
    check.add_argument("--grad", action="store_true",
                       help="also compare every generated gradient with finite differences")
    check.add_argument("--tolerance", type=float, default=1e-6,
                       help="largest relative error --grad accepts (default 1e-6)")

    summary = commands.add_parser("summary", help="per-layer shapes, parameters and FLOPs")
    summary.add_argument("program", metavar="NET.cnn")
    summary.add_argument("--json", action="store_true", help="print JSON for programs")
    summary.add_argument("--dtype", choices=["f32", "f64"], help="override the input dtype")

    compile_ = commands.add_parser("compile", help="compile a program; --emit shows a stage")
    compile_.add_argument("program", metavar="NET.cnn")
    compile_.add_argument("--emit", choices=list(EMIT_STAGES),
                          help="print this stage instead of writing a module")
    compile_.add_argument("-o", "--output", metavar="FILE", help="write the result here")
    compile_.add_argument("--dtype", choices=["f32", "f64"], help="override the input dtype")
    compile_.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                          help="cpu (native code, default) or cuda (Numba CUDA kernels)")
    compile_.add_argument("-O", dest="opt_level", choices=["0", "1", "2", "3"], default="3",
                          help="optimisation level (-O0 .. -O3)")
    compile_.add_argument("--explain-schedule", action="store_true",
                          help="print each kernel's schedule and why it was chosen")
    compile_.add_argument("--no-schedule", action="store_true",
                          help="plain loop nests for every kernel (slow; for comparison)")

    train = commands.add_parser(
        "train", help="train a network on MNIST or an .npz dataset",
        epilog="On several processes or machines: pip install 'cnnc[mpi]', then "
               "mpirun -n P cnnc train ... trains data-parallel; --batch is then each "
               "process's share of a step (see the README, Training on several machines).")
    train.add_argument("network", metavar="NET.cnn|NET.cnnm")
    train.add_argument("--data", required=True, help="an MNIST folder or an .npz with x and y")
    train.add_argument("--epochs", type=int, help="passes over the data (train line's)")
    train.add_argument("--batch", type=int, help="mini-batch size (train line's)")
    train.add_argument("--lr", type=float, help="learning rate (train line's)")
    train.add_argument("--seed", type=int, help="data order (train line's)")
    train.add_argument("--max-iter", type=int, help="MAX: stop after this many steps")
    train.add_argument("--tol", type=float,
                       help="ε: stop when no parameter changes more than this in a step")
    train.add_argument("--val-split", type=float, default=0.2,
                       help="held-out fraction when the data has one split (default 0.2)")
    train.add_argument("--out", help="final weights (.npz; default NETWORK.weights.npz)")
    train.add_argument("--checkpoint", help="checkpoint after each epoch "
                                            "(default NETWORK.ckpt.npz)")
    train.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                       help="where a .cnn program is compiled to run (a .cnnm file has its own)")
    train.add_argument("--mpi-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="under mpirun: stop the job when the other processes have not "
                            "answered for this long (default 120)")

    download = commands.add_parser("download", help="fetch MNIST into a folder, verified")
    download.add_argument("folder", metavar="DIR")
    download.add_argument("--split", choices=["train", "test", "both"], default="both")
    download.add_argument("--mirror", action="append", metavar="URL",
                          help="a base URL to try (repeatable; default: the known mirrors)")
    download.add_argument("--timeout", type=float, default=60.0, help="seconds a request")

    evaluate = commands.add_parser("eval", help="loss and accuracy of trained weights")
    evaluate.add_argument("network", metavar="NET.cnnm|NET.cnn")
    evaluate.add_argument("--weights", required=True, help="weights (.npz)")
    evaluate.add_argument("--data", required=True, help="an MNIST folder or an .npz")

    inspect = commands.add_parser("inspect", help="what a compiled module file holds")
    inspect.add_argument("module", metavar="NET.cnnm")
    shown = inspect.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    shown.add_argument("--llvm", action="store_true", help="the stored LLVM IR")
    shown.add_argument("--loops", action="store_true", help="the stored loop IR")
    shown.add_argument("--cuda", action="store_true", help="the stored CUDA kernel source")
    return parser


EMIT_STAGES = ("ast", "ir", "grad", "kernels", "loops", "llvm", "asm", "cuda")


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
    if args.command == "inspect":
        return _write(inspect_text(args), None)
    if args.command == "download":
        from .download import DEFAULT_MIRRORS, download_mnist

        splits = ("train", "test") if args.split == "both" else (args.split,)
        download_mnist(args.folder, splits, args.mirror or DEFAULT_MIRRORS, args.timeout)
        return EXIT_OK
    if args.command in ("train", "eval"):
        from .commands import run_eval, run_train

        return run_train(args) if args.command == "train" else run_eval(args)
    source = read_source(args.program)
    if args.command == "compile" and args.emit == "ast":
        return _write(format_program(parse(source)), args.output)
    graph = typed_graph(parse(source), source, getattr(args, "dtype", None))
    if args.command == "check" and args.grad:
        from .commands import run_gradient_check

        return run_gradient_check(graph, source, args.tolerance)
    if args.command == "check":
        print(f"{source.name}: ok: network {graph.name}, {len(graph.layers) - 1} layers, "
              f"{sum(p.size for p in graph.params):,} parameters, input "
              f"{format_shape(graph.tensor(graph.input).shape[1:], 'x')} {graph.dtype.value}")
        return EXIT_OK
    if args.command == "summary":
        return _write(to_json(graph) if args.json else format_table(graph), None)
    scheduled = not args.no_schedule
    if args.target == "cuda" and (args.explain_schedule or args.emit in ("llvm", "asm")):
        shown = "--explain-schedule" if args.explain_schedule else f"--emit {args.emit}"
        print(f"error: {shown} shows CPU code; for --target cuda, --emit cuda shows the "
              "kernels", file=sys.stderr)
        return EXIT_USAGE
    if args.explain_schedule:
        return _write(explain_schedules(graph, scheduled), args.output)
    if args.emit is not None:
        return _write(emit_stage(graph, args.emit, int(args.opt_level), scheduled), args.output)
    output = Path(args.output) if args.output else Path(Path(args.program).stem + ".cnnm")
    if args.target == "cuda":
        module_file = compile_cuda_module(graph)
        write_module(module_file, output)
        launches = len(module_file.manifest["entry_points"]["forward"])
        print(f"wrote {output}: network {graph.name}, target cuda, {launches} kernel launches "
              f"forward, {sum(p.size for p in graph.params):,} parameters, "
              f"{graph.dtype.value}")
        return EXIT_OK
    module_file = compile_module(graph, int(args.opt_level), scheduled)
    write_module(module_file, output)
    kernels = len(module_file.manifest["kernels"])
    forward = sum(1 for k in module_file.manifest["kernels"] if k.endswith("_fwd"))
    training = f" and {kernels - forward} for training" if kernels > forward else ""
    print(f"wrote {output}: network {graph.name}, {forward} forward kernels{training}, "
          f"{sum(p.size for p in graph.params):,} parameters, {graph.dtype.value}, "
          f"-O{args.opt_level}")
    return EXIT_OK


def explain_schedules(graph: Graph, scheduled: bool) -> str:
    """Every kernel the module would have (the backward ones too, with a loss line)."""
    from .schedule import explain, host_machine

    _, _, schedules = lower_program(module_kernels(graph), scheduled)
    plain = "no kernel is scheduled (--no-schedule)\n" if not schedules else ""
    return explain(schedules, host_machine()) + plain


def emit_stage(graph: Graph, stage: str, opt_level: int, scheduled: bool = True) -> str:
    """The text of one stage after the graph: ir, kernels, loops, llvm or asm."""
    from .autodiff import differentiate

    if stage == "ir":
        return format_graph(graph)
    if stage == "grad":
        return format_graph(differentiate(graph))
    program = module_kernels(graph)
    if stage == "kernels":
        return format_kernels(program)
    if stage == "cuda":
        return compile_cuda_module(graph).sections["cuda"].decode("utf-8")
    functions, scratch, _ = lower_program(program, scheduled)
    if stage == "loops":
        return format_functions(tuple(functions))
    code = compile_functions(tuple(functions), [t.name for t in program.storage + tuple(scratch)],
                             opt_level, entry_points(program))
    return code.llvm_ir if stage == "llvm" else assembly(code.llvm_ir, opt_level)


def inspect_text(args: argparse.Namespace) -> str:
    module_file = read_module(args.module)
    kind = target_kind(module_file.manifest)
    validated_manifest(module_file, args.module, kind)
    if args.json:
        return json.dumps(module_file.manifest, indent=2, sort_keys=True) + "\n"
    section = "llvm_ir" if args.llvm else "cuda" if args.cuda else "loops" if args.loops \
        else None
    if section is not None and section not in module_file.sections:
        raise CnncInputError.single(f"{args.module} is a {kind} module and holds no "
                                    f"{'LLVM IR' if args.llvm else 'CUDA source'}")
    if section is not None:
        return module_file.sections[section].decode("utf-8")
    return format_manifest(module_file)


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
