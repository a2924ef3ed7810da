"""`cnnc.load`: a module file, verified against the program it keeps, in the runtime of its
target. The verification needs the compiler (driver.trust); the runtime only checks what it
relies on, so it loads in a process without the front end once a file is trusted."""

from __future__ import annotations

from pathlib import Path

from cnnc.artifact import format as artifact
from cnnc.runtime.module import Module


def load(path: str | Path, threads: int | None = None, trust: str = "code") -> Module:
    """A module from its .cnnm file. A cuda module gets the GPU runtime (`CudaModule`).

    Loading a module file runs its code. trust="code" (the default, for files you built)
    maps the stored object code, without running LLVM, once every manifest field is what
    the file's stored program implies. trust="rebuild" (for files from
    anyone else) ignores the stored code and compiles the stored program again, validated
    like a new program, keeping only the file's parameters (checked): such a file can do no
    more than a .cnn program can. See `driver.trust`."""
    from cnnc.driver.trust import check_trust, trusted_file  # the compiler: only when used

    if not isinstance(path, (str, Path)):
        raise artifact.CnncModuleError.single(
            f"load takes the path of a .cnnm file, got {type(path).__name__}")
    check_trust(trust)
    file = trusted_file(artifact.read(path), str(path), trust)
    if artifact.target_kind(file.manifest) == "cuda":
        from cnnc.runtime.cuda import CudaModule  # numba: only for a cuda module

        return CudaModule(file, str(path))
    return Module(file, str(path), threads)
