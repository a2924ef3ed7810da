"""The programs that turn a library's objects into `.a`, `.so` and `.wasm` files: a C
compiler for the API's source, an archiver and a linker, for the library's target, found
on PATH (CC and AR name the host's). LLVM, in cnnc, compiles the kernels; these see only
object files and the small C file of the API."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cnnc.diagnostics import CnncInputError

# by the architecture of the triple: the C compilers to try (a prefix of a command line),
# the archivers, and how to install them on Debian
CROSS = {
    "aarch64": ([["aarch64-linux-gnu-gcc"], ["clang", "--target=aarch64-linux-gnu"]],
                ["aarch64-linux-gnu-ar", "llvm-ar"], "gcc-aarch64-linux-gnu"),
    "armv7": ([["arm-linux-gnueabihf-gcc"], ["clang", "--target=armv7-linux-gnueabihf"]],
              ["arm-linux-gnueabihf-ar", "llvm-ar"], "gcc-arm-linux-gnueabihf"),
    "riscv64": ([["riscv64-linux-gnu-gcc"], ["clang", "--target=riscv64-linux-gnu"]],
                ["riscv64-linux-gnu-ar", "llvm-ar"], "gcc-riscv64-linux-gnu"),
    # no C library: the API's source has its own allocator there (model.c.in)
    "wasm32": ([["clang", "--target=wasm32", "-nostdlib", "-ffreestanding", "-mbulk-memory",
                 "-msimd128"]], ["llvm-ar"], "clang lld llvm"),
}
HOST = ([["cc"], ["gcc"], ["clang"]], ["ar", "llvm-ar"], "gcc binutils")
WASM_LINKERS = ("wasm-ld", "wasm-ld-14", "wasm-ld-15", "wasm-ld-16", "wasm-ld-17")


@dataclass(frozen=True, slots=True)
class Toolchain:
    triple: str
    cc: tuple[str, ...]  # compiles C for the triple: `cc -c file.c -o file.o` with flags
    ar: str
    linker: tuple[str, ...] | None  # a shared library's (cc -shared) or wasm-ld

    @property
    def is_wasm(self) -> bool:
        return self.triple.startswith("wasm")

    def compile_c(self, source: Path, output: Path, include: Path) -> None:
        flags = ["-O2", "-fvisibility=hidden", "-std=c99", f"-I{include}"]
        flags += [] if self.is_wasm else ["-fPIC"]
        run([*self.cc, *flags, "-c", str(source), "-o", str(output)], "compile the C API")

    def archive(self, objects: list[Path], output: Path) -> None:
        output.unlink(missing_ok=True)  # `ar r` adds to an archive that is there
        run([self.ar, "rcs", str(output), *map(str, objects)], "archive the library")

    def link_shared(self, objects: list[Path], output: Path) -> None:
        run([*self.linker, "-shared", "-o", str(output), *map(str, objects), "-lm"],
            "link the shared library")

    def link_wasm(self, objects: list[Path], output: Path, exports: list[str]) -> None:
        """A WebAssembly module with no entry point that exports the API; the C math
        functions the kernels call (expf, ...) are imports from `env` that the loader
        gives (examples/wasm)."""
        # a stack of 8 MiB, as a thread's is on Linux: the default 64 KiB is less than some
        # kernels' private arrays
        flags = ["--no-entry", "--allow-undefined", "--export-dynamic", "--strip-debug",
                 "-z", "stack-size=8388608"]
        run([*self.linker, *flags, *[f"--export={e}" for e in exports], "-o", str(output),
             *map(str, objects)], "link the WebAssembly module")


def find_toolchain(triple: str, host_triple: str) -> Toolchain:
    """The tools for `triple`, or a CnncInputError that says which were looked for."""
    arch = triple.split("-")[0]
    native = arch == host_triple.split("-")[0]
    compilers, archivers, debian = HOST if native else CROSS.get(arch, ([], [], ""))
    if native and os.environ.get("CC"):
        compilers = [shlex.split(os.environ["CC"])]
    if native and os.environ.get("AR"):
        archivers = [os.environ["AR"]]
    cc = next((c for c in compilers if shutil.which(c[0])), None)
    ar = next((a for a in archivers if shutil.which(a)), None)
    if cc is None or ar is None:
        looked = ", ".join(c[0] for c in compilers) if cc is None else ", ".join(archivers)
        what = "a C compiler" if cc is None else "an archiver"
        hint = f" (on Debian: apt-get install {debian})" if debian else ""
        raise CnncInputError.single(f"--emit lib for {triple} needs {what} for it, and none "
                                    f"of {looked} is installed{hint}")
    if arch == "wasm32":
        linker = next(((w,) for w in WASM_LINKERS if shutil.which(w)), None)
        if linker is None:
            raise CnncInputError.single("--emit lib for wasm32 needs wasm-ld (on Debian: "
                                        "apt-get install lld)")
    else:
        linker = tuple(cc)
    return Toolchain(triple, tuple(cc), ar, linker)


def run(command: list[str], what: str) -> None:
    """Run a tool; its failure is the user's to see, with its own words."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        raise CnncInputError.single(f"cannot {what}: {command[0]}: {error.strerror}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()[-20:]
        raise CnncInputError.single(f"cannot {what}: {shlex.join(command)} exited with "
                                    f"{done.returncode}:\n" + "\n".join(said))
