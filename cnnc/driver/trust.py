"""What a module file may be trusted with, checked before any of its code runs.

A `.cnnm` holds native object code (or, for cuda, Python source that Numba compiles), so
loading one runs its code. Its hashes only catch damage: whoever edits a file can compute
them again. So a file also keeps the program it was compiled from, and loading it derives
the module from that program again, without LLVM, and compares.

Whatever the trust mode, every manifest field is first checked for its type, range and
consistency with the others (`artifact.checks`): a size of 4.0, a learning rate of NaN or a
network name like ../x is a CnncModuleError naming the field, never a Python exception,
and never reaches the runtime. Then:

- trust="code" (the default, for files you built): every manifest field must be what the
  stored program compiles to here (buffer table, entry points, kernels, optimizer
  settings, ...), compared as JSON (types included), so a buffer smaller than the code
  writes, a swapped entry point or another learning rate is refused. The object code
  itself is trusted, and so is the record of what it was built for (target, build): a
  file whose machine model and buffer table were both forged to agree loads, and its code
  then writes past buffers, as code replaced outright would do anything. The loader checks
  the object files' ELF tables, so garbage is refused rather than crash the process, but
  not their instructions.
- trust="rebuild" (for files from elsewhere): the stored code is ignored and the stored
  program is compiled again, validated like a new program; only the parameters are taken
  from the file, after checking their names, shapes and dtypes. Such a file can do no more
  than a `.cnn` program can: a consistent forgery of program and manifest is just another
  network.
"""

from __future__ import annotations

from typing import Any

from cnnc.artifact import format as artifact
from cnnc.artifact.checks import check_fields, same_json
from cnnc.diagnostics import CnncError, Source
from cnnc.graph.ir import Graph

TRUST_MODES = ("code", "rebuild")
_shown = artifact.shown_value  # a manifest value as messages quote it

# Fields that describe the code rather than what the program implies: their form checked by
# artifact.checks, their values elsewhere (loader: version, target, code hash; unpack:
# sections) or inputs of the derivation (build).
NOT_DERIVED = ("cnnc_version", "code_sha256", "sections", "build", "target")


def trusted_file(file: artifact.ModuleFile, source: str, trust: str = "code"
                 ) -> artifact.ModuleFile:
    """`file` itself once its manifest is what its program implies (trust="code"), or the
    program compiled again with the file's parameters (trust="rebuild"). Either way every
    field is checked first; in code mode also the version, target and code hash (loader),
    since the stored code is what will run."""
    from cnnc.runtime.loader import check_manifest

    check_trust(trust)
    if trust == "code":
        check_manifest(file, source, artifact.target_kind(file.manifest))
    else:
        check_fields(file.manifest, source)
    manifest = file.manifest
    graph, program = _stored_graph(file, manifest, source)
    if trust == "rebuild":
        return _rebuilt(file, manifest, graph, program, source)
    if manifest["target"]["kind"] == "cuda":
        _compare_cuda(file, manifest, graph, program, source)
    else:
        _compare(manifest, _planned(manifest, graph, program), source)
    return file


def check_trust(trust: Any) -> None:
    if trust not in TRUST_MODES:
        raise artifact.CnncModuleError.single(
            f"trust must be 'code' or 'rebuild', got {trust!r}")


def _refuse(source: str, reason: str) -> artifact.CnncModuleError:
    return artifact.CnncModuleError.single(f"cannot load {source}: {reason}")


def _stored_graph(file: artifact.ModuleFile, manifest: dict[str, Any],
                  source: str) -> tuple[Graph, Source]:
    """The stored program through the whole front end, like a new program."""
    from cnnc.driver.pipeline import front_end
    from cnnc.frontend.source import MAX_SOURCE_BYTES

    data = file.sections.get("program", b"")
    if len(data) > MAX_SOURCE_BYTES:
        raise _refuse(source, "its stored program is too large to be a .cnn program")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(source, "its stored program is not UTF-8 text") from None
    program = Source(text, f"{source} (stored program)")
    try:
        graph = front_end(program, manifest["dtype"])
    except CnncError as error:
        raise _refuse(source, "its stored program is not a valid program:\n"
                      + error.render()) from None
    return graph, program


def _planned(manifest: dict[str, Any], graph: Graph, program: Source) -> dict[str, Any]:
    from cnnc.driver.modules import plan_module
    from cnnc.schedule.cost import Machine

    build = manifest["build"]
    return plan_module(graph, program, manifest["opt_level"], build["scheduled"],
                       Machine(**build["machine"])).manifest


def _compare(stored: dict[str, Any], derived: dict[str, Any], source: str) -> None:
    """Every derived field equal in the file, and no field the derivation lacks."""
    # the shared regions follow from the buffer table and entry points: where those differ,
    # they are what the message names
    for key in sorted(set(stored) | set(derived), key=lambda k: (k == "shared", k)):
        if key in NOT_DERIVED or (key in stored and key in derived
                                  and same_json(stored[key], derived[key])):
            continue
        if key not in derived:
            raise _refuse(source, f"the manifest has the field {key}, which its program "
                                  "does not give")
        raise _refuse(source, f"the manifest's {key} does not match its stored program: "
                      + _difference(key, stored.get(key), derived[key])
                      + "; compile the program again (or load with trust='rebuild')")


def _difference(path: str, stored: Any, derived: Any) -> str:
    """Where `stored` first differs from `derived`: the buffer table by its entries, other
    objects and lists by the innermost field or item that differs."""
    if path == "storage" and isinstance(stored, list):
        for index, wanted in enumerate(derived):
            have = stored[index] if index < len(stored) else None
            if not same_json(have, wanted):
                return (f"buffer {index} is {_shown(have)} in the file, but the program "
                        f"gives {_shown(wanted)}")
        return f"the file has {len(stored)} buffers, the program {len(derived)}"
    if isinstance(stored, dict) and isinstance(derived, dict):
        for key in sorted(set(stored) | set(derived)):
            if key not in stored or key not in derived:
                return (f"{path}.{key} is {'missing' if key not in stored else 'extra'} in "
                        "the file")
            if not same_json(stored[key], derived[key]):
                return _difference(f"{path}.{key}", stored[key], derived[key])
    if isinstance(stored, list) and isinstance(derived, list):
        if len(stored) != len(derived):
            return (f"{path} has {len(stored)} items in the file, {len(derived)} from the "
                    "program")
        for index, (have, wanted) in enumerate(zip(stored, derived, strict=True)):
            if not same_json(have, wanted):
                return _difference(f"{path}[{index}]", have, wanted)
    return f"{path} is {_shown(stored)} in the file, {_shown(derived)} from the program"


def _compare_cuda(file: artifact.ModuleFile, manifest: dict[str, Any], graph: Graph,
                  program: Source, source: str) -> None:
    """CUDA modules are Python source for Numba: derived in full, source included."""
    from cnnc.driver.modules import compile_cuda_module

    derived = compile_cuda_module(graph, program)
    _compare(manifest, derived.manifest, source)
    if manifest["target"] != derived.manifest["target"]:
        raise _refuse(source, "the manifest's target does not match a cuda module's")
    if file.sections["cuda"] != derived.sections["cuda"]:
        raise _refuse(source, "its CUDA source is not what its program compiles to; load "
                              "it with trust='rebuild' to use the program's")


def _rebuilt(file: artifact.ModuleFile, manifest: dict[str, Any], graph: Graph,
             program: Source, source: str) -> artifact.ModuleFile:
    """The stored program compiled here, with the file's parameters (which the runtime
    checks against it, as it checks any module's)."""
    from cnnc.driver.modules import compile_cuda_module, compile_module

    if manifest["target"]["kind"] == "cuda":
        fresh = compile_cuda_module(graph, program)
    else:
        fresh = compile_module(graph, program, manifest["opt_level"],
                               manifest["build"]["scheduled"])
    return artifact.ModuleFile(fresh.manifest, dict(fresh.sections,
                                                    params=file.sections["params"]))
