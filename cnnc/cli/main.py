"""The `cnnc` command: check, summary, compile (or --emit a stage), train, eval, inspect,
plot, download, export (ONNX).

Exit codes (api.md): 0 success; 1 an error in the user's program, data or files, reported
as a message without a traceback; 2 a usage error; 130 interrupted (Ctrl-C). 3 means cnnc
itself failed (a bug); 70 (EX_SOFTWARE) that a stage of the compiler broke an invariant the
check after it found, in a message that names the stage (a bug too, caught where it began).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from cnnc.cli.compile import run_compile, run_inspect
from cnnc.cli.output import write_text
from cnnc.diagnostics import CnncError, CnncInputError, CnncInternalError, CnncWarning, Source
from cnnc.graph.ir import Graph, format_shape
from cnnc.support.files import shown_path, unusable_path
from cnnc.support.streams import CnncOutputError, guarded_streams
from cnnc.version import __version__

EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BROKEN_INVARIANT = 70  # EX_SOFTWARE of sysexits.h
EMIT_STAGES = ("ast", "ir", "grad", "kernels", "loops", "llvm", "asm", "cuda", "dot", "lib")


def version_text() -> str:
    """cnnc's version and the code generator's, which decides what the native code is."""
    import llvmlite
    import llvmlite.binding as llvm

    llvm_version = ".".join(str(part) for part in llvm.llvm_version_info)
    return f"cnnc {__version__} (llvmlite {llvmlite.__version__}, LLVM {llvm_version})"


class _Version(argparse.Action):
    """--version, computed only when asked (it imports llvmlite)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnc", description="A compiler for small CNNs.")
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_check(commands)
    _add_summary(commands)
    _add_compile(commands)
    _add_train(commands)
    _add_eval(commands)
    _add_inspect(commands)
    _add_import(commands)
    _add_plot(commands)
    _add_download(commands)
    _add_export(commands)
    return parser


def _add_check(commands) -> None:
    check = commands.add_parser("check", help="parse and shape-check a .cnn program")
    check.add_argument("program", metavar="NET.cnn")
    check.add_argument("--grad", action="store_true",
                       help="also compare the generated gradients with finite differences")
    check.add_argument("--tolerance", type=float, default=1e-6,
                       help="largest relative error --grad accepts (default 1e-6)")
    check.add_argument("--samples", type=int, default=1000, metavar="N",
                       help="--grad checks every element of a parameter of up to N elements, "
                            "and N drawn ones of a larger one (default 1000)")


def _add_summary(commands) -> None:
    summary = commands.add_parser("summary", help="per-layer shapes, parameters, FLOPs, memory")
    summary.add_argument("program", metavar="NET.cnn|NET.cnnm")
    summary.add_argument("--json", action="store_true", help="print JSON for programs")
    summary.add_argument("--dtype", choices=["f32", "f64"], help="override the input dtype")


def _add_compile(commands) -> None:
    compile_ = commands.add_parser("compile", help="compile a program; --emit shows a stage")
    compile_.add_argument("program", metavar="NET.cnn|MODEL.onnx")
    compile_.add_argument("--emit", choices=list(EMIT_STAGES),
                          help="print this stage instead of writing a module; lib: write a C "
                               "library (NET.h, libNET.a, libNET.so, NET.weights.bin) into "
                               "the folder -o names (docs/deploy.md)")
    compile_.add_argument("-o", "--output", metavar="FILE",
                          help="write the result here (--emit lib: a folder, default .)")
    compile_.add_argument("--weights", metavar="W.npz",
                          help="store these parameters in the module (e.g. trained ones, or "
                               "those cnnc import wrote) in place of the initial ones")
    compile_.add_argument("--dtype", choices=["f32", "f64"], help="override the input dtype")
    compile_.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                          help="cpu (native code, default) or cuda (Numba CUDA kernels)")
    compile_.add_argument("-O", dest="opt_level", choices=["0", "1", "2", "3"], default="3",
                          help="optimisation level (-O0 .. -O3)")
    compile_.add_argument("--explain-schedule", action="store_true",
                          help="print each kernel's schedule and why it was chosen")
    compile_.add_argument("--triple", metavar="TRIPLE",
                          help="compile for another machine: aarch64-linux-gnu, wasm32, arm, "
                               "riscv64, x86_64 (default: this one's)")
    compile_.add_argument("--cpu", metavar="NAME",
                          help="the CPU to compile for: native (this one; the default), or "
                               "for portable x86-64 code generic, x86-64-v2, x86-64-v3, "
                               "x86-64-v4; for another --triple generic (its default) or a "
                               "named core")
    compile_.add_argument("--embed-weights", action="store_true",
                          help="--emit lib: put the weights in the library as constant data "
                               "instead of NET.weights.bin")
    compile_.add_argument("--no-schedule", action="store_true",
                          help="plain loop nests for every kernel (slow; for comparison)")
    compile_.add_argument("--no-winograd", action="store_true",
                          help="direct convolutions only: no stride-1 3x3 convolution (or its "
                               "input gradient) runs as Winograd F(2x2, 3x3), whose rounding "
                               "differs slightly from the direct sum's")
    compile_.add_argument("--no-cache", action="store_true", help=NO_CACHE_HELP)
    compile_.add_argument("--strip", action="store_true",
                          help="leave the LLVM IR and loop IR out of the module file (to "
                               "ship it; it loads, runs and trains the same)")


NO_CACHE_HELP = ("compile afresh, neither reading nor writing the compile cache "
                 "(CNNC_CACHE_DIR, default ~/.cache/cnnc)")
REBUILD_HELP = ("ignore the module file's stored code and compile its stored program again "
                "(for files from elsewhere: loading a .cnnm otherwise runs its code)")


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train", help="train a network on MNIST or an .npz dataset",
        epilog="On several processes or machines: pip install 'cnnc[mpi]', then "
               "mpirun -n P cnnc train ... trains data-parallel; --batch is then each "
               "process's share of a step (see the README, Training on several machines).")
    train.add_argument("network", metavar="NET.cnn|NET.cnnm|MODEL.onnx")
    train.add_argument("--data", required=True, help="an MNIST folder or an .npz with x and y")
    train.add_argument("--epochs", type=int, help="passes over the data (train line's)")
    train.add_argument("--batch", type=int, help="mini-batch size (train line's)")
    train.add_argument("--lr", type=float, help="learning rate (train line's)")
    train.add_argument("--seed", type=int, help="data order and held-out split (train line's)")
    train.add_argument("--max-iter", type=int, help="MAX: stop after this many steps")
    train.add_argument("--tol", type=float,
                       help="ε: stop when no parameter changes more than this in a step")
    train.add_argument("--val-split", type=float, default=0.2,
                       help="held-out fraction when the data has one split (default 0.2)")
    train.add_argument("--out", help="final weights (.npz; default NETWORK.weights.npz)")
    train.add_argument("--checkpoint", help="checkpoint after each epoch "
                                            "(default NETWORK.ckpt.npz)")
    train.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint")
    train.add_argument("--weights", metavar="W.npz",
                       help="start from these weights (e.g. those cnnc import wrote)")
    train.add_argument("--loss", metavar="LOSS",
                       help="add the line 'loss LOSS' to a program without one (e.g. an "
                            "imported model): cross_entropy, or mse")
    train.add_argument("--save-best", nargs="?", const="", metavar="FILE",
                       help="keep the weights of the epoch with the lowest held-out loss "
                            "(default file NETWORK.best.weights.npz)")
    train.add_argument("--log", metavar="METRICS.jsonl",
                       help="one JSON line an epoch: loss, held-out loss, accuracy, time, lr")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                       help="when stderr is not a terminal: a progress line this often "
                            "(default 30)")
    train.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                       help="where a .cnn program is compiled to run (a .cnnm file has its own)")
    train.add_argument("--rebuild", action="store_true", help=REBUILD_HELP)
    train.add_argument("--no-cache", action="store_true", help=NO_CACHE_HELP)
    train.add_argument("--mpi-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="under mpirun: stop the job when the other processes have not "
                            "answered for this long (default 120)")


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="loss and accuracy of trained weights")
    evaluate.add_argument("network", metavar="NET.cnnm|NET.cnn|MODEL.onnx")
    evaluate.add_argument("--loss", metavar="LOSS",
                          help="add the line 'loss LOSS' to a program without one")
    evaluate.add_argument("--weights", required=True, help="weights (.npz)")
    evaluate.add_argument("--data", required=True, help="an MNIST folder or an .npz")
    evaluate.add_argument("--split", choices=["heldout", "train", "test", "all"],
                          default="heldout",
                          help="heldout (default): the samples train held out; train: those "
                               "it trained on; test: the t10k files; all: everything")
    evaluate.add_argument("--val-split", type=float, default=0.2,
                          help="the fraction train held out (default 0.2, as train's)")
    evaluate.add_argument("--seed", type=int, help="the seed train used (train line's)")
    evaluate.add_argument("--rebuild", action="store_true", help=REBUILD_HELP)
    evaluate.add_argument("--no-cache", action="store_true", help=NO_CACHE_HELP)


def _add_inspect(commands) -> None:
    inspect = commands.add_parser("inspect", help="what a compiled module file holds")
    inspect.add_argument("module", metavar="NET.cnnm")
    shown = inspect.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    shown.add_argument("--llvm", action="store_true", help="the stored LLVM IR")
    shown.add_argument("--loops", action="store_true", help="the stored loop IR")
    shown.add_argument("--cuda", action="store_true", help="the stored CUDA kernel source")
    shown.add_argument("--program", action="store_true",
                       help="the stored program the module was compiled from")


def _add_import(commands) -> None:
    imports = commands.add_parser(
        "import", help="an ONNX model as a .cnn program and its weights",
        epilog="Needs the onnx package: pip install 'cnnc[onnx]'. cnnc compile and cnnc "
               "train also take an .onnx file directly.")
    imports.add_argument("model", metavar="MODEL.onnx")
    imports.add_argument("-o", "--output", metavar="NET.cnn",
                         help="the program to write (default MODEL.cnn here); its weights "
                              "go beside it, as NET.weights.npz")
    imports.add_argument("--loss", metavar="LOSS",
                         help="add the line 'loss LOSS' (e.g. cross_entropy), for training")


def _add_plot(commands) -> None:
    plot = commands.add_parser("plot", help="draw a training curve from a --log file")
    plot.add_argument("log", metavar="METRICS.jsonl")
    plot.add_argument("-o", "--output", required=True, metavar="CURVE.png",
                      help="the image to write (.png, .svg or .pdf)")


def _add_download(commands) -> None:
    download = commands.add_parser("download", help="fetch MNIST into a folder, verified")
    download.add_argument("folder", metavar="DIR")
    download.add_argument("--split", choices=["train", "test", "both"], default="both")
    download.add_argument("--mirror", action="append", metavar="URL",
                          help="a base URL to try (repeatable; default: the known mirrors)")
    download.add_argument("--timeout", type=float, default=60.0,
                          help="seconds a file may take in all (default 60)")


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="write a network's inference pass as ONNX")
    export.add_argument("network", metavar="NET.cnn|NET.cnnm|MODEL.onnx")
    export.add_argument("--weights", metavar="W.npz",
                        help="weights (.npz) to write; default: a module file's stored ones, "
                             "an .onnx model's own, a program's initial ones")
    export.add_argument("-o", "--output", required=True, metavar="MODEL.onnx",
                        help="the ONNX file to write")
    export.add_argument("--opset", type=int, default=17, metavar="N",
                        help="the ONNX opset, 11 to 21 (default 17)")


def main(argv: Sequence[str] | None = None) -> int:
    with guarded_streams(), warnings.catch_warnings():
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", CnncWarning)
        try:
            args = build_parser().parse_args(argv)  # exits with 2 on a usage error
            _check_paths(args)
            code = _run(args)
            sys.stdout.flush()
            return code
        except CnncInternalError as error:
            _say(error.render())
            return EXIT_BROKEN_INVARIANT
        except CnncError as error:
            return _report(error)
        except KeyboardInterrupt as interrupt:
            _say(f"\n{str(interrupt) or 'interrupted'}")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            return EXIT_OK
        except Exception as error:  # a bug in cnnc: say so in one line, not a traceback
            _say(f"cnnc: internal error: {type(error).__name__}: {error} "
                 "(this is a bug in cnnc; please report it with the program)")
            return EXIT_INTERNAL


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A program's warnings as its errors are shown: the diagnostic's text, on stderr."""
    if issubclass(category, CnncWarning):
        _say(str(message))
    else:
        _say(f"warning: {message}")


def _report(error: CnncError) -> int:
    count = len(error.diagnostics)
    _say(error.render() + (f"\n{count} errors" if count > 1 else ""))
    return EXIT_USER_ERROR


def _say(text: str) -> None:
    """A line on stderr; when stderr is gone too, the exit code is all that is left."""
    with contextlib.suppress(CnncOutputError):
        print(text, file=sys.stderr)


# The arguments of each command that name files, and what it does with them. A path that
# cannot name a file is refused before any work: a NUL byte (only a Python caller can pass
# one), or for a file to write, an empty name or a trailing slash. Otherwise a training run
# would end with that error at its first checkpoint, or with a traceback from open().
PATH_ARGUMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "check": (("program", "read"),), "summary": (("program", "read"),),
    "compile": (("program", "read"), ("output", "write"), ("weights", "read")),
    "train": (("network", "read"), ("data", "read"), ("resume", "read"), ("weights", "read"),
              ("out", "write"),
              ("checkpoint", "write"), ("log", "write"), ("save_best", "write")),
    "eval": (("network", "read"), ("weights", "read"), ("data", "read")),
    "inspect": (("module", "read"),), "import": (("model", "read"), ("output", "write")),
    "plot": (("log", "read"), ("output", "write")),
    "download": (("folder", "use"),),
    "export": (("network", "read"), ("weights", "read"), ("output", "write"))}


def _check_paths(args: argparse.Namespace) -> None:
    for name, use in PATH_ARGUMENTS[args.command]:
        path = getattr(args, name)
        if path is None or (name == "save_best" and path == ""):  # "": the default file
            continue
        problem = unusable_path(path) if use == "write" or "\0" in path else None
        if problem is not None:
            raise CnncInputError.single(f"cannot {use} {shown_path(path)}: {problem}")


def _run(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args)


def _download(args: argparse.Namespace) -> int:
    from cnnc.training.download import DEFAULT_MIRRORS, download_mnist

    splits = ("train", "test") if args.split == "both" else (args.split,)
    download_mnist(args.folder, splits, args.mirror or DEFAULT_MIRRORS, args.timeout)
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from cnnc.cli.commands import run_train

    return run_train(args)


def _eval(args: argparse.Namespace) -> int:
    from cnnc.cli.commands import run_eval

    return run_eval(args)


def _export(args: argparse.Namespace) -> int:
    from cnnc.cli.export import run_export

    return run_export(args)


def _import(args: argparse.Namespace) -> int:
    from cnnc.cli.onnx_import import run_import

    return run_import(args)


def _plot(args: argparse.Namespace) -> int:
    from cnnc.cli.plot import plot_log

    plot_log(Path(args.log), Path(args.output))
    print(f"wrote {args.output}")
    return EXIT_OK


def _program(args: argparse.Namespace) -> tuple[Source, Graph]:
    from cnnc.cli.compile import program_source
    from cnnc.driver.pipeline import front_end

    source = program_source(args.program)[0]
    return source, front_end(source, getattr(args, "dtype", None))


def _check(args: argparse.Namespace) -> int:
    from cnnc.artifact.summary import human_bytes
    from cnnc.passes.summary import summarize

    source, graph = _program(args)
    if args.grad:
        from cnnc.cli.commands import run_gradient_check

        return run_gradient_check(graph, source, args.tolerance, args.samples)
    summary = summarize(graph)
    activations = sum(r.activation_bytes for r in summary.rows)
    print(f"{source.name}: ok: network {graph.name}, {len(graph.layers) - 1} layers, "
          f"{summary.total_params:,} parameters "
          f"({human_bytes(sum(r.param_bytes for r in summary.rows))}), "
          f"activations {human_bytes(activations)} a sample, input "
          f"{format_shape(graph.tensor(graph.input).shape[1:], 'x')} {graph.dtype.value}")
    return EXIT_OK


def _summary(args: argparse.Namespace) -> int:
    from cnnc.artifact.summary import format_table, to_json
    from cnnc.passes.summary import summarize

    if args.program.endswith(".cnnm"):
        summary = _module_summary(args.program)
    else:
        summary = summarize(_program(args)[1])
    write_text(to_json(summary) if args.json else format_table(summary), None)
    return EXIT_OK


def _module_summary(path: str):
    """From the manifest, once it is checked against the stored program (no code runs)."""
    from cnnc.artifact import format as artifact
    from cnnc.artifact.summary import from_manifest
    from cnnc.driver.trust import trusted_file

    return from_manifest(trusted_file(artifact.read(path), path).manifest)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": _check, "summary": _summary, "compile": run_compile, "train": _train,
    "eval": _eval, "inspect": run_inspect, "import": _import, "plot": _plot, "download": _download,
    "export": _export}


if __name__ == "__main__":
    sys.exit(main())
